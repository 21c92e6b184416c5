"""Where images come from: an image folder (AFHQ v2 layout) or the Fashion-MNIST IDX files.
Each source's images then go through the shared image pipeline (meanflow/images.py).

A source is split-wise: :class:`Source` lists :class:`Item` s (key, label, origin) in a fixed
order and opens one of them as a PIL image. Bad inputs raise; the caller records the reason.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from meanflow.images import open_image
from meanflow.records import key_part, sample_key

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
# Debian's dataset-fashion-mnist package installs the four gzipped IDX files here.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PREFIX = {"train": "train", "test": "t10k"}


class SourceError(ValueError):
    """The input (folder, IDX file) is missing or malformed: reported before any work."""


@dataclass(frozen=True)
class Item:
    key: str          # LMDB key, <split>/<category>/<stem>
    label: int        # index into the source's class_names
    origin: str       # file path (or IDX file#index), for reports
    index: int = -1   # position inside an array source (Fashion-MNIST)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One split of a dataset: items in a fixed order, and a way to open each."""

    kind: str
    split: str
    class_names: list[str]
    items: list[Item] = field(default_factory=list)
    description: dict = field(default_factory=dict)
    min_side_fraction: Optional[float] = 0.5   # reject images below this fraction of the target

    def open(self, item: Item, max_pixels: Optional[int] = None) -> Image.Image:
        raise NotImplementedError


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _broken_link(p: Path) -> bool:
    """A symlink that leads nowhere (a loop, or a missing target). Kept as an item so that it
    fails like any unreadable file and is listed in report.json, not silently dropped."""
    return p.is_symlink() and not p.exists()


def list_folder_splits(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))


def folder_class_names(root: Path, splits: list[str]) -> list[str]:
    """Sorted union of the category folders of ``splits``, so labels agree across splits."""
    names: set[str] = set()
    for s in splits:
        names.update(p.name for p in (root / s).iterdir() if p.is_dir() and _visible(p))
    ordered = sorted(names)
    slugs: dict[str, str] = {}
    for n in ordered:
        slug = key_part(n)
        if slug in slugs:
            raise SourceError(f"categories {slugs[slug]!r} and {n!r} in {root} map to the same "
                              f"key component {slug!r}; rename one")
        slugs[slug] = n
    return ordered


class FolderSource(Source):
    """``root/<split>/<category>/<image>``; the category (sorted folder names) is the label.

    Every visible regular file is an item, and so is a broken symlink: a non-image file is
    reported as failed rather than silently ignored. Files that share a stem inside one
    category keep their extension in the key so that keys stay unique; two names that still
    map to one key (``a b.png`` and ``a_b.png``) are an error naming both.
    """

    def __init__(self, root: Path, split: str, class_names: list[str]):
        super().__init__(kind="folder", split=split, class_names=list(class_names),
                         description={"type": "folder", "root": str(root), "split": split})
        split_dir = root / split
        cats = sorted(p for p in split_dir.iterdir() if p.is_dir() and _visible(p))
        if not cats:
            raise SourceError(f"{split_dir} has no category folders: expected "
                              f"{root}/<split>/<category>/<image>")
        for cat in cats:
            label = self.class_names.index(cat.name)
            files = sorted(p for p in cat.iterdir()
                           if (p.is_file() or _broken_link(p)) and _visible(p))
            stems: dict[str, int] = {}
            for f in files:
                stems[f.stem] = stems.get(f.stem, 0) + 1
            for f in files:
                stem = f.stem if stems[f.stem] == 1 else f.name
                self.items.append(Item(sample_key(split, cat.name, stem), label, str(f)))
        self.items.sort(key=lambda it: it.key)
        for a, b in zip(self.items, self.items[1:]):
            if a.key == b.key:
                raise SourceError(f"{a.origin!a} and {b.origin!a} map to the same key "
                                  f"{a.key!r}; rename one")

    def open(self, item: Item, max_pixels: Optional[int] = None) -> Image.Image:
        return open_image(item.origin, max_pixels)


# ---- Fashion-MNIST ----------------------------------------------------------------------------
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise SourceError(f"{path}: corrupt gzip stream: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise SourceError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise SourceError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - head != need:
        raise SourceError(f"{path}: IDX header says {list(dims)} ({need} bytes of data), file "
                          f"has {len(raw) - head}")
    return np.frombuffer(raw, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def find_fashion_files(root: Path, split: str) -> Optional[tuple[Path, Path]]:
    """(images, labels) IDX paths for ``split`` under ``root`` (plain folder or torchvision's
    ``FashionMNIST/raw`` layout), gzipped or not; None if absent."""
    prefix = FASHION_PREFIX[split]
    for folder in (root, root / "FashionMNIST" / "raw"):
        found = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            cands = [folder / f"{prefix}-{kind}{ext}" for ext in ("", ".gz")]
            hit = next((c for c in cands if c.is_file()), None)
            found.append(hit)
        if all(found):
            return found[0], found[1]
    return None


class FashionMNISTSource(Source):
    """One Fashion-MNIST split from IDX files. Images are 28x28 greyscale, so the
    half-target-size rule does not apply (upsampling them is the point of --image-size 32)."""

    def __init__(self, images_path: Path, labels_path: Path, split: str,
                 limit: Optional[int] = None):
        super().__init__(kind="fashion-mnist", split=split,
                         class_names=list(FASHION_MNIST_CLASSES), min_side_fraction=None,
                         description={"type": "fashion-mnist", "images": str(images_path),
                                      "labels": str(labels_path), "split": split})
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise SourceError(f"{images_path}: expected uint8 [N, H, W] images, got "
                              f"{images.dtype} {list(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise SourceError(f"{labels_path}: {len(labels)} labels for {len(images)} images "
                              f"in {images_path}")
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise SourceError(f"{labels_path}: label {int(labels.max())} outside 0..9")
        n = len(images) if limit is None else min(limit, len(images))
        self.images, self.labels = images[:n], labels[:n].astype(np.int64)
        self.items = [Item(sample_key(split, FASHION_MNIST_CLASSES[int(y)], f"{i:05d}"), int(y),
                           f"{images_path}#{i}", i) for i, y in enumerate(self.labels)]
        self.items.sort(key=lambda it: it.key)

    def open(self, item: Item, max_pixels: Optional[int] = None) -> Image.Image:
        return Image.fromarray(self.images[item.index], "L")


def fashion_split_files(root: Optional[Path], split: str, download: bool) -> tuple[Path, Path]:
    """Locate (or, with ``download``, fetch through torchvision) one split's IDX files."""
    roots = [root] if root is not None else [DEBIAN_FASHION_DIR]
    for r in roots:
        if r.is_dir():
            found = find_fashion_files(r, split)
            if found:
                return found
    target = root if root is not None else Path("data/fashion-mnist-raw")
    if not download:
        where = root if root is not None else f"{DEBIAN_FASHION_DIR} (Debian dataset-fashion-mnist)"
        raise SourceError(f"--fashion-root: no Fashion-MNIST {split} IDX files "
                          f"({FASHION_PREFIX[split]}-images-idx3-ubyte[.gz], "
                          f"{FASHION_PREFIX[split]}-labels-idx1-ubyte[.gz]) in {where}; pass "
                          f"--download to fetch them with torchvision into {target}")
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(target), train=split == "train", download=True)
    found = find_fashion_files(target, split)
    if not found:
        raise SourceError(f"torchvision download into {target} produced no IDX files")
    return found


def open_sources(kind: str, *, input_root: Optional[Path] = None,
                 fashion_root: Optional[Path] = None, splits: Optional[list[str]] = None,
                 limit: Optional[int] = None, download: bool = False) -> list[Source]:
    """All requested splits of a source, validated (raises :class:`SourceError`)."""
    if kind == "folder":
        if input_root is None:
            raise SourceError("--input is required for an image-folder source")
        if not input_root.is_dir():
            raise SourceError(f"--input {input_root}: no such directory")
        available = list_folder_splits(input_root)
        chosen = splits or available
        missing = [s for s in chosen if s not in available]
        if missing or not chosen:
            raise SourceError(f"--input {input_root}: split folder(s) {missing or '(none)'} not "
                              f"found (has {available})")
        names = folder_class_names(input_root, chosen)
        out = []
        for s in chosen:
            src = FolderSource(input_root, s, names)
            if limit is not None:
                src.items = src.items[:limit]
            out.append(src)
        return out
    if kind == "fashion-mnist":
        chosen = splits or ["train", "test"]
        bad = [s for s in chosen if s not in FASHION_PREFIX]
        if bad:
            raise SourceError(f"--splits {bad}: Fashion-MNIST has splits {list(FASHION_PREFIX)}")
        out = []
        for s in chosen:
            imgs, labels = fashion_split_files(fashion_root, s, download)
            out.append(FashionMNISTSource(imgs, labels, s, limit))
        return out
    raise SourceError(f"--source {kind!r}: unknown (choose folder or fashion-mnist)")
