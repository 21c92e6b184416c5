#!/usr/bin/env python
"""Cache a dataset as LMDB: real image or VAE posterior, edge map, label per sample.

    python preprocess/cache.py --input data/afhq_v2_raw --output data/afhq_v2 --image-size 256 \\
        --codec sd-vae --vae stabilityai/sd-vae-ft-mse --edges pidinet
    torchrun --nproc_per_node 8 preprocess/cache.py ...          # same, sharded over processes
    python preprocess/cache.py --source fashion-mnist --output data/fashion --image-size 32 \\
        --codec pixel --edges canny
    python preprocess/cache.py --inspect data/afhq_v2/train       # metadata + a PNG grid

Each split becomes its own LMDB folder ``OUT/<split>`` (format: meanflow/records.py).
Writes are transactions of one batch, so a run killed at any moment and started again
skips what is already stored and finishes with no duplicate or torn record; the metadata
record (key list, counts) is rebuilt at the end of every run. Files that cannot be used
(corrupt, truncated, not an image, too small, decompression bombs) are skipped and listed
with the reason in ``OUT/<split>/report.json``. Several processes (RANK / WORLD_SIZE from
torchrun or accelerate) shard the file list and write into the same environments; LMDB
serialises their write transactions.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                    # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import lmdb  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from meanflow.atomic import write_text_atomic  # noqa: E402
from meanflow.codec import VAE_DTYPES, CodecError, PixelCodec, VAECodec  # noqa: E402
from meanflow.distributed import (LaunchError, init_gloo, launcher_rank_world,  # noqa: E402
                                  progress)
from meanflow.edges import (ANNOTATORS_ID, CANNY_HIGH, CANNY_LOW, DEFAULTS,  # noqa: E402
                            EdgeConfigError, EdgeDetector, build_detector, looks_like_path)
from meanflow.images import prepare_image  # noqa: E402
from meanflow.records import (CODECS, DETECTORS, FAILED_PREFIX, FORMAT,  # noqa: E402
                              FORMAT_VERSION, META_KEY, RESERVED_PREFIX, commit_batch,
                              decode_meta, encode_meta, encode_record, key_category, key_part,
                              open_writer, write_txn)
from preprocess.sources import Item, Source, SourceError, open_sources  # noqa: E402

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
SETTINGS_KEY = "__settings__"       # what the records were made with; a rerun must match
REPORT = "report.json"
MIB = 1 << 20
MIN_MAP_SIZE = 8 * MIB
MAP_SIZE_SLACK = 1.5                # headroom over the estimated data size
RECORD_OVERHEAD = 512               # safetensors header + LMDB node, bytes per record


class UsageError(ValueError):
    """Bad arguments or output location: reported in one line before any work."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the culprit, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = _OneLineParser(prog="preprocess/cache.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("source")
    src.add_argument("--input", type=Path, help="image folder ROOT/<split>/<category>/<image>")
    src.add_argument("--source", default="folder", choices=("folder", "fashion-mnist"))
    src.add_argument("--fashion-root", type=Path, default=None,
                     help="folder with the Fashion-MNIST IDX files (default: the Debian "
                          "package's /usr/share/datasets/fashion-mnist)")
    src.add_argument("--download", action="store_true",
                     help="fetch missing Fashion-MNIST files with torchvision")
    src.add_argument("--splits", type=lambda s: [p for p in s.split(",") if p], default=None,
                     help="comma-separated splits (default: all)")
    src.add_argument("--limit", type=int, default=None, help="first N samples of each split")
    src.add_argument("--max-pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
                     help="larger images are rejected as decompression bombs")
    img = ap.add_argument_group("image and codec")
    img.add_argument("--output", type=Path, help="output folder; one LMDB per split inside")
    img.add_argument("--image-size", type=int, default=256)
    img.add_argument("--channels", type=int, choices=(1, 3), default=None,
                     help="1 = greyscale (default for fashion-mnist), 3 = RGB")
    img.add_argument("--codec", default="pixel", choices=CODECS,
                     help="pixel: the image, uint8 (default); sd-vae: AutoencoderKL posterior")
    img.add_argument("--vae", default=DEFAULT_VAE, help="hub id or local folder of an "
                     "AutoencoderKL (diffusers); a pipeline folder's vae/ subfolder also works")
    img.add_argument("--vae-dtype", default="fp32", choices=tuple(VAE_DTYPES))
    img.add_argument("--store-images", default="auto", choices=("auto", "always", "never"),
                     help="VAE codecs: also store the real image (auto: every split but train)")
    img.add_argument("--batch-size", type=int, default=32)
    img.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available")
    img.add_argument("--workers", type=int, default=0,
                     help="processes decoding images (and running Canny) in parallel")
    img.add_argument("--map-size", type=int, default=None,
                     help="initial LMDB map size in bytes (default: estimated; it doubles "
                          "whenever full)")
    edg = ap.add_argument_group("edges")
    edg.add_argument("--edges", default="canny", choices=DETECTORS,
                     help="edge detector for the condition maps (default canny)")
    edg.add_argument("--edge-size", type=int, default=None, help="default: --image-size")
    edg.add_argument("--edge-levels", type=int, default=None,
                     help="grey levels kept (2 = binary, packed bits); default: "
                          + ", ".join(f"{k} {v['levels']}" for k, v in DEFAULTS.items()))
    edg.add_argument("--edge-close", type=int, default=None,
                     help="morphological closing kernel (0 = off); default: "
                          + ", ".join(f"{k} {v['close']}" for k, v in DEFAULTS.items()))
    edg.add_argument("--canny-low", type=float, default=CANNY_LOW)
    edg.add_argument("--canny-high", type=float, default=CANNY_HIGH,
                     help="Canny hysteresis thresholds on the L2 gradient; 100/200 suit both "
                          "32x32 Fashion-MNIST and 256x256 photos (see meanflow/edges.py)")
    edg.add_argument("--canny-sigma", type=float, default=None,
                     help="Gaussian pre-blur (default: edge size / 256; none below 0.5)")
    edg.add_argument("--annotators", default=ANNOTATORS_ID,
                     help="hub id or local folder holding table5_pidinet.pth / "
                          "ControlNetHED.pth")
    edg.add_argument("--no-safe", dest="safe", action="store_false",
                     help="PiDiNet / HED without controlnet-aux's safe-mode quantisation")
    ins = ap.add_argument_group("inspect")
    ins.add_argument("--inspect", type=Path, default=None, metavar="SPLIT_DIR",
                     help="print a cached split's metadata and write a PNG grid")
    ins.add_argument("--inspect-n", type=int, default=8)
    ins.add_argument("--inspect-out", type=Path, default=None,
                     help="default: SPLIT_DIR/inspect.png")
    args = ap.parse_args(argv)
    if args.inspect is None and args.output is None:
        ap.error("--output is required (or --inspect SPLIT_DIR)")
    for name in ("image_size", "batch_size", "inspect_n"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.edge_size is not None and args.edge_size < 1:
        ap.error(f"--edge-size must be >= 1, got {args.edge_size}")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if args.channels is None:
        args.channels = 1 if args.source == "fashion-mnist" else 3
    if args.edge_size is None:
        args.edge_size = args.image_size
    if args.codec != "pixel" and args.channels != 3:
        ap.error(f"--codec {args.codec} encodes RGB images: it needs --channels 3, got "
                 f"{args.channels}")
    return args


def preflight_paths(args: argparse.Namespace) -> None:
    """Local model folders that do not exist are reported before torch / diffusers load."""
    if args.codec != "pixel" and not Path(args.vae).is_dir() and looks_like_path(args.vae):
        raise UsageError(f"--vae {args.vae}: no such folder")
    if (args.edges in ("pidinet", "hed") and not Path(args.annotators).is_dir()
            and looks_like_path(args.annotators)):
        raise UsageError(f"--annotators {args.annotators}: no such folder")


def check_output(out: Path) -> None:
    """The output folder exists (or can be made) and accepts files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--output {out}: not writable ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------------
# Codec (meanflow/codec.py)
# --------------------------------------------------------------------------------------------
def build_codec(args: argparse.Namespace, device: str):
    if args.codec == "pixel":
        return PixelCodec(args.image_size, args.channels)
    return VAECodec(args.vae, args.image_size, device, args.vae_dtype)


# --------------------------------------------------------------------------------------------
# Per-sample preparation (runs in decode workers when --workers > 0)
# --------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    item: Item
    image: Optional[np.ndarray] = None      # uint8 [S, S, C]
    edge_src: Optional[np.ndarray] = None   # uint8 [Se, Se, C]: detector input
    edge: Optional[np.ndarray] = None       # uint8 [1, Se, Se]
    error: Optional[str] = None


def prepare(src: Source, item: Item, args: argparse.Namespace,
            cpu_detector: Optional[EdgeDetector]) -> Prepared:
    """Decode, convert, crop one sample (+ CPU edges). Never raises: errors become reasons."""
    out = Prepared(item)
    try:
        img = src.open(item, args.max_pixels)
        min_side = None
        if src.min_side_fraction is not None:
            min_side = math.ceil(max(args.image_size, args.edge_size) * src.min_side_fraction)
        out.image = prepare_image(img, args.image_size, args.channels, min_side)
        if args.edges != "none":
            out.edge_src = (out.image if args.edge_size == args.image_size
                            else prepare_image(img, args.edge_size, args.channels))
            if cpu_detector is not None:
                out.edge = cpu_detector(out.edge_src)
                out.edge_src = None
    except Exception as e:  # noqa: BLE001 - any failure of one file is that file's problem
        out.image = out.edge_src = out.edge = None
        out.error = f"{type(e).__name__}: {e}"
    return out


_WORKER: dict[str, Any] = {}   # set in the parent before the decode pool forks


def _prepare_task(task: tuple[int, Item]) -> Prepared:
    split_idx, item = task
    return prepare(_WORKER["sources"][split_idx], item, _WORKER["args"], _WORKER["detector"])


# --------------------------------------------------------------------------------------------
# LMDB writing
# --------------------------------------------------------------------------------------------
def finished_split(path: Path, settings: dict[str, Any], src: Source,
                   limit: Optional[int]) -> Optional[dict]:
    """The metadata of ``path`` if it already holds every record of ``src``, made with
    ``settings`` and with no failure to retry; else None. Looked at read-only: a rerun on a
    finished split writes nothing (opening it for writing would also grow its map under
    readers such as a training run's DataLoader workers)."""
    if not (path / "data.mdb").is_file():
        return None
    env = lmdb.open(str(path), readonly=True, subdir=True, max_readers=256)
    try:
        with env.begin() as txn:
            stored, raw = txn.get(SETTINGS_KEY.encode()), txn.get(META_KEY.encode())
            if stored is None or raw is None or json.loads(stored) != json.loads(
                    json.dumps(settings, sort_keys=True)):
                return None
            meta = decode_meta(raw, str(path))
    finally:
        env.close()
    done = (meta.get("complete") and meta.get("num_failed") == 0
            and (meta.get("source") or {}).get("limit") == limit
            and set(meta.get("keys", ())) == {it.key for it in src.items})
    return meta if done else None


def existing_sample_keys(env: lmdb.Environment) -> set[str]:
    with env.begin() as txn:
        return {k.decode() for k in txn.cursor().iternext(keys=True, values=False)
                if not k.startswith(RESERVED_PREFIX.encode())}


def ensure_settings(env: lmdb.Environment, settings: dict[str, Any], where: Path) -> None:
    """Store the record-defining settings on first use; refuse to mix in a rerun that differs."""
    blob = json.dumps(settings, sort_keys=True).encode()

    def fn(txn):
        old = txn.get(SETTINGS_KEY.encode())
        if old is None:
            txn.put(SETTINGS_KEY.encode(), blob)
            return None
        return json.loads(old)

    old = write_txn(env, fn)
    if old is not None and old != json.loads(blob):
        new = json.loads(blob)
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        diff.sort(key=lambda k: isinstance(old.get(k, new.get(k)), (dict, list)))  # scalars first
        text = "; ".join(f"{k}={old.get(k)!r} there, {k}={new.get(k)!r} now" for k in diff)
        raise UsageError(f"{where} was written with other settings ({text}): use another "
                         f"--output or delete {where}")


@dataclass
class Counts:
    written: int = 0
    present: int = 0
    failed: int = 0

    def as_list(self) -> list[int]:
        return [self.written, self.present, self.failed]


def process_split(env: lmdb.Environment, split_idx: int, src: Source, args, codec,
                  detector: Optional[EdgeDetector], pool, rank: int, world: int) -> Counts:
    mine = src.items[rank::world]
    have = existing_sample_keys(env)
    pending = [it for it in mine if it.key not in have]
    counts = Counts(present=len(mine) - len(pending))
    cpu_detector = detector if detector is not None and not detector.device_bound else None
    store_image = codec.name == "pixel" or args.store_images == "always" or (
        args.store_images == "auto" and src.split != "train")
    bar = progress(len(pending), src.split, main=rank == 0, mininterval=None)
    for lo in range(0, len(pending), args.batch_size):
        batch = pending[lo: lo + args.batch_size]
        if pool is not None:
            prepared = pool.map(_prepare_task, [(split_idx, it) for it in batch], chunksize=4)
        else:
            prepared = [prepare(src, it, args, cpu_detector) for it in batch]
        ok = [p for p in prepared if p.error is None]
        if detector is not None and detector.device_bound:
            for p in ok:
                try:
                    p.edge = detector(p.edge_src)
                except Exception as e:  # noqa: BLE001
                    p.error = f"edge detector: {type(e).__name__}: {e}"
                p.edge_src = None
            ok = [p for p in ok if p.error is None]
        latents = codec.encode([p.image for p in ok]) if ok else []
        good, bad = [], []
        for p, lat in zip(ok, latents):
            if lat is None:
                p.error = "VAE produced non-finite values (try --vae-dtype fp32)"
                continue
            good.append((p.item.key, _builder(p, lat, store_image, detector)))
        for p in prepared:
            if p.error is not None:
                bad.append((p.item.key, {"source": p.item.origin, "reason": p.error}))
        written, present = commit_batch(env, good, bad)
        counts.written += written
        counts.present += present
        counts.failed += len(bad)
        bar.update(len(batch))
    bar.close()
    return counts


def _builder(p: Prepared, lat: dict, store_image: bool,
             detector: Optional[EdgeDetector]) -> Callable[[], bytes]:
    def build() -> bytes:
        return encode_record(p.item.label, image=p.image if store_image else None,
                             mean=lat.get("mean"), std=lat.get("std"), edge=p.edge,
                             edge_levels=detector.levels if detector is not None else 2)
    return build


# --------------------------------------------------------------------------------------------
# Metadata and report
# --------------------------------------------------------------------------------------------
def finalize(env: lmdb.Environment, src: Source, settings: dict[str, Any], last_run: Counts,
             report_path: Path, limit: Optional[int] = None) -> tuple[dict, dict]:
    """Rebuild the metadata record from what the database holds and write the report file,
    both inside one write transaction: it sees every batch any process committed before it,
    and processes finalising concurrently take turns, so the last one leaves the complete
    metadata and the matching report. Returns (meta, report)."""
    source = {k: v for k, v in src.description.items() if k != "split"}
    source["limit"] = limit
    label_of = {key_part(n): i for i, n in enumerate(src.class_names)}
    expected = {it.key for it in src.items}

    def fn(txn):
        keys, failed = [], []
        for k in txn.cursor().iternext(keys=True, values=False):
            ks = k.decode()
            if ks.startswith(FAILED_PREFIX):
                failed.append({"key": ks[len(FAILED_PREFIX):], **json.loads(txn.get(k))})
            elif not ks.startswith(RESERVED_PREFIX):
                keys.append(ks)
        labels = []
        for ks in keys:
            cat = key_category(ks)
            if cat not in label_of:
                raise UsageError(f"{ks}: category {cat!r} is not among {src.class_names}")
            labels.append(label_of[cat])
        done = set(keys) | {f["key"] for f in failed}
        missing = len(expected - done)
        meta = dict(settings)
        meta.update(source=source, num_records=len(keys), num_failed=len(failed),
                    num_expected=len(expected), complete=missing == 0, keys=keys, labels=labels)
        txn.put(META_KEY.encode(), encode_meta(meta))
        report = {"split": src.split, "num_records": len(keys), "num_failed": len(failed),
                  "num_missing": missing, "complete": missing == 0,
                  "last_run": {"written": last_run.written,
                               "already_present": last_run.present,
                               "failed": last_run.failed},
                  "failed": failed}
        write_json_atomic(report_path, report)          # still holding the write lock
        return meta, report

    return write_txn(env, fn)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def split_settings(src: Source, args, codec, detector: Optional[EdgeDetector]) -> dict[str, Any]:
    """Everything that defines the records of a split (the metadata minus counts and keys)."""
    s: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "split": src.split,
                         "source_type": src.kind, "image_size": args.image_size,
                         "channels": args.channels, "class_names": list(src.class_names)}
    s.update(codec.describe())
    s["images_stored"] = codec.name == "pixel" or args.store_images == "always" or (
        args.store_images == "auto" and src.split != "train")
    s.update(edges=args.edges,
             edge_size=args.edge_size if detector is not None else 0,
             edge_channels=1 if detector is not None else 0,
             edge_levels=detector.levels if detector is not None else 0,
             edge_settings=detector.settings() if detector is not None else {})
    return s


# --------------------------------------------------------------------------------------------
# Inspect
# --------------------------------------------------------------------------------------------
def inspect(path: Path, n: int, out: Optional[Path]) -> int:
    """Print a split's metadata and write a grid: one row per record, real image (or the
    latent mean's first 3 channels) | edge map."""
    if not (path / "data.mdb").is_file():
        what = "no such folder" if not path.exists() else "no data.mdb in it"
        print(f"error: --inspect {path}: {what}", file=sys.stderr)
        return 2
    from meanflow.data import LMDBDataset, read_meta

    try:
        meta = read_meta(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show = {k: v for k, v in meta.items() if k not in ("keys", "labels")}
    show["first_keys"] = meta["keys"][:5]
    print(json.dumps(show, indent=1))
    ds = LMDBDataset(path, flip=False, use_edges=False, use_labels=False,
                     sample_posterior=False, allow_incomplete=True)
    size = int(meta["image_size"])
    rows = []
    for i in range(min(n, len(ds))):
        rec = ds.record(i)
        if "image" in rec:
            img = rec["image"]
        else:
            lat = rec["mean"][0, :3].astype(np.float32)                     # [3, h, w]
            lo = lat.min(axis=(1, 2), keepdims=True)
            hi = lat.max(axis=(1, 2), keepdims=True)
            lat = ((lat - lo) / np.maximum(hi - lo, 1e-6) * 255).astype(np.uint8)
            rep = size // lat.shape[1]
            img = np.kron(lat.transpose(1, 2, 0), np.ones((rep, rep, 1), np.uint8))
        img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
        tiles = [img]
        if meta["edges"] != "none":
            e = (ds.edge_map(i)[0] * 255).astype(np.uint8)
            e = np.asarray(Image.fromarray(e).resize((size, size), Image.NEAREST))
            tiles.append(np.repeat(e[..., None], 3, axis=2))
        rows.append(np.concatenate(tiles, axis=1))
    ds.close()
    grid = np.concatenate(rows, axis=0)
    out = out or path / "inspect.png"
    Image.fromarray(grid).save(out)
    print(f"wrote {out} ({len(rows)} records: image | edge)")
    return 0


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.inspect is not None:
        return inspect(args.inspect, args.inspect_n, args.inspect_out)
    pool = None
    made_output = args.output is not None and not args.output.exists()
    try:
        rank, world = launcher_rank_world()
        sources = open_sources(args.source, input_root=args.input,
                               fashion_root=args.fashion_root, splits=args.splits,
                               limit=args.limit, download=args.download)
        check_output(args.output)
        preflight_paths(args)
        # Canny is configured (and validated) before the decode pool forks, which in turn
        # happens before any model or CUDA context exists.
        cpu_detector = (build_detector("canny", args.edge_size, levels=args.edge_levels,
                                       close=args.edge_close, canny_low=args.canny_low,
                                       canny_high=args.canny_high,
                                       canny_sigma=args.canny_sigma)
                        if args.edges == "canny" else None)
        if args.workers > 0:
            import multiprocessing as mp
            _WORKER.update(sources=sources, args=args, detector=cpu_detector)
            pool = mp.get_context("fork").Pool(args.workers)
        needs_torch = args.codec != "pixel" or args.edges in ("pidinet", "hed")
        if needs_torch:
            from meanflow.runtime import process_device   # imports torch: only when needed
            device = str(process_device(args.device))
        else:
            device = "cpu"
        codec = build_codec(args, device)
        detector = cpu_detector
        if args.edges in ("pidinet", "hed"):
            detector = build_detector(args.edges, args.edge_size, levels=args.edge_levels,
                                      close=args.edge_close, annotators=args.annotators,
                                      safe=args.safe, device=device)
        settings = [split_settings(s, args, codec, detector) for s in sources]
        est = [len(s.items) * (codec.record_bytes() + RECORD_OVERHEAD
                               + (args.image_size ** 2 * args.channels)
                               + (args.edge_size ** 2 if detector is not None else 0))
               for s in sources]
        done_splits = [finished_split(args.output / s.split, st, s, args.limit)
                       for s, st in zip(sources, settings)]
        for s, st, done in zip(sources, settings, done_splits):
            if done is not None:
                continue
            # refuse a mismatched rerun up front
            env = open_writer(args.output / s.split, MIN_MAP_SIZE)
            try:
                ensure_settings(env, st, args.output / s.split)
            finally:
                env.close()
    except (UsageError, SourceError, EdgeConfigError, LaunchError, CodecError) as e:
        if pool is not None:
            pool.terminate()
        if made_output:                 # leave no empty output folder behind
            try:
                args.output.rmdir()
            except OSError:
                pass
        print(f"error: {e}", file=sys.stderr)
        return 2

    dist = init_gloo(rank, world)        # for the end-of-run summary
    ok = False
    try:
        for i, (src, st, nbytes, done) in enumerate(zip(sources, settings, est, done_splits)):
            out = args.output / src.split
            if done is not None:
                if dist is None or rank == 0:
                    print(f"{src.split}: {done['num_records']} records in {out}: complete, "
                          f"nothing to do", flush=True)
                continue
            map_size = args.map_size or max(MIN_MAP_SIZE, int(nbytes * MAP_SIZE_SLACK))
            env = open_writer(out, map_size)
            try:
                counts = process_split(env, i, src, args, codec, detector, pool, rank, world)
                total = counts
                if dist is not None:
                    import torch
                    t = torch.tensor(counts.as_list(), dtype=torch.int64)
                    dist.all_reduce(t)
                    total = Counts(*t.tolist())
                    dist.barrier()                   # every rank's batches are committed
                if dist is None or rank == 0:
                    meta, report = finalize(env, src, st, total, out / REPORT, args.limit)
                    who = f"[rank {rank}/{world}] " if world > 1 and dist is None else ""
                    state = "" if meta["complete"] else (
                        f"; INCOMPLETE: {report['num_missing']} not processed yet")
                    print(f"{who}{src.split}: {meta['num_records']} records in {out} "
                          f"(written {total.written}, already present {total.present}, "
                          f"failed {total.failed}; report {out / REPORT}){state}", flush=True)
            finally:
                env.close()
        ok = True
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if dist is not None:
            if ok:                     # after a failure the other ranks may never get here
                dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
