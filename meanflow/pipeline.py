"""A trained model as a function: your edge map, sketch or photo in, images out.

    import meanflow
    pipe = meanflow.load_pipeline("runs/afhq_unet")           # run, export or checkpoint
    images = pipe(edges=["my_sketch.png"], steps=1, seed=0)   # list of PIL images
    pipe.save_pretrained("my_model")                          # self-contained folder

Inputs are turned into the model's condition the way the training data's were, from the
metadata the export records (``dataset_meta`` in model_config.json):

* an edge map or hand-drawn sketch (white-on-black or black-on-white, any size and aspect)
  gets the dataset's geometry (ADM centre crop to the edge size, meanflow/images.py) and
  is binarised: a pixel is an edge when a stroke at least half a source pixel wide crosses
  it, as a detector's one-pixel contour would; then the detector's closing (meanflow/edges.py);
* a photo goes through the dataset's own pipeline and edge detector (detector_from_meta).

Sample k of a call (inputs in order, ``num_per_input`` each) draws its noise from
``mix_seed(seed, k)``, as evaluate.py does, so an image does not depend on the batch size.
On CUDA the network runs under bf16 autocast and the VAE decodes in fp32.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image

from .codec import make_decoder
from .config import DataConfig, ModelConfig
from .edges import close_gaps, detector_from_meta, quantize
from .images import center_crop_arr, open_image, prepare_image, to_rgb
from .runtime import Stream, process_device, stream_seed
from .sampling import sample, sample_noise
from .export import EXPORT_DIR, Export, write_export

# Inputs larger than this are refused from their header, before any pixel is decoded: a
# 20000 x 20000 PNG would need 1.2 GB as RGB. Far above any sketch or photo worth conditioning
# a 256-pixel model on.
MAX_INPUT_PIXELS = 64 * 2**20
STROKE_COVERAGE = 0.4       # share of the nearby centre-line coverage that makes an edge pixel
MIN_STROKE_WIDTH = 0.25     # source pixels: a 1-pixel line split over up to four target pixels
SKETCH_INK = 128            # grey level (after polarity) above which a source pixel is stroke
MODEL_CARD = "README.md"

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


class InputError(ValueError):
    """An input that cannot be used (blank, not an image, too large, wrong kind for the model):
    the message names it."""


# --------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------
def _open_file(path: Path) -> Image.Image:
    """Decode an image file, refusing oversized ones from the header alone."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None   # PIL's own check, off:
    try:                                                           # the size is checked here
        with Image.open(path) as im:                # reads the header only
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - whatever PIL says, it is not an image we can read
        raise InputError(f"{path}: not an image ({type(e).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"{path}: {w}x{h} pixels is over the limit of {MAX_INPUT_PIXELS:,} "
                         f"(refused before decoding)")
    try:
        return open_image(path, max_pixels=MAX_INPUT_PIXELS)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt: one line naming the file
        raise InputError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from None


def as_pil(x: ImageLike, name: str) -> Image.Image:
    """A path, PIL image or array ([H, W] or [H, W, C]; uint8, bool, or float in [0, 1])."""
    if isinstance(x, (str, os.PathLike)):
        return _open_file(Path(x))
    if isinstance(x, Image.Image):
        if x.width * x.height > MAX_INPUT_PIXELS:
            raise InputError(f"{name}: {x.width}x{x.height} pixels is over the limit of "
                             f"{MAX_INPUT_PIXELS:,}")
        return x
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.size == 0:
        raise InputError(f"{name}: expected an image array [H, W] or [H, W, 3|4], got shape "
                         f"{list(a.shape)}")
    if a.shape[0] * a.shape[1] > MAX_INPUT_PIXELS:
        raise InputError(f"{name}: {a.shape[1]}x{a.shape[0]} pixels is over the limit")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.clip(np.rint(np.nan_to_num(a) * 255), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"{name}: array of dtype {a.dtype}; use uint8, bool or float in [0, 1]")
    return Image.fromarray(a)


def sketch_ink(img: Image.Image, name: str = "sketch") -> np.ndarray:
    """bool [H, W]: the strokes of an edge map or sketch of either polarity. Strokes are the
    minority, so an image whose median is light is black-on-white and is inverted."""
    gray = np.asarray(to_rgb(img).convert("L"))
    if np.median(gray) > 127:
        gray = 255 - gray
    ink = gray >= SKETCH_INK
    if not ink.any():
        raise InputError(f"{name}: blank image (one colour, no strokes)")
    return ink


def sketch_to_edge(img: Image.Image, size: int, levels: int, close: int,
                   name: str = "sketch") -> np.ndarray:
    """Edge map or sketch (either polarity, any size, any mode) -> float32 [1, S, S] in {0, 1}.

    Polarity: see :func:`sketch_ink`. Geometry: the dataset's ADM centre crop
    (center_crop_arr) of the stroke mask gives each target pixel its stroke coverage. A
    pixel is an edge when its coverage is at least STROKE_COVERAGE of the largest in its
    3x3 neighbourhood (the stroke's centre line: thick strokes do not smear, thin ones
    straddling two pixels keep both) and at least that of a line MIN_STROKE_WIDTH source
    pixels wide (specks vanish). Contours come out 1-2 pixels wide, like a detector's;
    then the detector's quantisation and closing.
    """
    ink = sketch_ink(img, name)
    # in float ('F' mode): 8-bit rounding at each halving would erase 1-pixel strokes
    cover = center_crop_arr(Image.fromarray(ink.astype(np.float32)), size)[..., 0]
    scale = min(ink.shape) / size                     # source pixels per target pixel
    peak = cv2.dilate(cover, np.ones((3, 3), np.uint8))
    keep = (cover >= STROKE_COVERAGE * peak) & (cover >= min(0.5, MIN_STROKE_WIDTH / scale))
    edge = np.where(keep, 255, 0).astype(np.uint8)
    edge = close_gaps(quantize(edge, levels), close)
    if not edge.any():
        h, w = ink.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        if not ink[top:top + s, left:left + s].any():
            raise InputError(f"{name}: every stroke lies outside the centre square that the "
                             f"model sees ({w}x{h} is centre-cropped to {s}x{s}): the crop "
                             f"cuts them off; move them to the middle or crop the image "
                             f"square yourself")
        raise InputError(f"{name}: no stroke is left at the model's {size}x{size} edge size "
                         f"(the strokes are too small or too faint)")
    return (edge.astype(np.float32) / 255.0)[None]


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
class Pipeline:
    """A loaded model with its codec and edge settings. Call it to generate images."""

    def __init__(self, model: torch.nn.Module, info: dict, device: torch.device,
                 source: Optional[Path] = None, vae: Optional[str] = None,
                 allow_download: bool = False, export: Optional[Export] = None):
        self.model, self.info, self.device, self.source = model, info, device, source
        # the VAE to decode with (None: the one the model records, from the local cache
        # only) and whether the default SD-VAE / edge annotators may be downloaded
        self.vae, self.allow_download = vae, allow_download
        # the typed configs of ``info`` (``export``: the Export it was read from)
        self.export = export if export is not None else Export.from_info(info)
        self.mcfg: ModelConfig = self.export.model
        self.dcfg: DataConfig = self.export.data
        self.meta: dict = self.export.dataset_meta
        self.uses_edges = bool(self.dcfg.use_edges and self.mcfg.edge_channels > 0)
        self.uses_labels = bool(self.dcfg.use_labels and self.mcfg.num_classes > 0)
        self.class_names: list[str] = list(self.meta.get("class_names") or [])
        settings = self.meta.get("edge_settings") or {}
        self.edge_levels = int(settings.get("levels", self.meta.get("edge_levels") or 2))
        self.edge_close = int(settings.get("close", 0))
        self._decode = None
        self._detector = None
        self.last_ms_per_image: Optional[float] = None

    # ---- conditions -----------------------------------------------------------------------
    def edge_from_sketch(self, x: ImageLike, name: str = "sketch") -> np.ndarray:
        """float32 [1, S, S] edge map from an edge map or sketch (see :func:`sketch_to_edge`)."""
        self._need_edges(name)
        return sketch_to_edge(as_pil(x, name), self.mcfg.edge_size, self.edge_levels,
                              self.edge_close, name)

    def edge_from_photo(self, x: ImageLike, name: str = "photo") -> np.ndarray:
        """float32 [1, S, S]: the dataset's crop and edge detector applied to a photo."""
        self._need_edges(name)
        if self._detector is None:
            if self.meta.get("edges", "none") == "none":
                raise InputError(f"{name}: the model's data records no edge detector, so a "
                                 f"photo cannot be turned into its edges; give an edge map")
            self._detector = detector_from_meta(self.meta, str(self.device),
                                                allow_download=self.allow_download)
        channels = int(self.meta.get("channels", 3))
        arr = prepare_image(to_rgb(as_pil(x, name)), self.mcfg.edge_size,
                            channels if channels in (1, 3) else 3)
        edge = self._detector(arr)                                     # uint8 [1, S, S]
        if not edge.any():
            raise InputError(f"{name}: the edge detector finds no edges in this photo")
        return edge.astype(np.float32) / 255.0

    def label_index(self, label: Union[int, str]) -> int:
        """A class index or name (case-insensitive) -> index, checked against the model."""
        if not self.uses_labels:
            raise InputError(f"label {label!r}: this model is not class-conditional "
                             f"(it takes edge maps)")
        n = self.mcfg.num_classes
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (str, int, np.integer)):
            raise InputError(f"label {label!r}: not a class index or name (give an integer "
                             f"0..{n - 1} or one of {self.class_names})")
        if isinstance(label, str) and not label.strip().lstrip("-").isdigit():
            low = [c.lower() for c in self.class_names]
            if label.strip().lower() not in low:
                raise InputError(f"label {label!r}: unknown class; the model's classes are "
                                 f"{self.class_names}")
            return low.index(label.strip().lower())
        i = int(label)
        if not 0 <= i < n:
            raise InputError(f"label {i}: out of range; the model has {n} classes (0..{n - 1})")
        return i

    def _need_edges(self, name: str) -> None:
        if not self.uses_edges:
            raise InputError(f"{name}: this model is class-only (no edge input); give class "
                             f"labels instead")

    # ---- generation -----------------------------------------------------------------------
    @property
    def decode(self):
        if self._decode is None:
            self._decode = make_decoder(self.meta, self.device, vae=self.vae,
                                        allow_download=self.allow_download)
        return self._decode

    @torch.no_grad()
    def generate(self, edges: Optional[np.ndarray], labels: Optional[Sequence[int]],
                 seeds: Sequence[int], steps: int = 1) -> np.ndarray:
        """One batch: edges float32 [B, 1, S, S] or None, labels [B] or None, one seed per
        sample -> uint8 [B, H, W, 3]."""
        shape = (self.mcfg.in_channels, self.mcfg.input_size, self.mcfg.input_size)
        noise = sample_noise(shape, list(seeds), self.device)
        edge = None if edges is None else torch.as_tensor(edges).to(self.device)
        label = (None if labels is None
                 else torch.as_tensor(list(labels), dtype=torch.long, device=self.device))
        amp = torch.bfloat16 if self.device.type == "cuda" else None
        x = sample(self.model, noise, steps, edge=edge, label=label, autocast_dtype=amp)
        img = self.decode(x.float())                  # outside autocast: the VAE in fp32
        img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()

    def __call__(self, edges: Optional[Sequence[ImageLike]] = None, *,
                 photos: Optional[Sequence[ImageLike]] = None,
                 labels: Optional[Sequence[Union[int, str]]] = None, steps: int = 1,
                 seed: int = 0, num_per_input: int = 1, batch_size: int = 16
                 ) -> list[Image.Image]:
        """Images for each edge map / sketch (``edges``) or photo (``photos``), or for each
        class label of a class-only model; ``num_per_input`` each, in input order. For a
        model conditioned on both, ``labels`` has one entry for all inputs or one per input.
        """
        conds = self.conditions(edges, photos, labels)
        out: list[Image.Image] = []
        for batch in self.batches(conds, num_per_input, batch_size, seed):
            out += [Image.fromarray(a) for a in self.run_batch(batch, steps)]
        return out

    def conditions(self, edges=None, photos=None, labels=None) -> list[dict]:
        """Check and prepare every input before anything is generated: [{edge, label}]."""
        if isinstance(edges, (str, os.PathLike, Image.Image, np.ndarray)):
            edges = [edges]
        if isinstance(photos, (str, os.PathLike, Image.Image)):
            photos = [photos]
        if isinstance(labels, (int, str)):
            labels = [labels]
        maps = [self.edge_from_sketch(e, _name(e, f"edges[{i}]"))
                for i, e in enumerate(edges or [])]
        maps += [self.edge_from_photo(p, _name(p, f"photos[{i}]"))
                 for i, p in enumerate(photos or [])]
        idx = [self.label_index(c) for c in labels or []]
        if self.uses_edges and not maps:
            raise InputError("this model generates from edge maps: give edges or photos")
        if not self.uses_edges:
            if not idx:
                raise InputError(f"this model is class-only: give class labels (indices 0.."
                                 f"{self.mcfg.num_classes - 1} or names {self.class_names})")
            return [dict(edge=None, label=i) for i in idx]
        if idx and len(idx) not in (1, len(maps)):
            raise InputError(f"{len(idx)} labels for {len(maps)} inputs: give one label for all "
                             f"or one per input")
        lab = idx * len(maps) if len(idx) == 1 else idx or [None] * len(maps)
        return [dict(edge=m, label=c) for m, c in zip(maps, lab)]

    def batches(self, conds: list[dict], num_per_input: int, batch_size: int, seed: int):
        """Samples (condition, seed, index) in order, grouped into batches."""
        if num_per_input < 1 or batch_size < 1:
            raise InputError(f"num_per_input and batch_size must be >= 1, got {num_per_input} "
                             f"and {batch_size}")
        items = [(c, stream_seed(seed, Stream.SAMPLE, k), k) for k, c in
                 enumerate(c for c in conds for _ in range(num_per_input))]
        for i in range(0, len(items), batch_size):
            yield items[i:i + batch_size]

    def run_batch(self, batch: list, steps: int) -> np.ndarray:
        conds = [c for c, _, _ in batch]
        edges = np.stack([c["edge"] for c in conds]) if self.uses_edges else None
        labels = [c["label"] for c in conds] if conds[0]["label"] is not None else None
        t0 = time.perf_counter()
        imgs = self.generate(edges, labels, [s for _, s, _ in batch], steps)
        self.last_ms_per_image = (time.perf_counter() - t0) * 1000 / len(batch)
        return imgs

    # ---- saving ---------------------------------------------------------------------------
    def save_pretrained(self, out: str | os.PathLike) -> Path:
        """A self-contained folder: model.safetensors, model_config.json (what load_model and
        evaluate.py read: model, objective, data settings, the dataset's metadata with the
        codec / VAE reference and the edge detector settings) and a model card README.md."""
        out = Path(out)
        info = neutral_paths(dict(self.info))
        info.setdefault("evaluation", find_results(self.source))
        write_export(out, self.model.state_dict(), info, self.info.get("step"))
        (out / MODEL_CARD).write_text(model_card(info))
        return out


def neutral_paths(obj: Any, key: str = "") -> Any:
    """``obj`` with every absolute local path (a string) replaced by its last part (the
    last two for data.path / data.val_path, e.g. ``afhq/train``): a saved folder that is
    sent on names no folder of this machine."""
    if isinstance(obj, dict):
        return {k: neutral_paths(v, f"{key}.{k}" if key else k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [neutral_paths(v, key) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        keep = 2 if key in ("data.path", "data.val_path") else 1
        return "/".join(Path(obj).parts[1:][-keep:])
    return obj


def _name(x: Any, fallback: str) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else fallback


def find_results(source: Optional[Path]) -> list[dict]:
    """FID rows of evaluate.py's results.json files in the model's run folder (RUN/eval/**)."""
    if source is None:
        return []
    run = source.parent if source.name == EXPORT_DIR else source
    rows = []
    for f in sorted(run.glob("eval/**/results.json")):
        try:
            res = json.loads(f.read_text())
            meta = res["meta"]
            for r in res["results"]:
                if "fid" in r:
                    rows.append(dict(steps=r["steps"], fid=r["fid"], n=r.get("n", meta.get("n")),
                                     split=meta.get("split"), category=meta.get("category"),
                                     file=str(f.relative_to(run))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return rows


def model_card(info: dict) -> str:
    """README.md of a saved pipeline: what it was trained on, how long, how good."""
    m, d, meta = info.get("model", {}), info.get("data", {}), info.get("dataset_meta") or {}
    cond = ("edge maps" if d.get("use_edges") else "") + (
        " and class labels" if d.get("use_edges") and d.get("use_labels")
        else "class labels" if d.get("use_labels") else "")
    lines = [
        "# MeanFlow model", "",
        f"One-step (MeanFlow) generator of {d.get('image_size')}x{d.get('image_size')} images "
        f"from {cond or 'noise'}.", "",
        "```python", "import meanflow",
        "pipe = meanflow.load_pipeline(\"THIS_FOLDER\")",
        "images = pipe(edges=[\"sketch.png\"], steps=1, seed=0)" if d.get("use_edges")
        else "images = pipe(labels=[0], steps=1, seed=0)", "```", "",
        "| | |", "|---|---|",
        f"| backbone | {m.get('name')} ({m.get('in_channels')}x{m.get('input_size')}x"
        f"{m.get('input_size')} input) |",
        f"| training data | {meta.get('source_type', '?')} `{d.get('path')}`, split "
        f"{meta.get('split', '?')}, {meta.get('num_records', '?')} images, classes "
        f"{len(meta.get('class_names') or [])} |",
        f"| training steps | {info.get('step')} (EMA decay {info.get('ema_decay')}) |",
        f"| codec | {meta.get('codec')}" + (f", VAE `{meta.get('vae')}` (scale "
                                          f"{meta.get('scaling_factor')})" if meta.get('vae')
                                          else "") + " |",
        f"| edge detector | {meta.get('edges', 'none')} at {meta.get('edge_size')} px, "
        f"settings {json.dumps(meta.get('edge_settings') or {})} |",
    ]
    rows = info.get("evaluation") or []
    lines += ["", "## Evaluation", ""]
    if rows:
        lines += ["| steps | FID | N | split |", "|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['fid']:.2f} | {r['n']} | {r['split']}"
                  f"{' / ' + r['category'] if r.get('category') else ''} |" for r in rows]
    else:
        lines.append("No FID recorded: run `python evaluate.py --ckpt RUN --fid` before saving.")
    return "\n".join(lines) + "\n"


def load_pipeline(path: str | os.PathLike, device=None, *, weights: str = "ema",
                  vae: Optional[str] = None, allow_download: bool = False) -> Pipeline:
    """A :class:`Pipeline` from a run folder (with export/), an export or saved folder, or a
    checkpoint; ``device`` defaults to the process's (CUDA when present, else the CPU).

    ``weights``: "ema" (a checkpoint's first EMA; exports hold it) or "raw" (a checkpoint's
    training weights, only when asked). Nothing is downloaded that the caller did not name:
    the VAE the model records is read from the local cache, unless ``vae`` names one (a folder
    or hub id) or ``allow_download`` lets the default SD-VAE and edge annotators come from
    the hub."""
    dev = process_device(device)
    exp = Export.read(path, weights=weights)
    return Pipeline(exp.build(dev), exp.info, dev, Path(path), vae=vae,
                    allow_download=allow_download, export=exp)
