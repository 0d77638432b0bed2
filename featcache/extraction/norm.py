"""--preprocess dataset-norm: a dataset's own channel statistics, computed once and kept beside its entries."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from featcache.backbones.models import LoadedBackbone
from featcache.data.images import Preprocess
from featcache.data.preprocessing import DATASET_NORM
from featcache.data.sources import ImageSource, file_state
from featcache.errors import FeatcacheError
from featcache.extraction.lean import default_workers
from featcache.extraction.loader import _collate, _ImageDataset, _worker_init
from featcache.progress import Reporter
from featcache.store.entries import read_norm_stats, write_json_atomic
from featcache.store.naming import norm_stats_path


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


def dataset_norm_known(model: LoadedBackbone, source: ImageSource, cache_root: Path,
                       norm_from: str | dict | None) -> bool:
    """Whether the statistics an extraction would normalise with are known without reading any image
    (always, without dataset-norm)."""
    if DATASET_NORM not in model.preprocess.filters or isinstance(norm_from, dict):
        return True
    if norm_from:
        return True  # another dataset's, stored: read (or refused) by stored_norm_stats
    return norm_stats_path(cache_root, source.name, norm_stats_key(source, model.preprocess)).is_file()


def stored_norm_stats(cache_root: Path, dataset: str, preprocess: Preprocess) -> dict:
    """The dataset-norm statistics of another dataset (``--norm-from``): a cache dataset name, or the
    folder / CSV it was read from."""
    name = dataset
    if Path(dataset).exists():
        from featcache.data.sources import open_source

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
    key_inputs = norm_stats_key(source, preprocess)
    path = norm_stats_path(cache_root, source.name, key_inputs)
    if path.is_file():
        return json.loads(path.read_text())
    total, squares, pixels, used = np.zeros(3), np.zeros(3), 0, 0
    workers = default_workers() if workers is None else workers
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


def _preprocess_key(preprocess: Preprocess) -> dict:
    """The preprocessing that dataset-norm statistics depend on: everything but the mean and std."""
    return {k: v for k, v in preprocess.to_dict().items() if k not in ("mean", "std")}


def norm_stats_key(source: ImageSource, preprocess: Preprocess) -> dict:
    """What a dataset's statistics depend on: its files (paths, sizes, times) and the preprocessing."""
    return {"files": sorted([str(r.path), str(r.npz_key or ""), *file_state(r)] for r in source.records),
            "preprocess": _preprocess_key(preprocess)}
