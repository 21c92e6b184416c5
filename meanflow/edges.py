"""Edge detectors for the condition maps: Canny (OpenCV), PiDiNet and HED (controlnet-aux).

Every detector maps a uint8 RGB image [S, S, 3] (S = edge size) to a uint8 edge map
[1, S, S] in 0..255, after the same post-processing: quantisation to ``levels`` grey levels
(2 = binary, stored as packed bits) and an optional morphological closing with a
``close`` x ``close`` elliptical kernel, which reconnects contours broken by one pixel.

Defaults (documented in preprocess/cache.py --help):
  canny    thresholds 100 / 200 on the L2 gradient, Gaussian pre-blur sigma = S / 256
           (none below S = 128), binary. Measured on Fashion-MNIST at 32x32 and on photos at
           256x256: 50 / 150 keeps fabric texture and fur; at 32 px any blur erases the
           garment details that 100 / 200 keeps, while at 256 px the blur is what removes
           texture edges. ControlNet's Canny default is also 100 / 200.
  pidinet  safe mode, 8 levels, closing 3: MeanFlow-Edge2Image's recipe for AFHQ.
  hed      safe mode, 8 levels, no closing.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import cv2
import numpy as np

from .errors import first_line

ANNOTATORS_ID = "lllyasviel/Annotators"       # hub repo holding PiDiNet / HED weights
CANNY_LOW, CANNY_HIGH = 100, 200
CANNY_SIGMA_PER_PIXEL = 1.0 / 256             # blur sigma grows with the map size
MIN_CANNY_SIGMA = 0.5                         # below this the blur does nothing useful
DEFAULTS = {"canny": {"levels": 2, "close": 0},
            "pidinet": {"levels": 8, "close": 3},
            "hed": {"levels": 8, "close": 0}}
# controlnet-aux rounds its working resolution to a multiple of 64 (to 0 below 32 px), so
# small maps are detected at 64 px and resized down.
MIN_ANNOTATOR_RES = 64
ANNOTATOR_FILES = {"pidinet": "table5_pidinet.pth", "hed": "ControlNetHED.pth"}


class EdgeConfigError(ValueError):
    """Unknown detector, bad setting, or annotator weights that cannot be loaded."""


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------
def quantize(edge: np.ndarray, levels: int) -> np.ndarray:
    """uint8 0..255 -> ``levels`` evenly spaced values spanning 0..255 (levels >= 256: as is)."""
    if levels >= 256:
        return edge
    step = 255.0 / (levels - 1)
    return (np.rint(np.rint(edge.astype(np.float32) / step) * step)).astype(np.uint8)


def close_gaps(edge: np.ndarray, k: int) -> np.ndarray:
    """Morphological closing (dilate then erode) with a k x k ellipse; k <= 1 is a no-op.
    Closing keeps the set of grey levels, so it can follow quantisation."""
    if k <= 1:
        return edge
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.morphologyEx(edge, cv2.MORPH_CLOSE, kernel)


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------
class EdgeDetector:
    """Base class: ``raw`` (subclass) + shared post-processing. ``device_bound`` detectors run
    a network and stay in the main process; the others run in decode workers."""

    name = "base"
    device_bound = False

    def __init__(self, size: int, levels: int, close: int):
        if not 2 <= levels <= 256:
            raise EdgeConfigError(f"--edge-levels must be in 2..256, got {levels}")
        if close < 0:
            raise EdgeConfigError(f"--edge-close must be >= 0, got {close}")
        self.size, self.levels, self.close = size, levels, close

    def raw(self, rgb: np.ndarray) -> np.ndarray:  # uint8 [S, S, 3] -> uint8 [S, S]
        raise NotImplementedError

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [S, S, C] (C = 1 or 3) -> uint8 [1, S, S] post-processed edge map."""
        if rgb.ndim != 3 or rgb.shape[:2] != (self.size, self.size):
            raise ValueError(f"edge detector expects [{self.size}, {self.size}, C], got "
                             f"{list(rgb.shape)}")
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        e = self.raw(np.ascontiguousarray(rgb))
        if e.shape != (self.size, self.size):
            # controlnet-aux rounds its working resolution to multiples of 64
            interp = cv2.INTER_AREA if e.shape[0] > self.size else cv2.INTER_LINEAR
            e = cv2.resize(e, (self.size, self.size), interpolation=interp)
        e = close_gaps(quantize(e, self.levels), self.close)
        return e[None]

    def settings(self) -> dict[str, Any]:
        return {"levels": self.levels, "close": self.close}


class CannyEdges(EdgeDetector):
    name = "canny"

    def __init__(self, size: int, levels: int = 2, close: int = 0, low: float = CANNY_LOW,
                 high: float = CANNY_HIGH, sigma: Optional[float] = None):
        super().__init__(size, levels, close)
        if not 0 <= low <= high:
            raise EdgeConfigError(f"--canny-low/--canny-high must satisfy 0 <= low <= high, got "
                                  f"{low} / {high}")
        self.low, self.high = float(low), float(high)
        self.sigma = size * CANNY_SIGMA_PER_PIXEL if sigma is None else float(sigma)

    def raw(self, rgb: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if self.sigma >= MIN_CANNY_SIGMA:
            gray = cv2.GaussianBlur(gray, (0, 0), self.sigma)
        return cv2.Canny(gray, self.low, self.high, L2gradient=True)

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        s.update(low=self.low, high=self.high, sigma=self.sigma,
                 blur=self.sigma >= MIN_CANNY_SIGMA, l2_gradient=True)
        return s


class AnnotatorEdges(EdgeDetector):
    """PiDiNet or HED through controlnet-aux's detector classes (``PidiNetDetector``,
    ``HEDdetector``): the detector object is called exactly as ControlNet does, at the edge
    size, in safe mode unless told otherwise."""

    device_bound = True

    def __init__(self, name: str, detector: Any, size: int, levels: int, close: int,
                 safe: bool = True, annotators: str = ANNOTATORS_ID):
        super().__init__(size, levels, close)
        self.name, self.detector, self.safe, self.annotators = name, detector, safe, annotators

    def raw(self, rgb: np.ndarray) -> np.ndarray:
        res = max(self.size, MIN_ANNOTATOR_RES)
        out = self.detector(rgb, detect_resolution=res, image_resolution=res, safe=self.safe,
                            output_type="np")
        out = np.asarray(out)
        return out[..., 0] if out.ndim == 3 else out

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        s.update(safe=self.safe, annotators=self.annotators,
                 weights=ANNOTATOR_FILES[self.name])
        return s


def looks_like_path(name: str) -> bool:
    """A hub id is 'owner/name'; anything else that is not an existing folder is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.path.exists(name)


def hub_offline() -> bool:
    """Whether huggingface_hub was told to stay offline (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _unreachable(e: BaseException) -> bool:
    """An error (or one it was raised from) that means the hub could not be asked."""
    seen = 0
    while e is not None and seen < 8:
        name = type(e).__name__
        if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                    "ConnectTimeout", "ConnectError") or "couldn't connect" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def hub_failure(flag: str, name: str, e: BaseException, what: str) -> Optional[str]:
    """One line for a hub id that could not be loaded because the hub is offline or out of
    reach and the files are not in the local cache (None when that is not the cause): it
    says so, and how to pass a local folder instead."""
    if os.path.isdir(name) or looks_like_path(name) or not (hub_offline() or _unreachable(e)):
        return None
    why = ("the model hub is offline (HF_HUB_OFFLINE=1)" if hub_offline()
           else "the model hub cannot be reached")
    return (f"{flag} {name}: {why} and {name} is not in the local cache: download {what} "
            f"where there is internet access (e.g. `huggingface-cli download {name} "
            f"--local-dir DIR`), then pass the local folder: {flag} /path/to/folder")


def load_annotator(name: str, annotators: str = ANNOTATORS_ID, device: str = "cpu",
                   local_only: bool = False) -> Any:
    """controlnet-aux detector via its own ``from_pretrained(hub id or local folder)``
    (its weights are .pth files, read by torch.load, which defaults to weights_only=True).
    ``local_only``: a hub id is read from the local cache only, never downloaded."""
    if name not in ANNOTATOR_FILES:
        raise EdgeConfigError(f"--edges {name!r} is not an annotator ({list(ANNOTATOR_FILES)})")
    if os.path.isdir(annotators):
        weights = os.path.join(annotators, ANNOTATOR_FILES[name])
        if not os.path.isfile(weights):
            raise EdgeConfigError(f"--annotators {annotators}: {ANNOTATOR_FILES[name]} not found "
                                  f"(download it from the hub repo {ANNOTATORS_ID})")
    elif looks_like_path(annotators):
        raise EdgeConfigError(f"--annotators {annotators}: no such folder")
    try:
        with warnings.catch_warnings():
            # importing controlnet_aux imports all of its ~30 annotators, which warn about
            # optional packages (mediapipe) and deprecated timm paths that are not used here
            warnings.simplefilter("ignore")
            if name == "pidinet":
                from controlnet_aux.pidi import PidiNetDetector as cls
            else:
                from controlnet_aux.hed import HEDdetector as cls
            # (it passes arguments hf_hub deprecates)
            det = (cls.from_pretrained(annotators, local_files_only=True) if local_only
                   else cls.from_pretrained(annotators))
    except ImportError as e:
        raise EdgeConfigError(f"--edges {name} needs controlnet-aux (pip install "
                              f"controlnet-aux): {e}") from None
    except Exception as e:  # noqa: BLE001 - hub, file and state-dict errors all end here
        if local_only and not os.path.isdir(annotators):
            raise EdgeConfigError(
                f"--edges {name}: the model's annotator repository {annotators} is not in the "
                f"local cache, and loading a model downloads nothing it was not told to: "
                f"pass annotators= (a local folder) or allow_download=True for "
                f"{ANNOTATORS_ID}") from None
        offline = hub_failure("--annotators", annotators, e, ANNOTATOR_FILES[name])
        if offline:
            raise EdgeConfigError(f"--edges {name}: {offline}") from None
        raise EdgeConfigError(f"--edges {name}: cannot load weights from --annotators "
                              f"{annotators}: {first_line(e, with_type=True)}") from None
    return det.to(device)


def build_detector(name: str, size: int, *, levels: Optional[int] = None,
                   close: Optional[int] = None, canny_low: float = CANNY_LOW,
                   canny_high: float = CANNY_HIGH, canny_sigma: Optional[float] = None,
                   annotators: str = ANNOTATORS_ID, safe: bool = True,
                   device: str = "cpu", local_only: bool = False) -> Optional[EdgeDetector]:
    """The detector for ``--edges name`` (None for 'none'); unset levels/close take the
    per-detector defaults."""
    if name == "none":
        return None
    if name not in DEFAULTS:
        raise EdgeConfigError(f"--edges {name!r}: unknown detector (choose none, "
                              f"{', '.join(DEFAULTS)})")
    lv = DEFAULTS[name]["levels"] if levels is None else levels
    cl = DEFAULTS[name]["close"] if close is None else close
    if name == "canny":
        return CannyEdges(size, lv, cl, canny_low, canny_high, canny_sigma)
    return AnnotatorEdges(name, load_annotator(name, annotators, device, local_only), size,
                          lv, cl, safe, annotators)


def detector_from_meta(meta: dict[str, Any], device: str = "cpu",
                       annotators: Optional[str] = None,
                       allow_download: bool = False) -> Optional[EdgeDetector]:
    """Rebuild the detector a dataset was cached with (e.g. to measure how well generated
    images reproduce their input edges). Input: uint8 RGB at ``meta['edge_size']``.

    The metadata may come with a model someone sent: the annotator repository it records is
    read from the local cache only, unless the caller names one (``annotators``) or lets the
    default one (ANNOTATORS_ID) be downloaded (``allow_download``)."""
    name = meta.get("edges", "none")
    if name == "none":
        return None
    s = meta.get("edge_settings") or {}
    recorded = str(s.get("annotators", ANNOTATORS_ID))
    local_only = annotators is None and not (allow_download and recorded == ANNOTATORS_ID)
    return build_detector(name, int(meta["edge_size"]), levels=s.get("levels"),
                          close=s.get("close"), canny_low=s.get("low", CANNY_LOW),
                          canny_high=s.get("high", CANNY_HIGH), canny_sigma=s.get("sigma"),
                          annotators=annotators or recorded, safe=s.get("safe", True),
                          device=device, local_only=local_only)
