"""Typed configuration: YAML files loaded onto dataclasses, with dotted command-line overrides.

    cfg = load_config("configs/fashion_demo.yaml", ["meanflow.cfg_omega=2.0", "train.lr=3e-4"])

Every leaf is type-checked against its annotation; an unknown key, a wrong type or a value
outside its declared range raises :class:`ConfigError` naming the dotted key. Ranges and
choices are declared next to the field (``field(metadata=...)``) so that the check and the
documentation live in one place.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import precision


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def _f(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
       hi_open: bool = False, choices: tuple | None = None, doc: str = "") -> Any:
    """A dataclass field with a declared valid range or set of choices."""
    meta = dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices, doc=doc)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# The configuration tree
# --------------------------------------------------------------------------------------------
@dataclass
class MeanFlowConfig:
    """The MeanFlow objective (Geng et al. 2025). Names follow the paper's notation."""

    time_dist: str = _f("logit_normal", choices=("logit_normal", "uniform", "dmf"),
                        doc="distribution of the two time draws before sorting; dmf: two "
                            "logit-normals of means time_mu and time_mu_r (Decoupled "
                            "MeanFlow), longer r != t intervals")
    time_mu: float = _f(-0.4, doc="logit-normal mean")
    time_mu_r: float = _f(-1.2, doc="time_dist=dmf: mean of the second logit-normal")
    time_sigma: float = _f(1.0, lo=0.0, lo_open=True, doc="logit-normal std")
    ratio_r_neq_t: float = _f(0.25, lo=0.0, hi=1.0,
                              doc="fraction of samples with r != t (0 = plain flow matching)")
    ratio_warmup_steps: int = _f(0, lo=0,
                                 doc="the r != t fraction ramps linearly from 0 to ratio_r_neq_t "
                                     "over these optimizer steps: a flow-matching start")
    adaptive_p: float = _f(1.0, lo=0.0, doc="adaptive loss weight power p (0 = plain L2)")
    adaptive_c: float = _f(1e-3, lo=0.0, lo_open=True, doc="adaptive loss weight constant c")
    cfg_omega: float = _f(1.0, lo=0.0, doc="CFG-in-training scale omega (1 = no guidance)")
    cfg_kappa: float = _f(0.0, lo=0.0, hi=1.0, doc="CFG-in-training mixing kappa")
    cfg_t_min: float = _f(0.0, lo=0.0, hi=1.0, doc="guidance only for t >= cfg_t_min")
    cfg_t_max: float = _f(1.0, lo=0.0, hi=1.0, doc="guidance only for t <= cfg_t_max")
    cond_drop_prob: float = _f(0.1, lo=0.0, hi=1.0, doc="condition dropout probability")
    tangent: str = _f("sample", choices=("sample", "model"),
                      doc="z-tangent of the JVP: sample = the training velocity e - x (the "
                          "MeanFlow paper); model = the network's own no-grad estimate "
                          "u(z_t, t, t) of the marginal velocity (improved MeanFlow, "
                          "Geng et al. 2025b): a JVP term free of the sample's noise, "
                          "for one more no-grad forward on the r != t samples")
    alpha_steps: int = _f(0, lo=0, doc="AlphaFlow curriculum: over these optimizer steps "
                                       "(from alpha_start) alpha falls from 1 (flow matching) "
                                       "to 0 on a sigmoid; while alpha > alpha_min the r != t "
                                       "target is alpha v + (1 - alpha) u(z - d v, r, t - d), "
                                       "no JVP. 0 = off")
    alpha_start: int = _f(0, lo=0, doc="AlphaFlow: first step of the ramp")
    alpha_min: float = _f(5e-3, lo=0.0, hi=1.0, doc="AlphaFlow: below it the JVP target "
                                                    "takes over")
    teacher: str = _f("", doc="export/run folder of a flow-matching model whose velocity "
                              "v_hat(z_t, t | c) replaces e - x in the tangent and the "
                              "target (MeanFlow Transformers with RAE); '' = off")
    fd_delta: float = _f(0.0, lo=0.0, hi=0.1, doc="> 0: du/dt by a central finite difference "
                                                  "with this step instead of the JVP")
    jvp_mode: str = _f("split", choices=("split", "joint"),
                       doc="split: no-grad JVP on the r != t samples + one forward with graph "
                           "(flow-matching memory); joint: one forward-mode pass with graph")

    def alpha_at(self, step: int) -> float:
        """AlphaFlow's alpha at optimizer step ``step``: 1 before alpha_start, a sigmoid down to
        0 over alpha_steps, and 0 (the MeanFlow JVP target) once below alpha_min or when off."""
        if self.alpha_steps <= 0:
            return 0.0
        frac = (step - self.alpha_start) / self.alpha_steps
        if frac <= 0.0:
            return 1.0
        if frac >= 1.0:
            return 0.0
        sig = lambda x: 1.0 / (1.0 + math.exp(-x))            # noqa: E731
        k = 12.0                                               # steepness of the ramp
        a = (sig(-k * (frac - 0.5)) - sig(-k / 2)) / (sig(k / 2) - sig(-k / 2))
        return a if a > self.alpha_min else 0.0

    def ratio_at(self, step: int) -> float:
        """The fraction of r != t samples at optimizer step ``step`` (0-based)."""
        if self.ratio_warmup_steps <= 0 or step >= self.ratio_warmup_steps:
            return self.ratio_r_neq_t
        return self.ratio_r_neq_t * step / self.ratio_warmup_steps

    def validate(self) -> None:
        if self.fd_delta > 0 and self.jvp_mode == "joint":
            raise ConfigError("meanflow.fd_delta needs meanflow.jvp_mode=split")
        if self.cfg_t_min > self.cfg_t_max:
            raise ConfigError(f"meanflow.cfg_t_min ({self.cfg_t_min}) > meanflow.cfg_t_max "
                              f"({self.cfg_t_max})")


@dataclass
class ModelConfig:
    """Backbone choice and shape. Fields not used by a backbone are ignored by it."""

    name: str = _f("unet", doc="'unet' or a SiT size such as 'SiT-B/2'")
    input_size: int = _f(32, lo=1, doc="spatial size of the model input (latent or pixels)")
    in_channels: int = _f(4, lo=1, doc="channels of the model input")
    edge_channels: int = _f(1, lo=0, doc="channels of the edge map (0 = no edge input)")
    edge_size: int = _f(256, lo=0, doc="spatial size of the edge map")
    num_classes: int = _f(0, lo=0, doc="number of class labels (0 = no class input)")
    # U-Net
    base_channels: int = _f(128, lo=1, doc="U-Net: channels of the first level")
    channel_mults: list[int] = _f([1, 2, 4], doc="U-Net: channel multiplier of each level "
                                             "(one level per entry, halving the size)")
    num_res_blocks: int = _f(2, lo=1, doc="U-Net: residual blocks per level")
    attn_resolutions: list[int] = _f([8], doc="U-Net: feature sizes that get self-attention")
    dropout: float = _f(0.1, lo=0.0, hi=1.0, hi_open=True, doc="dropout probability")
    time_embed: str = _f("sum", choices=("sum", "concat"),
                         doc="how the t and t-r embeddings combine")
    time_scale: float = _f(1.0, lo=0.0, lo_open=True,
                           doc="t is multiplied by this before the sinusoidal embedding; "
                               "large values (1000) make the JVP target explode")
    prediction: str = _f("u", choices=("u", "x"),
                         doc="what the network outputs: u itself, or a clean image x_hat with "
                             "u = (z - x_hat) / max(t, x_pred_t_min) (better in pixel space)")
    x_pred_t_min: float = _f(0.05, lo=0.0, hi=1.0, lo_open=True,
                             doc="lower clamp of t in the x-prediction's division")
    # SiT
    edge_mode: str = _f("add", choices=("add", "tokens"),
                        doc="SiT: add edge patches to the latent tokens or append them")
    grad_checkpointing: bool = _f(False, doc="SiT: recompute each block's activations in the "
                                             "backward pass (less memory, ~1/3 more compute); "
                                             "the no-grad JVP pass is unaffected")

    def validate(self) -> None:
        """The sizes the backbone can take, named by key (the network would refuse them
        later, in its own words)."""
        s = self.input_size
        if self.name == "unet":
            levels = len(self.channel_mults)
            if levels == 0:
                raise ConfigError("model.channel_mults: needs at least one level, got []")
            if s % 2 ** (levels - 1):
                n = levels - 1
                raise ConfigError(f"model.input_size={s}: the U-Net halves it "
                                  f"{n} time{'s' * (n != 1)} (one per model.channel_mults level "
                                  f"after the first): use a multiple of {2 ** (levels - 1)}")
            if self.edge_channels > 0:
                n = self.edge_size // s if s else 0
                if n < 1 or n * s != self.edge_size or n & (n - 1):
                    raise ConfigError(f"model.edge_size={self.edge_size}: must be model."
                                      f"input_size={s} times a power of 2 (1, 2, 4, ...)")
            return
        m = re.fullmatch(r"SiT-\w+/(\d+)", self.name)
        if m:
            p = int(m.group(1))
            if s % p:
                raise ConfigError(f"model.input_size={s}: not a multiple of the patch size "
                                  f"{p} of model.name={self.name}")
            if self.edge_channels > 0 and (self.edge_size <= 0 or (self.edge_size * p) % s):
                raise ConfigError(f"model.edge_size={self.edge_size}: does not map onto the "
                                  f"{s // p}x{s // p} token grid of model.name={self.name} "
                                  f"(edge_size x {p} must be a multiple of input_size {s})")


@dataclass
class DataConfig:
    """The cached dataset (preprocess/cache.py) and how it is read."""

    path: str = _f("", doc="LMDB folder written by preprocess/cache.py (one split)")
    val_path: str = _f("", doc="LMDB folder for the fixed validation batch ('' = path)")
    image_size: int = _f(256, lo=1, doc="image size the cache was written at")
    codec: str = _f("sd-vae", choices=("pixel", "sd-vae"),
                    doc="what the cache stores: pixels, or SD-VAE latents")
    channels: int = _f(4, lo=1, doc="channels of the cached image or latent")
    flip: bool = _f(True, doc="horizontal flip augmentation")
    use_edges: bool = _f(True, doc="condition on the edge map")
    use_labels: bool = _f(False, doc="condition on the class label")
    num_workers: int = _f(2, lo=0, doc="DataLoader worker processes per training process")


@dataclass
class TrainConfig:
    """Optimisation, EMA, logging and checkpoints."""

    batch_size: int = _f(64, lo=1, doc="global batch per optimizer step (before accumulation)")
    grad_accum: int = _f(1, lo=1, doc="micro-batches accumulated per optimizer step")
    max_steps: int = _f(100_000, lo=1, doc="optimizer steps")
    max_minutes: float = _f(0.0, lo=0.0, doc="stop after this much training time, resumes "
                                             "included (0 = no limit); see budget_clock")
    budget_clock: str = _f("wall", choices=("wall", "cpu"),
                           doc="what max_minutes counts: wall-clock time, or the training "
                               "process's CPU time (all its threads, not DataLoader workers), "
                               "which other jobs on the machine barely move: for comparisons "
                               "at equal compute on a shared machine")
    lr: float = _f(1e-4, lo=0.0, lo_open=True, doc="AdamW learning rate (after warm-up)")
    betas: list[float] = _f([0.9, 0.95], doc="AdamW betas")
    weight_decay: float = _f(0.0, lo=0.0, doc="AdamW weight decay")
    warmup_steps: int = _f(0, lo=0, doc="linear learning-rate warm-up, optimizer steps")
    schedule: str = _f("constant", choices=("constant", "cosine"),
                       doc="learning rate after warm-up: constant, or cosine decay to 0 at "
                           "max_steps")
    grad_clip: float = _f(1.0, lo=0.0, doc="max grad norm (0 = off)")
    mixed_precision: str = _f("auto", choices=(precision.AUTO, *precision.NAMES),
                              doc="autocast dtype (no = fp32). auto: `accelerate launch "
                                  "--mixed_precision` "
                                  "if given, else bf16 on a CUDA GPU that has it and no (fp32) "
                                  "elsewhere. An explicit value that contradicts the launcher's "
                                  "is an error; fp16 needs a CUDA GPU")
    tf32: bool = _f(True, doc="CUDA: TF32 tensor cores for fp32 matmuls and convolutions")
    channels_last: bool = _f(False, doc="CUDA: run the U-Net in channels_last memory format; "
                                        "off until measured faster on a GPU (its GroupNorms "
                                        "convert to NCHW and back); no effect on SiT or on "
                                        "the CPU")
    fused_optimizer: bool = _f(True, doc="fused AdamW; it also skips a non-finite update on the "
                                         "device, so the step never waits for the GPU. false: "
                                         "foreach AdamW and one host read per step")
    compile: bool = _f(False, doc="torch.compile the network's plain forward/backward; the JVP "
                                  "and no-grad passes stay eager (Inductor has been reported "
                                  "to drop forward-AD tangents)")
    cuda_graph_jvp: bool = _f(False, doc="CUDA: replay the no-grad JVP pass (split mode, exact "
                                         "JVP) from CUDA graphs, one per r != t count "
                                         "(meanflow/jvp_graph.py)")
    sync_every: int = _f(10, lo=1, doc="steps between the host reads of the run's state (stop "
                                       "signals, time budget, non-finite streak); logging and "
                                       "checkpoint steps read it too")
    debug_checks: bool = _f(False, doc="check input values (finite, times in [0, 1]) at every "
                                       "step, not only the first: each check waits for the GPU")
    ema_decays: list[float] = _f([0.999], doc="one EMA of the weights per decay; the first is "
                                       "exported")
    seed: int = _f(0, lo=0, hi=2**63 - 1,
                   doc="seed of the initialisation, data order and every draw")
    log_every: int = _f(50, lo=1, doc="scalars to the tracker and metrics.csv every N steps")
    log_with: str = _f("tensorboard", choices=("tensorboard", "wandb", "mlflow", "aim",
                                               "comet_ml", "none"),
                       doc="Accelerate's tracker for scalars and validation grids: TensorBoard "
                           "in RUN/tb, or W&B / MLflow / Aim / Comet (their package installed, "
                           "configured by their own environment variables); metrics.csv is "
                           "written in every case")
    image_every: int = _f(1000, lo=1, doc="validation image grid every N steps")
    ckpt_every: int = _f(1000, lo=1, doc="checkpoint (and export) every N steps")
    keep_checkpoints: int = _f(3, lo=1, doc="the newest N checkpoints are kept")
    max_nonfinite: int = _f(20, lo=1, doc="consecutive non-finite losses before the run stops")
    num_val: int = _f(8, lo=1, doc="size of the fixed validation batch for image grids")
    init_from: str = _f("", doc="warm start for a new run: an export, run folder or checkpoint "
                                "of this project (e.g. a flow-matching run), or an official "
                                "DiT/SiT state dict (.pt/.pth/.safetensors); '' = random init. "
                                "A resumed run ignores it")
    init_weights: str = _f("ema", choices=("ema", "raw"),
                           doc="what train.init_from takes from a checkpoint of this project: "
                               "its first EMA, or its raw training weights")


@dataclass
class Config:
    """The whole configuration: one section per dataclass above.

    ``given``: the dotted keys the file and overrides set (not a field: never saved), so that
    the keys of the dataset's shape left out can be taken from the dataset
    (``meanflow.data.fill_from_dataset``); None for a config not built by ``from_dict``."""

    given = None

    model: ModelConfig = field(default_factory=ModelConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        b = self.train.betas
        if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {b}")
        if not self.train.ema_decays or not all(0.0 < d < 1.0 for d in self.train.ema_decays):
            raise ConfigError(f"train.ema_decays must be numbers in (0, 1), got "
                              f"{self.train.ema_decays}")
        if self.model.grad_checkpointing and self.meanflow.jvp_mode == "joint":
            # the joint pass records the tangent computation in the graph; a recomputation in
            # the backward pass has no tangents and saves other tensors (checkpoint refuses)
            raise ConfigError("model.grad_checkpointing needs meanflow.jvp_mode=split (the "
                              "joint JVP pass cannot be recomputed in the backward pass)")
        if self.train.cuda_graph_jvp:
            import torch
            if not torch.cuda.is_available():
                raise ConfigError("train.cuda_graph_jvp=true needs a CUDA device, and this "
                                  "machine has none: set it false")
            if self.meanflow.jvp_mode != "split" or self.meanflow.fd_delta > 0:
                raise ConfigError("train.cuda_graph_jvp needs meanflow.jvp_mode=split and "
                                  "meanflow.fd_delta=0 (it captures the exact no-grad JVP)")
        if any(int(m) < 1 for m in self.model.channel_mults):
            raise ConfigError(f"model.channel_mults must be positive, got "
                              f"{self.model.channel_mults}")


# --------------------------------------------------------------------------------------------
# Generic machinery
# --------------------------------------------------------------------------------------------
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (bool, int, float, str, list, Optional)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads a float without a dot, such as 1e-4, as a string.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            item = (typing.get_args(tp) or (None,))[0]
            if item is None:
                return list(value)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - only the types above are used in the tree
        raise ConfigError(f"{key}: unsupported annotation {tp}")
    name = str(tp) if typing.get_args(tp) else getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _check_range(value: Any, meta: dict, key: str) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {list(meta['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
            op = ">" if meta.get("lo_open") else ">="
            raise ConfigError(f"{key}: must be {op} {lo}, got {value}")
        if hi is not None and (value > hi or (meta.get("hi_open") and value == hi)):
            op = "<" if meta.get("hi_open") else "<="
            raise ConfigError(f"{key}: must be {op} {hi}, got {value}")


def _apply(obj: Any, data: dict, prefix: str, given: set | None = None) -> None:
    """Set ``data``'s leaves on ``obj``, each type- and range-checked; the dotted key of each
    leaf set is added to ``given``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(fields))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {type(v).__name__} {v!r}")
            _apply(cur, v, key + ".", given)
            continue
        choices = fields[k].metadata.get("choices") or ()
        if isinstance(v, bool) and hints[k] is str and "no" in choices:
            v = "no" if v is False else v     # YAML 1.1 reads a bare `no` as false
        val = _coerce(v, hints[k], key)
        _check_range(val, fields[k].metadata, key)
        setattr(obj, k, val)
        if given is not None:
            given.add(key)


def _validate(obj: Any, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v):
            _validate(v, key + ".")
        else:
            _check_range(_coerce(v, hints[f.name], key), f.metadata, key)
    if hasattr(obj, "validate"):
        obj.validate()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=1e-4'`` -> (['a', 'b'], 1e-4); the value is parsed as YAML (so 'true', '[1,2]')."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def from_dict(data: dict | None, overrides: list[str] | tuple = (), cls: type = Config) -> Any:
    """Build a validated config from a nested dict plus dotted overrides."""
    cfg, given = cls(), set()
    _apply(cfg, data or {}, "", given)
    for text in overrides:
        path, value = parse_override(text)
        nested: dict = value
        for p in reversed(path):
            nested = {p: nested}
        _apply(cfg, nested, "", given)
    _validate(cfg)
    if isinstance(cfg, Config):
        cfg.given = frozenset(given)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML file (or nothing: defaults) and apply ``key.sub=value`` overrides."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    try:
        return from_dict(data, overrides)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (YAML, readable and reloadable with :func:`load_config`).

    Atomically (a temporary file renamed over it): a run killed while writing it must not
    leave a torn file for the restart to trip on."""
    from .atomic import write_text_atomic
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _describe_range(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    parts = []
    if meta.get("lo") is not None:
        parts.append(f"{'>' if meta.get('lo_open') else '>='} {meta['lo']:g}")
    if meta.get("hi") is not None:
        parts.append(f"{'<' if meta.get('hi_open') else '<='} {meta['hi']:g}")
    return ", ".join(parts)


def config_help(width: int = 100) -> str:
    """Every config key with its type, default, valid range and doc, generated from the
    dataclasses (what ``train.py --help`` prints after its flags)."""
    import textwrap

    lines = textwrap.wrap("config keys (set them in the YAML file, or on the command line as "
                          "section.key=value; the defaults are shown):", width)
    root = Config()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        head = (type(obj).__doc__ or "").strip().splitlines()
        lines += ["", f"{sec.name}:" + (f"  {head[0]}" if head else "")]
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            tp = hints[f.name]
            tname = str(tp) if typing.get_args(tp) else getattr(tp, "__name__", str(tp))
            rng = _describe_range(f.metadata)
            text = f"{sec.name}.{f.name}={getattr(obj, f.name)!r}  ({tname}" + (
                f"; {rng})" if rng else ")")
            doc = f.metadata.get("doc", "")
            lines += textwrap.wrap(f"{text}  {doc}".rstrip(), width, initial_indent="  ",
                                   subsequent_indent="      ", break_on_hyphens=False)
    return "\n".join(lines)

