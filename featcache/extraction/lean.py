"""The lean path of ``extract``: new images extracted without importing PyTorch.

Importing PyTorch, torchvision and timm takes seconds, every command, though a backbone exported to ONNX
and run by ONNX Runtime or OpenVINO needs none of them once the export exists: PIL decodes and resizes the
images, and the engine runs the export (normalisation included) on NumPy arrays. So once an extraction
with the same options ran on an exported engine (of this dataset or another), its recipe
(:func:`featcache.extraction.warm.engine_key`) describes the entry and names the export; a later command
extracts its new images this way: decoded in worker processes, run on the same export (its SHA-256 checked),
in the same batches, committed to the same kind of shards, in this dataset's entry (begun if it has none).
The features are the full path's, bit for bit (tested).

Anything else takes the full path: no recipe, PyTorch's own engine or resampler, a GPU, Ray, an entry
without a manifest, a missing or damaged export (the full path exports it again and says so).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import signal
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from featcache.data.images import Preprocess, apply_view
from featcache.data.sources import ImageRecord, ImageSource
from featcache.extraction.result import ExtractResult
from featcache.extraction.resume import cached_line, images_to_extract, read_item
from featcache.extraction.reuse import reuse_known_images
from featcache.extraction.runtimes import export_intact, exported_forward, run_pipelined
from featcache.extraction.writer import (
    Batch,
    ShardSink,
    _writable,
    _write_manifest,
    commit_batches,
    disk_errors,
)
from featcache.progress import Reporter
from featcache.recipes import ExecutionPlan
from featcache.store.entries import MANIFEST, SHARD_GLOB, EntryLock, remove_temporaries, write_json_atomic
from featcache.store.naming import entry_path, warm_recipe_path

# Measured on 2 CPU cores (docs/benchmarks.md): small batches run the CPU engines fastest
# Measured on 2 CPU cores (docs/benchmarks.md): small batches in channels_last run CNNs ~3x faster than batch 64 in
# NCHW; on CUDA large batches keep the GPU busy. One default for every extraction path.
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 128
EXPORTED_ENGINES = ("onnxruntime", "openvino")


def default_batch_size(cuda: bool) -> int:
    """Images per forward when ``--batch-size`` is not given."""
    return CUDA_BATCH_SIZE if cuda else CPU_BATCH_SIZE


def default_workers() -> int:
    """Decoding worker processes when ``--workers`` is not given: half the cores, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def lean_recipe(engine: str, export: Path, threads: int, cache_root: Path) -> dict | None:
    """What a recipe records for the lean path: the engine, its export (inside the cache, relative to
    it) and the threads it ran on; None for an export elsewhere."""
    try:
        relative = export.resolve().relative_to(Path(cache_root).resolve())
    except ValueError:
        return None
    return {"engine": engine, "export": relative.as_posix(), "threads": threads}


def lean_extract(source: ImageSource, cache_root: Path, lean_key: str | None, plan: ExecutionPlan,
                 reporter: Reporter) -> ExtractResult | None:
    """Extract the images of ``source`` still missing from its entry, without PyTorch, when the recipe
    ``lean_key`` (:func:`featcache.extraction.warm.engine_key`) made an entry on an exported engine before
    (of this dataset or another); None when the full path must run (see the module's notes)."""
    recipe = _lean_recipe(cache_root, lean_key)
    if recipe is None:
        return None
    lean, described = recipe["lean"], recipe["entry"]
    entry_dir = entry_path(cache_root, source.name, described["backbone"], described["fingerprint"])
    if not _writable(entry_dir):
        return None
    with EntryLock(entry_dir, break_lock=plan.break_lock):
        if (entry_dir / MANIFEST).is_file():
            try:
                manifest = json.loads((entry_dir / MANIFEST).read_text())
            except ValueError:
                return None
            if any(manifest.get(k) != described[k] for k in ("fingerprint", "fingerprint_inputs", "pools", "views")):
                return None
        elif any(entry_dir.glob(SHARD_GLOB)):
            return None  # the full path rebuilds a lost manifest from the shards
        else:
            manifest = dict(described)
        removed = remove_temporaries(entry_dir)
        if removed:
            reporter.info(f"removed {len(removed)} unfinished file(s) of an interrupted run")
        todo, skipped = images_to_extract(source, entry_dir)
        reporter.info(f"{manifest['backbone']}: {lean['engine']} runs its export compiled before "
                      f"({Path(lean['export']).name}), without PyTorch")
        if skipped:
            reporter.info(f"{manifest['backbone']}: {cached_line(source, entry_dir, todo)}")
        manifest = {**manifest, "dataset": source.name, "source": str(Path(source.location).resolve()),
                    "source_kind": source.kind,
                    "provenance": {**manifest["provenance"], "host": platform.node(),
                                   "date": datetime.now(UTC).isoformat(timespec="seconds")}}
        start = time.perf_counter()
        with disk_errors(entry_dir):
            if not (entry_dir / MANIFEST).exists():
                write_json_atomic(entry_dir / MANIFEST, {**manifest, "complete": False})
            todo, reused = reuse_known_images(todo, entry_dir, manifest, manifest["dims"],
                                              plan.shard_size, reporter)
            extracted = _run(todo, manifest, lean, entry_dir, cache_root, plan, reporter)
            entry = _write_manifest(entry_dir, manifest, source, complete=True)
        seconds = time.perf_counter() - start
    result = ExtractResult(entry, extracted, skipped, entry.failed, seconds, list(source.notes), reused)
    result.lean = lean
    return result


def _lean_recipe(cache_root: Path, lean_key: str | None) -> dict | None:
    """The recipe ``lean_key`` recorded, when the lean path can run it: an exported engine that is
    installed, its export intact, images resized by PIL."""
    try:
        recipe = json.loads(warm_recipe_path(cache_root, lean_key).read_text()) if lean_key else {}
        lean, described = recipe["lean"], recipe["entry"]
        preprocess = Preprocess(**described["fingerprint_inputs"]["preprocess"])
        export = Path(cache_root) / lean["export"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if lean.get("engine") not in EXPORTED_ENGINES or described.get("fingerprint") != recipe.get("fingerprint") \
            or described["fingerprint_inputs"].get("engine") != lean["engine"] or preprocess.resampler != "pil":
        return None
    import importlib.util

    if importlib.util.find_spec(lean["engine"]) is None or not export.is_file() or export_intact(export) is not None:
        return None
    return recipe


def _run(todo: list[ImageRecord], manifest: dict, lean: dict, entry_dir: Path, cache_root: Path, plan: ExecutionPlan,
         reporter: Reporter) -> int:
    if not todo:
        return 0
    preprocess = Preprocess(**manifest["fingerprint_inputs"]["preprocess"])
    views = tuple(manifest["views"])
    pools = tuple(manifest["pools"])
    batch_size = plan.batch_size or default_batch_size(cuda=False)
    workers = default_workers() if plan.workers is None else plan.workers
    sink = ShardSink(entry_dir, manifest, manifest["dims"], plan.shard_size)
    # the workers are forked before the engine starts its threads; --workers 0 decodes here
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(preprocess,)) \
        if workers else None
    try:
        forward = exported_forward(lean["engine"], Path(cache_root) / lean["export"], pools, int(lean["threads"]))

        def features(batch: dict) -> dict[str, np.ndarray]:
            if batch["images"] is None:
                return {}
            outs = [forward(apply_view(batch["images"], view)) for view in views]
            return {p: outs[0][p] if len(outs) == 1 else np.stack([o[p] for o in outs], axis=1) for p in pools}

        batches = _decoded(pool, todo, batch_size, workers, preprocess) if pool else \
            (_decode_batch(todo[s:s + batch_size], s, preprocess) for s in range(0, len(todo), batch_size))
        computed = run_pipelined(forward, batches, features)
        return commit_batches((Batch([todo[item["index"]] for item in batch["items"]], batch["items"], feats,
                                     len(batch["items"])) for batch, feats in computed),
                              [sink], reporter, f"extract {manifest['backbone']}", len(todo))[0]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _decoded(pool, todo: list[ImageRecord], batch_size: int, workers: int, preprocess: Preprocess) -> Iterator[dict]:
    """Batches of ``todo`` decoded by the pool, in order, a few in flight per worker (bounded memory).

    When the next batch is not decoded yet, the engine is waiting for it: this thread then decodes the
    next batch not handed to the pool yet itself, instead of sleeping, so the decode gets more of the
    cores only while it holds the engine up (measured on 2 cores, 2,048 600x450 JPEGs: the command used
    1.92-1.93 cores instead of 1.84-1.85, about 4 % faster; docs/benchmarks.md)."""
    starts = iter(range(0, len(todo), batch_size))
    pending: deque = deque()  # AsyncResults of the pool, or batches decoded here, in order

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append(pool.apply_async(_decode_batch, (todo[start:start + batch_size], start)))

    for _ in range(4 * workers):
        submit()
    while pending:
        head = pending[0]
        if not isinstance(head, dict) and not head.ready():
            start = next(starts, None)
            if start is not None:
                pending.append(_decode_batch(todo[start:start + batch_size], start, preprocess))
                continue
        pending.popleft()
        batch = head if isinstance(head, dict) else head.get()
        submit()
        yield batch


_WORKER_PREPROCESS: Preprocess | None = None


def _init_worker(preprocess: Preprocess) -> None:
    global _WORKER_PREPROCESS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER_PREPROCESS = preprocess


def _decode_batch(records: list[ImageRecord], start: int, preprocess: Preprocess | None = None) -> dict:
    """A batch as the loader's collate makes it: the items (no pixels) and the decoded ones stacked."""
    npz: dict = {}
    load = (preprocess or _WORKER_PREPROCESS).load_array
    items = [read_item(record, start + k, load, npz) for k, record in enumerate(records)]
    ok = [item["image"] for item in items if item["image"] is not None]
    return {"items": [{**item, "image": None} for item in items], "images": np.stack(ok) if ok else None}
