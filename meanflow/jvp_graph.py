"""The no-grad MeanFlow JVP pass replayed from CUDA graphs (``train.cuda_graph_jvp``).

The JVP pass of split mode (``meanflow_target``) launches a few thousand small kernels per
step (forward-AD bookkeeping and the tangent rules); at the batch of one GPU the launches,
not the arithmetic, set its time. :class:`GraphedJVP` captures that pass once per input
signature, the number k of r != t samples included (one graph per k while a ratio schedule
ramps; the fixed-count layout of ``neq_layout`` keeps k the same at every step after that),
and replays it with one launch:

* static input buffers per signature: each call copies (z, r, t, w, condition) of its k
  samples into them, replays, and returns the graph's output buffer (valid until the next
  replay of any graph here: the caller copies it at once);
* the weights are read in place by the graph: optimizer steps (``p.copy_``, fused AdamW)
  update the same storage, so a replay always sees the current weights. Replacing a
  parameter tensor (``p.data = ...``, ``load_state_dict`` with ``assign=True``) would not be
  seen: call :meth:`reset` after such a change;
* autocast, as the eager pass would have it (accelerate's bf16/fp16 wrapper), is entered
  here with ``cache_enabled=False`` around the module's un-wrapped forward: a cached cast of
  a weight made outside the capture would be freed under the graph;
* warm-up runs on a side stream before capture (lazy initialisation, cuDNN/cuBLAS
  workspace choice), as the torch.cuda.graphs documentation prescribes; nothing in the
  captured pass reads a device value on the host;
* dropout in the captured pass draws fresh masks at every replay (the CUDA generator is
  registered with the graph by torch.cuda.graph);
* all graphs share one memory pool: their intermediates never outlive a replay, and every
  static input and output stays allocated as long as its graph, so captures in any order are
  safe as long as each output is read before the next replay.

Only the split-mode exact JVP is captured (not fd_delta, the joint pass, AlphaFlow, the
guidance or the model-tangent forwards, which stay eager).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

WARMUP_ITERS = 3


def _plain_forward(model: torch.nn.Module) -> Callable:
    """The module's forward without accelerate's autocast wrapper (accelerate keeps the
    original as ``_original_forward``; it bypasses module hooks, which the backbones have
    none of), else the module itself."""
    return getattr(model, "_original_forward", model)


def _signature(z: Tensor, r: Tensor, t: Tensor, w: Tensor, cond: dict, training: bool):
    def sig(x):
        if not isinstance(x, Tensor):
            return ("value", x)
        return (tuple(x.shape), x.dtype, x.stride(), str(x.device))
    return (sig(z), sig(r), sig(t), sig(w), tuple((k, sig(v)) for k, v in sorted(cond.items())),
            training)


class GraphedJVP:
    """Callable as ``jvp(model, z, r, t, w, cond) -> du/dt`` (the no-grad split-mode pass of
    ``meanflow_target``), replayed from a CUDA graph per input signature.

    ``autocast_dtype``: the dtype the eager pass autocasts to (``torch.bfloat16`` under
    ``mixed_precision=bf16``), None for fp32.
    """

    def __init__(self, autocast_dtype: Optional[torch.dtype] = None,
                 max_graphs: int = 256):
        if not torch.cuda.is_available():
            raise RuntimeError("train.cuda_graph_jvp needs a CUDA device; none is available")
        self.autocast_dtype = autocast_dtype
        self.max_graphs = max_graphs
        self.reset()

    def reset(self) -> None:
        """Forget every captured graph (their memory is released with them)."""
        self.graphs: dict = {}
        self.pool = None
        self._model_id: Optional[int] = None

    def __len__(self) -> int:
        return len(self.graphs)

    def _autocast(self):
        """The eager pass's autocast without its weight-cast cache: accelerate's dtype when
        given, else whatever autocast the caller runs under (none: fp32)."""
        dtype = self.autocast_dtype
        if dtype is None and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
        if dtype is None:
            return torch.autocast("cuda", enabled=False)
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False)

    def _run(self, model, z, r, t, w, cond) -> Tensor:
        from .objective import _jvp
        with self._autocast():
            _, d = _jvp(_plain_forward(model), z, r, t, w, cond,
                        explicit=getattr(model, "explicit_jvp", False))
        return d

    def __call__(self, model: torch.nn.Module, z: Tensor, r: Tensor, t: Tensor, w: Tensor,
                 cond: dict) -> Tensor:
        if z.device.type != "cuda":
            raise ValueError(f"train.cuda_graph_jvp needs CUDA tensors, got z on {z.device}")
        if self._model_id is not None and self._model_id != id(model):
            self.reset()                                   # another network: recapture
        self._model_id = id(model)
        key = _signature(z, r, t, w, cond, model.training)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                self.reset()
                self._model_id = id(model)
            entry = self.graphs[key] = self._capture(model, z, r, t, w, cond)
        graph, static_in, static_out = entry
        for buf, x in zip(static_in[:4], (z, r, t, w)):
            buf.copy_(x, non_blocking=True)
        for k, buf in static_in[4].items():
            buf.copy_(cond[k], non_blocking=True)
        graph.replay()
        return static_out

    def _capture(self, model, z, r, t, w, cond):
        # static inputs: same shapes, dtypes and strides as the call's (empty_like keeps the
        # layout, channels_last included)
        def static(x):
            return torch.empty_like(x).copy_(x)
        sz, sr, st, sw = (static(x) for x in (z, r, t, w))
        scond = {k: static(v) for k, v in cond.items() if isinstance(v, Tensor)}
        full = {k: scond.get(k, v) for k, v in cond.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_ITERS):
                self._run(model, sz, sr, st, sw, full)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = self._run(model, sz, sr, st, sw, full)
        return graph, (sz, sr, st, sw, scond), out


def autocast_dtype_of(mixed_precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of accelerate's ``mixed_precision`` setting ("no" -> None; a mode
    the precision table does not know, such as fp8, -> None too)."""
    from .precision import NAMES, autocast_dtype
    return autocast_dtype(mixed_precision) if str(mixed_precision).lower() in NAMES else None


__all__ = ["GraphedJVP", "autocast_dtype_of"]
