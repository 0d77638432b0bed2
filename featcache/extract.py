"""Extraction: run a frozen backbone once over a source and commit its features to the store.

Decoding, hashing and resizing run in DataLoader workers while the backbone computes; shards are
committed in source order, so a killed run resumes with exactly the batches it would have run.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import timm
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .backbones import LoadedBackbone, load_backbone
from .engines import Forward
from .errors import CacheError, FeatcacheError
from .hashing import stable_hash
from .images import Preprocess, apply_view, views_for
from .options import DEVICE_PATTERN, Dtype, Engine, Precision
from .preprocessing import DATASET_NORM
from .progress import Reporter
from .sources import ImageRecord, ImageSource
from .store import (
    ENTRY_KEYS,
    MANIFEST,
    SHARD_GLOB,
    CacheEntry,
    EntryLock,
    ShardRows,
    default_cache_root,
    fingerprint,
    norm_stats_path,
    read_norm_stats,
    rebuild_manifest,
    remove_temporaries,
    shard_summary,
    write_json_atomic,
    write_shard,
)

if TYPE_CHECKING:
    from .cluster import RayCluster

DTYPES = tuple(d.value for d in Dtype)
PRECISIONS = tuple(p.value for p in Precision)


class ExtractionInterrupted(FeatcacheError):
    """Ctrl-C / SIGTERM: committed shards are kept; a rerun resumes."""


@dataclass
class ExtractResult:
    entry: CacheEntry
    extracted: int
    skipped: int
    failed: dict[str, str]
    seconds: float
    notes: list[str] = field(default_factory=list)
    reused: int = 0  # images whose features came from another entry with the same fingerprint

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        reused = f"{self.reused} reused from other entries, " if self.reused else ""
        return (f"{self.extracted} extracted ({self.images_per_second:.1f} images/s), {reused}"
                f"{self.skipped} already cached, {len(self.failed)} failed -> {self.entry.path}")


def file_state(record: ImageRecord) -> tuple[int, int]:
    """(size, mtime_ns) of the record's file; (-1, -1) when it does not exist."""
    try:
        st = os.stat(record.path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def read_record(record: ImageRecord, npz_cache: dict) -> tuple[bytes | np.ndarray, str]:
    """The record's raw content and its SHA-256 (of the file bytes, or of the array for .npz)."""
    if record.npz_key is None:
        data = Path(record.path).read_bytes()
        return data, hashlib.sha256(data).hexdigest()
    key, index = record.npz_key
    arrays = npz_cache.setdefault(str(record.path), np.load(record.path, allow_pickle=False))
    pixels = np.ascontiguousarray(arrays[key][index])
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode() + pixels.tobytes())
    return pixels, digest.hexdigest()


class _ImageDataset(Dataset):
    """Reads, hashes, decodes and resizes one image; failures come back as a reason string."""

    def __init__(self, records: list[ImageRecord], preprocess: Preprocess):
        self.records, self.preprocess = records, preprocess
        self._npz: dict = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        size, mtime = file_state(record)
        item = {"index": i, "size": size, "mtime": mtime, "sha": "", "image": None, "error": None}
        if size < 0:
            item["error"] = f"file not found: {record.path}"
            return item
        try:
            content, item["sha"] = read_record(record, self._npz)
            item["image"] = self.preprocess.load(content)
        except (ValueError, OSError, KeyError) as exc:
            item["error"] = f"{exc} ({record.path})"
        return item


def _collate(items: list[dict]) -> dict:
    ok = [it for it in items if it["image"] is not None]
    images = torch.stack([it["image"] for it in ok]) if ok else None
    # Only the stacked batch crosses to the main process: each tensor left in the items would cost
    # its own shared-memory handshake (a socket connect per image, 20 % of the main process's time).
    items = [{**it, "image": None} for it in items]
    return {"items": items, "images": images, "ok": [it["index"] for it in ok]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the backbone's threads


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device; anything else, or a CUDA device
    this machine does not have, is an error that says what to use."""
    if not DEVICE_PATTERN.match(str(device)):
        raise FeatcacheError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise FeatcacheError(f"--device {device}: this machine has {count} CUDA device(s); "
                                 "use --device cpu (or auto)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def entry_path(cache_root: Path, dataset: str, backbone: str, fp: str) -> Path:
    return Path(cache_root) / dataset / f"{backbone.replace(':', '-')}-{fp}"


def fingerprint_inputs(backbone: LoadedBackbone, dtype: str, precision: str, views: int = 1,
                       engine: str = "torch") -> dict:
    inputs = {"backbone": backbone.spec.name, "weights_sha256": backbone.weights_sha256,
              "preprocess": backbone.preprocess.to_dict(), "pools": sorted(backbone.model.pools),
              "dtype": dtype, "precision": precision}
    if views > 1:  # only when used, so entries made before --views keep their names
        inputs["views"] = views
    if engine != "torch":  # likewise: PyTorch entries keep their names
        inputs["engine"] = engine
    return inputs


def provenance(device: torch.device, origin: str) -> dict:
    return {"featcache": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "host": platform.node(), "weights_origin": origin,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def plan(source: ImageSource, entry_dir: Path) -> tuple[list[ImageRecord], int]:
    """Records still to extract: not in the store, or whose file changed since it was stored."""
    if not (entry_dir / MANIFEST).exists():
        return list(source.records), 0
    state = CacheEntry(entry_dir).state()
    todo, npz_cache = [], {}
    for record in source.records:
        known = state.get(record.id)
        if known is None:
            todo.append(record)
            continue
        if (known.size, known.mtime_ns) == file_state(record):
            continue
        try:  # touched but maybe unchanged (copied, re-saved): compare the content hash
            unchanged = read_record(record, npz_cache)[1] == known.sha256
        except (OSError, ValueError, KeyError):
            unchanged = False
        if not unchanged:
            todo.append(record)
    return todo, len(source.records) - len(todo)


def extract(
    source: ImageSource,
    backbone: str | LoadedBackbone,
    cache_root: str | os.PathLike | None = None,
    pools: tuple[str, ...] | None = None,
    dtype: str = "float16",
    weights: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    shard_size: int = 1024,
    device: str = "auto",
    precision: str = "auto",
    jpeg_draft: bool = True,
    input_size: int | None = None,
    views: int = 1,
    resize: str = "crop",
    break_lock: bool = False,
    reporter: Reporter | None = None,
    engine: str = "auto",
    preprocess: tuple[str, ...] | str = (),
    resampler: str = "pil",
    norm_from: str | dict | None = None,
    cluster: RayCluster | None = None,
) -> ExtractResult:
    """Extract features of every image in ``source`` into the cache (resuming where it stopped).

    ``views``: 1, 2, 4 or 8 views per image (:data:`featcache.images.VIEWS`: flips and quarter turns
    of the preprocessed square), stored as an extra axis: features are ``(n, views, dim)``.
    ``resize``: ``crop`` (the backbone's resize + centre crop), ``full`` or ``pad`` (whole image).
    ``engine``: ``auto`` (the engine measured fastest for the backbone on the CPU, PyTorch on CUDA),
    ``torch``, ``onnxruntime`` or ``openvino`` (:mod:`featcache.engines`).
    ``resampler``: ``pil`` (the backbone's eval transform, bit for bit) or ``torch`` (faster, its own
    fingerprint; :class:`featcache.images.Preprocess`).
    ``preprocess``: image filters before the backbone's transform (:mod:`featcache.preprocessing`).
    ``norm_from``: with ``dataset-norm``, the dataset (cache name, folder or CSV) whose statistics
    normalise these images, e.g. the training set for a test set, or the statistics themselves (a dict
    with ``mean``, ``std``, ``dataset``, ``images``); default: this dataset's own.
    ``cluster``: run on Ray (:mod:`featcache.cluster`); the features and the entry are the local path's.
    """
    dtype, precision = (value.value if isinstance(value, Enum) else value for value in (dtype, precision))
    if dtype not in DTYPES:
        raise FeatcacheError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        raise FeatcacheError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    reporter = reporter or Reporter(quiet=True)
    dev = resolve_device(device) if cluster is None else cluster.device(device)
    if precision not in ("auto", "fp32") and dev.type != "cuda":
        reporter.warn(f"--precision {precision} applies on CUDA only; on {dev.type} features are computed "
                      "in fp32 (and the entry is named so)")
    # on a cluster the actors run the model on their own device; the driver's copy names the entry
    precision = resolve_precision(precision, dev) if cluster is None else cluster.precision(precision, dev)
    model = backbone if isinstance(backbone, LoadedBackbone) else \
        load_backbone(backbone, weights=weights, pools=pools, device=dev if cluster is None else "cpu")
    view_names = _checked_views(views)
    configure_preprocess(model, resize, jpeg_draft, input_size, preprocess, resampler)
    root = Path(cache_root or default_cache_root())
    norm = _apply_dataset_norm(model, source, root, norm_from, workers, reporter)
    engine = _resolved_engine(engine, model, dev, reporter)
    inputs = fingerprint_inputs(model, dtype, precision, views, engine)
    fp = fingerprint(inputs)
    entry_dir = entry_path(root, source.name, model.spec.name, fp)
    if not _writable(entry_dir):
        return _read_only_result(source, entry_dir)

    with EntryLock(entry_dir, break_lock=break_lock):
        removed = remove_temporaries(entry_dir)
        if removed:
            reporter.info(f"removed {len(removed)} unfinished file(s) of an interrupted run")
        if not (entry_dir / MANIFEST).exists() and any(entry_dir.glob(SHARD_GLOB)):
            # its shards are still the truth: without this, every image would be extracted again
            rebuild_manifest(entry_dir)
            reporter.warn(f"{entry_dir / MANIFEST} was missing; rebuilt it from the shards")
        todo, skipped = plan(source, entry_dir)
        manifest = {
            "fingerprint": fp, "fingerprint_inputs": inputs, "format_version": 1,
            "dataset": source.name, "source": str(Path(source.location).resolve()),
            "source_kind": source.kind, "backbone": model.spec.name, "pools": list(model.model.pools),
            "dims": model.dims, "dtype": dtype, "provenance": provenance(dev, model.weights_origin),
            "views": list(view_names),
        }
        if norm:
            manifest["dataset_norm"] = norm
        if cluster is not None:
            manifest["provenance"]["cluster"] = cluster.describe()
        if skipped:
            reporter.info(f"{skipped} of {len(source.records)} images already in the cache: "
                          f"extracting the other {len(todo)}")
        start = time.perf_counter()
        try:
            if not (entry_dir / MANIFEST).exists():
                write_json_atomic(entry_dir / MANIFEST, {**manifest, "complete": False})
            todo, reused = reuse_known_images(todo, entry_dir, manifest, model.dims, shard_size, reporter)
            extracted = _run(todo, model, entry_dir, dev, precision, dtype, batch_size, workers,
                             shard_size, manifest, view_names, reporter, engine, root, cluster)
            entry = _write_manifest(entry_dir, manifest, source, complete=True)
        except OSError as exc:  # disk full, drive gone, quota: what was committed stays valid
            raise CacheError(
                f"writing to {entry_dir} failed ({exc}); shards committed before the failure are "
                "kept: free space or fix the drive, then rerun the same command to resume") from None
        seconds = time.perf_counter() - start
    return ExtractResult(entry, extracted, skipped, entry.failed, seconds, list(source.notes), reused)


def reuse_known_images(todo: list[ImageRecord], entry_dir: Path, manifest: dict, dims: dict[str, int],
                       shard_size: int, reporter: Reporter) -> tuple[list[ImageRecord], int]:
    """Commit, without running the backbone, the images of ``todo`` whose file (same SHA-256) already
    has features under the same fingerprint in another entry of the cache (another dataset name: a
    moved, relabelled or subset CSV). Returns the images still to extract and how many were reused.
    The features are copied byte for byte, so they equal a fresh extraction's."""
    others = [CacheEntry(p) for p in sorted(entry_dir.parent.parent.glob(f"*/*-{manifest['fingerprint']}"))
              if p != entry_dir and (p / MANIFEST).is_file()]
    if not todo or not others:
        return todo, 0
    known: dict[str, tuple[CacheEntry, str]] = {}
    for other in others:
        for image_id, state in other.state().items():
            if state.failed is None:
                known.setdefault(state.sha256, (other, image_id))
    hits, rest, npz_cache = [], [], {}
    for record in todo:
        try:
            sha = read_record(record, npz_cache)[1]
        except (OSError, ValueError, KeyError):  # the extraction itself reports unreadable files
            rest.append(record)
            continue
        if sha in known:
            hits.append((record, sha, *known[sha]))
        else:
            rest.append(record)
    if not hits:
        return todo, 0
    sink = ShardSink(entry_dir, manifest, dims, shard_size)
    for start in range(0, len(hits), shard_size):
        chunk = hits[start:start + shard_size]
        features: dict[tuple[Path, str], dict[str, np.ndarray]] = {}
        for other in {id(h[2]): h[2] for h in chunk}.values():
            wanted = [h[3] for h in chunk if h[2] is other]
            arrays = {p: other.read(p, wanted, dtype=manifest["dtype"]) for p in sink.pools}
            for k, image_id in enumerate(wanted):
                features[(other.path, image_id)] = {p: arrays[p][k] for p in sink.pools}
        for record, sha, other, image_id in chunk:
            size, mtime = file_state(record)
            sink.add(record.id, sha, size, mtime, features[(other.path, image_id)])
        sink.commit()
    sources = ", ".join(sorted({h[2].path.parent.name for h in hits}))
    reporter.info(f"{len(hits)} images reused from other entries with the same fingerprint ({sources}): "
                  "same file contents, features copied, not recomputed")
    return rest, len(hits)


def configure_preprocess(model: LoadedBackbone, resize: str = "crop", jpeg_draft: bool = True,
                         input_size: int | None = None, filters: tuple[str, ...] | str = (),
                         resampler: str = "pil") -> None:
    """Apply --resize, --no-jpeg-draft, --input-size, --preprocess and --resampler to the backbone's own
    preprocessing."""
    changes: dict = {} if jpeg_draft else {"jpeg_draft": False}
    if filters:
        changes["filters"] = filters
    resampler = str(getattr(resampler, "value", resampler))
    if resampler != model.preprocess.resampler:
        changes["resampler"] = resampler
    if resize != model.preprocess.resize_mode:
        changes["resize_mode"] = resize
    if input_size and input_size != model.preprocess.crop_size:  # keep the resize/crop ratio at the new size
        ratio = model.preprocess.resize_size / model.preprocess.crop_size
        changes |= {"crop_size": input_size, "resize_size": int(input_size * ratio)}
    if changes:
        try:  # Preprocess checks the values (an unknown --resize) and says what to use
            model.preprocess = Preprocess(**{**model.preprocess.to_dict(), **changes})
        except ValueError as exc:
            raise FeatcacheError(str(exc)) from None


def _preprocess_key(preprocess: Preprocess) -> dict:
    """The preprocessing that dataset-norm statistics depend on: everything but the mean and std."""
    return {k: v for k, v in preprocess.to_dict().items() if k not in ("mean", "std")}


def _apply_dataset_norm(model: LoadedBackbone, source: ImageSource, cache_root: Path,
                        norm_from: str | dict | None, workers: int | None, reporter: Reporter) -> dict | None:
    """With --preprocess dataset-norm, put the dataset's channel mean and std into the preprocessing
    (so into the fingerprint); return what the manifest records of where they came from."""
    if DATASET_NORM not in model.preprocess.filters:
        if norm_from:
            raise FeatcacheError(f"--norm-from {norm_from}: only with --preprocess ...,{DATASET_NORM}")
        return None
    if isinstance(norm_from, dict):  # the exact statistics of an entry (extract_like)
        stats = norm_from
    elif norm_from:
        stats = stored_norm_stats(cache_root, norm_from, model.preprocess)
    else:
        stats = dataset_norm_stats(source, model.preprocess, cache_root, workers, reporter)
    model.preprocess = replace(model.preprocess, mean=tuple(stats["mean"]), std=tuple(stats["std"]))
    return {"from": stats["dataset"], "images": stats["images"]}


def stored_norm_stats(cache_root: Path, dataset: str, preprocess: Preprocess) -> dict:
    """The dataset-norm statistics of another dataset (``--norm-from``): a cache dataset name, or the
    folder / CSV it was read from."""
    name = dataset
    if Path(dataset).exists():
        from .sources import open_source

        name = open_source(dataset).name
    found = read_norm_stats(cache_root, name, _preprocess_key(preprocess))
    if not found:
        raise FeatcacheError(f"--norm-from {dataset}: no {DATASET_NORM} statistics of {name!r} for this "
                             f"preprocessing in {cache_root}; extract it first with --preprocess "
                             f"{','.join(preprocess.filters)} (same backbone and --resize/--input-size)")
    return found[0]


def dataset_norm_stats(source: ImageSource, preprocess: Preprocess, cache_root: Path, workers: int | None = None,
                       reporter: Reporter | None = None) -> dict:
    """Per-channel mean and std of the backbone's input pixels (in [0, 1], after filters, resize and
    crop) over every image of ``source``; computed once, then read from the cache (named by the files'
    sizes and times and the preprocessing, so a changed dataset gets new statistics)."""
    reporter = reporter or Reporter(quiet=True)
    key_inputs = {"files": sorted([str(r.path), str(r.npz_key or ""), *file_state(r)] for r in source.records),
                  "preprocess": _preprocess_key(preprocess)}
    path = norm_stats_path(cache_root, source.name, stable_hash(key_inputs, 16))
    if path.is_file():
        return json.loads(path.read_text())
    total, squares, pixels, used = np.zeros(3), np.zeros(3), 0, 0
    workers = max(1, min(8, (os.cpu_count() or 2) // 2)) if workers is None else workers
    loader = DataLoader(_ImageDataset(list(source.records), preprocess), batch_size=32, num_workers=workers,
                        collate_fn=_collate, worker_init_fn=_worker_init if workers else None)
    task = reporter.task(f"{DATASET_NORM}: channel statistics of {source.name}", total=len(source.records))
    try:
        for batch in loader:
            if batch["images"] is not None:
                x = batch["images"].to(torch.float64).div_(255)
                total += x.sum(dim=(0, 2, 3)).numpy()
                squares += x.square().sum(dim=(0, 2, 3)).numpy()
                pixels += x.shape[0] * x.shape[2] * x.shape[3]
                used += x.shape[0]
            task.advance(len(batch["items"]))
    finally:
        task.close()
    if not used:
        raise FeatcacheError(f"--preprocess {DATASET_NORM}: no image of {source.location} could be read")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 1e-12))
    stats = {"mean": [round(float(m), 6) for m in mean], "std": [round(float(v), 6) for v in std],
             "images": used, "dataset": source.name, "preprocess": key_inputs["preprocess"],
             "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, stats)
    reporter.info(f"{DATASET_NORM}: mean {stats['mean']}, std {stats['std']} over {used} images of {source.name}")
    return stats


def planned_entry(source: ImageSource, model: LoadedBackbone, cache_root: Path, dtype: str = "float16",
                  views: int = 1, resize: str = "crop", engine: str = "auto",
                  resampler: str = "pil") -> tuple[Path, int]:
    """Where ``extract`` with these settings (on this machine's device) keeps the features of
    ``source``, and how many of its images still need extracting. Nothing is written."""
    from .engines import resolve_engine

    configure_preprocess(model, resize, resampler=resampler)
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    fp = fingerprint(fingerprint_inputs(model, dtype, precision, views, resolve_engine(engine, model, device)))
    entry_dir = entry_path(Path(cache_root), source.name, model.spec.name, fp)
    return entry_dir, len(plan(source, entry_dir)[0])


def extract_like(source: ImageSource, entry: CacheEntry, cache_root: str | os.PathLike,
                 weights: str | None = None, reporter: Reporter | None = None) -> ExtractResult:
    """Features of ``source`` made exactly like ``entry``'s (same backbone, poolings, dtype,
    preprocessing and views), extracting what is missing. ``weights``: the file given at extraction,
    if any (default: the one the entry recorded, when it was a file)."""
    manifest = entry.manifest
    inputs = manifest["fingerprint_inputs"]
    origin = manifest["provenance"]["weights_origin"]
    if weights is None:
        weights = origin.split(" ")[0][5:] if origin.startswith("file:") else (
            "random" if origin.startswith("random") else None)
    preprocess = inputs["preprocess"]
    # dataset-norm: the images are normalised with exactly the statistics the entry was made with (not
    # the training dataset's newest, which differ once images were added to it)
    norm_from = None
    if "dataset_norm" in manifest:
        norm_from = {**manifest["dataset_norm"], "dataset": manifest["dataset_norm"]["from"],
                     "mean": preprocess["mean"], "std": preprocess["std"]}
    return extract(source, manifest["backbone"], cache_root=cache_root, pools=tuple(manifest["pools"]),
                   dtype=inputs["dtype"], weights=weights, jpeg_draft=preprocess["jpeg_draft"],
                   views=entry.views, resize=entry.resize_mode, reporter=reporter,
                   engine=inputs.get("engine", "torch"), preprocess=tuple(preprocess.get("filters", ())),
                   norm_from=norm_from, resampler=preprocess.get("resampler", "pil"),
                   input_size=preprocess["crop_size"])


def _checked_views(views: int) -> tuple[str, ...]:
    try:
        return views_for(views)
    except ValueError as exc:
        raise FeatcacheError(str(exc)) from None


def _views_axis(outs: list[dict[str, torch.Tensor]], pool: str) -> torch.Tensor:
    """(batch, dim) for one view; (batch, views, dim) for several."""
    return outs[0][pool] if len(outs) == 1 else torch.stack([o[pool] for o in outs], dim=1)


def _writable(entry_dir: Path) -> bool:
    """Whether the entry (or the nearest folder that exists above it) can be written."""
    try:
        entry_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    existing = next(p for p in (entry_dir, *entry_dir.parents) if p.exists())
    return os.access(existing, os.W_OK)


def _read_only_result(source: ImageSource, entry_dir: Path) -> ExtractResult:
    """A read-only cache is fine when it already holds everything; otherwise say what to do."""
    todo, skipped = plan(source, entry_dir)
    if todo:
        raise CacheError(
            f"the cache folder {entry_dir} is read-only and {len(todo)} of {len(source.records)} images "
            f"still need extracting (first: {todo[0].id}); use --cache (or $FEATCACHE_CACHE) to pick a "
            "writable folder")
    entry = CacheEntry(entry_dir)
    return ExtractResult(entry, 0, skipped, entry.failed, 0.0, list(source.notes) + [
        f"{entry_dir} is read-only; it already holds every image, so nothing was written"])


def _write_manifest(entry_dir: Path, manifest: dict, source: ImageSource, complete: bool) -> CacheEntry:
    listed = {r.id for r in source.records}
    payload = {**manifest, "complete": complete}
    if (entry_dir / MANIFEST).exists():
        entry = CacheEntry(entry_dir)
        payload |= shard_summary(entry)
        payload["complete"] = complete and listed <= set(entry.state())
    write_json_atomic(entry_dir / MANIFEST, payload)
    return CacheEntry(entry_dir)


class _StopRequested:
    """SIGTERM behaves like Ctrl-C: stop after the current batch, keep what was committed."""

    def __enter__(self) -> _StopRequested:
        self._old = signal.getsignal(signal.SIGTERM)
        if _in_main_thread():
            signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(*_: object) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if _in_main_thread():
            signal.signal(signal.SIGTERM, self._old)


def _quiet_worker_teardown() -> None:
    """After Ctrl-C the loader's workers die mid-handshake with multiprocessing's fd-sharing thread,
    which then prints a ConnectionResetError traceback under the clean "Interrupted" message (seen
    under load). Connection errors are expected at that point: they alone are silenced, from then on."""
    previous = sys.excepthook
    if getattr(previous, "featcache_quiet_teardown", False):  # already installed by an earlier interrupt
        return

    def hook(kind, value, traceback) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, traceback)

    hook.featcache_quiet_teardown = True
    sys.excepthook = hook


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class ShardSink:
    """Collects rows in source order and commits them as shards of ``shard_size`` (the unit of
    resume), numbered after the entry's existing shards."""

    def __init__(self, entry_dir: Path, manifest: dict, dims: dict[str, int], shard_size: int):
        self.entry_dir, self.dims, self.shard_size = entry_dir, dims, shard_size
        self.dtype, self.pools, self.views = manifest["dtype"], tuple(manifest["pools"]), len(manifest["views"])
        self.attrs = {"fingerprint": manifest["fingerprint"], "format_version": 1,
                      "provenance": manifest["provenance"], "backbone": manifest["backbone"],
                      "entry": {k: manifest[k] for k in ENTRY_KEYS}}
        existing = sorted(entry_dir.glob(SHARD_GLOB))
        self.next_shard = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.rows = ShardRows(self.pools, self.views)

    @property
    def pending(self) -> int:
        """Extracted rows not committed yet."""
        return len(self.rows.ids)

    def add(self, image_id: str, sha: str, size: int, mtime: int, feats: dict[str, np.ndarray]) -> None:
        self.rows.add(image_id, sha, size, mtime, feats)

    def add_failed(self, image_id: str, sha: str, size: int, mtime: int, reason: str) -> None:
        self.rows.add_failed(image_id, sha, size, mtime, reason)

    def commit_full(self) -> None:
        if len(self.rows) >= self.shard_size:
            self.commit()

    def commit(self) -> None:
        if len(self.rows):
            write_shard(self.entry_dir, self.next_shard, self.rows, self.dims, self.dtype, self.attrs)
            self.next_shard, self.rows = self.next_shard + 1, ShardRows(self.pools, self.views)


def _resolved_engine(engine: str, model: LoadedBackbone, dev: torch.device, reporter: Reporter) -> str:
    from .engines import auto_note, resolve_engine

    try:
        resolved = resolve_engine(engine, model, dev)
    except ValueError:
        raise FeatcacheError(f"--engine {engine!r}: choose one of {', '.join(e.value for e in Engine)}") from None
    if str(getattr(engine, "value", engine)) == "auto":
        note, loud = auto_note(model, dev, resolved)
        (reporter.warn if loud else reporter.info)(note)
    return resolved


def _run(todo: list[ImageRecord], model: LoadedBackbone, entry_dir: Path, dev: torch.device,
         precision: str, dtype: str, batch_size: int, workers: int | None, shard_size: int,
         manifest: dict, view_names: tuple[str, ...], reporter: Reporter, engine: str,
         cache_root: Path | None = None, cluster: RayCluster | None = None) -> int:
    if not todo:
        return 0
    cache_root = cache_root or entry_dir.parent.parent
    if cluster is not None:  # decoded by Ray Data tasks, run by a pool of backbone actors
        batches = cluster.extract_batches(todo, model, view_names, engine, cache_root, batch_size, dev, precision)
    else:
        batches = _local_batches(todo, model, dev, precision, batch_size, workers, view_names, engine, cache_root)
    sink = ShardSink(entry_dir, manifest, model.dims, shard_size)
    extracted = 0
    task = reporter.task(f"extract {model.spec.name}", total=len(todo))
    try:
        with _StopRequested(), torch.inference_mode():
            for items, feats in batches:
                feats = {p: feats[p].astype(dtype) for p in sink.pools} if feats else {}  # float16 may overflow
                n = 0  # rows of feats follow the items that decoded, in order
                for item in items:
                    record = todo[item["index"]]
                    args = (record.id, item["sha"], item["size"], item["mtime"])
                    if item["error"]:
                        reporter.warn(f"skipped {record.id}: {item['error']}")
                        sink.add_failed(*args, item["error"])
                        continue
                    row = {p: feats[p][n] for p in sink.pools}
                    n += 1
                    if not all(np.isfinite(v).all() for v in row.values()):
                        reason = f"non-finite features (NaN/Inf) for {record.path}"
                        reporter.warn(f"skipped {record.id}: {reason}")
                        sink.add_failed(*args, reason)
                        continue
                    sink.add(*args, row)
                    extracted += 1
                sink.commit_full()
                task.advance(len(items))
            sink.commit()
    except KeyboardInterrupt:
        _quiet_worker_teardown()
        raise ExtractionInterrupted(
            f"Interrupted: {extracted - sink.pending} new images were committed to "
            f"{entry_dir}; rerun the same command to resume from there") from None
    finally:
        task.close()
    return extracted


def _local_batches(todo: list[ImageRecord], model: LoadedBackbone, dev: torch.device, precision: str,
                   batch_size: int | None, workers: int | None, view_names: tuple[str, ...], engine: str,
                   cache_root: Path) -> Iterator[tuple[list[dict], dict[str, np.ndarray]]]:
    """(items, features) per batch: decoded by DataLoader workers, run here. ``features[pool]`` has one
    row per item that decoded, in order."""
    from .engines import make_forward, run_pipelined

    forward = make_forward(engine, model, cache_root)
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    cuda = dev.type == "cuda"
    # Measured on 2 CPU cores (docs/benchmarks.md): small batches in channels_last run CNNs ~3x
    # faster than batch 64 in NCHW; on CUDA large batches keep the GPU busy.
    batch_size = batch_size or (128 if cuda else 8)
    memory_format = torch.channels_last if model.spec.is_cnn and engine == "torch" else torch.contiguous_format
    model.model.to(memory_format=memory_format)
    loader = DataLoader(_ImageDataset(todo, model.preprocess), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=cuda,
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    def features(batch: dict) -> dict[str, np.ndarray]:
        if batch["images"] is None:
            return {}
        return run_views(forward, batch["images"].to(dev, non_blocking=cuda), view_names, dev, precision)

    for batch, feats in run_pipelined(forward, loader, features):  # the engine's streams run batches at once
        yield batch["items"], feats


def run_views(forward: Forward, images: torch.Tensor, view_names: tuple[str, ...], dev: torch.device,
              precision: str) -> dict[str, np.ndarray]:
    """Every view of a batch of uint8 images through ``forward`` (one forward per view, at the batch size
    measured best): ``{pool: (n, views, dim) float32}``."""
    cuda = dev.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if cuda and precision != "fp32" else nullcontext())
    outs = []
    with torch.inference_mode():
        for view in view_names:
            with autocast:
                outs.append(forward(apply_view(images, view)))  # uint8: the forward normalises
    return {p: _views_axis(outs, p).float().cpu().numpy() for p in outs[0]}
