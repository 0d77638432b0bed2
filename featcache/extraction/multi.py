"""One decode for many backbones: ``featcache extract --backbone a,b,c``.

Each image is read, hashed and decoded once, resized once per distinct input transform
(:func:`featcache.data.images.load_for_each`), and every backbone that still needs it gets it. Each
backbone keeps its own entry, named, locked, planned, resumed and written exactly as its single
extraction would (:func:`featcache.extraction.extract.begin_entry`, the same shard sink and the same
batches of its own images), so the entries are the ones the single commands make, and a killed run
resumes each entry where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from featcache.backbones.models import LoadedBackbone, load_backbone
from featcache.data.images import Preprocess, load_for_each
from featcache.data.sources import ImageRecord, ImageSource
from featcache.errors import FeatcacheError
from featcache.extraction.device import resolve_device
from featcache.extraction.extract import (
    NamedEntry,
    _int8_export,
    _read_only_result,
    begin_entry,
    name_entry,
)
from featcache.extraction.lean import default_batch_size, default_workers
from featcache.extraction.loader import _ImageDataset, _quiet_worker_teardown, _worker_init, run_views
from featcache.extraction.result import ExtractResult
from featcache.extraction.reuse import reuse_known_images
from featcache.extraction.writer import (
    Batch,
    ShardSink,
    _writable,
    _write_manifest,
    commit_batches,
    disk_errors,
)
from featcache.progress import Reporter
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.store.entries import EntryLock
from featcache.store.naming import default_cache_root

# images decoded per loader batch: every backbone's batches of its own images are cut from it, so that
# the decode worker keeps ahead while the backbones run one after the other
GROUP_BATCHES = 8


@dataclass
class _Job:
    """One backbone's part of a shared extraction."""

    model: LoadedBackbone
    named: NamedEntry
    manifest: dict
    todo: list[ImageRecord]
    skipped: int
    reused: int
    transform: int  # index of its preprocessing among the distinct ones


def extract_many(source: ImageSource, backbones: list[str | LoadedBackbone],
                 cache_root: str | os.PathLike | None = None,
                 recipe: FeatureRecipe = FeatureRecipe(), plan: ExecutionPlan = ExecutionPlan(),
                 reporter: Reporter | None = None) -> list[ExtractResult]:
    """Extract ``source`` with every backbone of ``backbones`` from one decode of each image; one
    :class:`ExtractResult` per backbone, in order. ``recipe`` and ``plan`` mean what they mean for
    :func:`featcache.extraction.extract.extract` and apply to every backbone."""
    reporter = reporter or Reporter(quiet=True)
    if recipe.weights not in (None, "random"):
        raise FeatcacheError(f"--weights {recipe.weights}: a weights file belongs to one backbone; extract that "
                             "backbone alone (several backbones take their own weights, or --weights random)")
    if plan.cluster is not None:
        raise FeatcacheError("one decode for several backbones runs on this machine; drop --ray, or extract one "
                             "backbone at a time on the cluster")
    dev = resolve_device(plan.device)
    root = Path(cache_root or default_cache_root())
    models = [b if isinstance(b, LoadedBackbone) else load_backbone(b, weights=recipe.weights, pools=recipe.pools,
                                                                    device=dev)
              for b in backbones]
    named = [name_entry(source, model, root, recipe, plan, reporter) for model in models]
    results: dict[int, ExtractResult] = {k: _read_only_result(source, n.entry_dir)
                                         for k, n in enumerate(named) if not _writable(n.entry_dir)}
    with ExitStack() as locks:
        jobs: dict[int, _Job] = {}
        transforms: list[Preprocess] = []
        for k, (model, entry) in enumerate(zip(models, named, strict=True)):
            if k in results:
                continue
            locks.enter_context(EntryLock(entry.entry_dir, break_lock=plan.break_lock))
            todo, skipped, manifest = begin_entry(source, model, entry, plan, reporter)
            with disk_errors(entry.entry_dir):
                todo, reused = reuse_known_images(todo, entry.entry_dir, manifest, model.dims, plan.shard_size,
                                                  reporter)
            if model.preprocess not in transforms:
                transforms.append(model.preprocess)
            jobs[k] = _Job(model, entry, manifest, todo, skipped, reused, transforms.index(model.preprocess))
        start = time.perf_counter()
        extracted = _run_many(source, list(jobs.values()), transforms, dev, plan, reporter, root)
        seconds = time.perf_counter() - start
        for (k, job), count in zip(jobs.items(), extracted, strict=True):
            with disk_errors(job.named.entry_dir):
                entry = _write_manifest(job.named.entry_dir, job.manifest, source, complete=True)
            results[k] = ExtractResult(entry, count, job.skipped, entry.failed, seconds, list(source.notes),
                                       job.reused)
    return [results[k] for k in range(len(models))]


class _SharedDecodeDataset(_ImageDataset):
    """Reads and hashes one image once, decodes it once, and resizes it for each distinct transform: its
    ``image`` is the list of them."""

    def __init__(self, records: list[ImageRecord], transforms: list[Preprocess]):
        super().__init__(records, transforms[0])
        self.transforms = transforms

    def prepare(self, content: bytes | np.ndarray) -> list[torch.Tensor]:
        return load_for_each(content, self.transforms)


def _collate_shared(items: list[dict]) -> dict:
    """One stack per transform of the images that decoded (only stacks cross to the main process)."""
    ok = [it for it in items if it["image"] is not None]
    stacks = ([torch.stack([it["image"][t] for it in ok]) for t in range(len(ok[0]["image"]))] if ok else [])
    row = {it["index"]: r for r, it in enumerate(ok)}
    return {"items": [{**it, "image": None, "row": row.get(it["index"])} for it in items], "stacks": stacks}


def _run_many(source: ImageSource, jobs: list[_Job], transforms: list[Preprocess], dev: torch.device,
              plan: ExecutionPlan, reporter: Reporter, cache_root: Path) -> list[int]:
    from featcache.extraction.engines import make_forward, run_pipelined

    wanted = {r.id for job in jobs for r in job.todo}
    if not wanted:
        return [0] * len(jobs)
    union = [r for r in source.records if r.id in wanted]  # source order, as each job's own plan keeps it
    needs = [{r.id for r in job.todo} for job in jobs]
    batch_size = plan.batch_size or default_batch_size(dev.type == "cuda")
    workers = default_workers() if plan.workers is None else plan.workers
    for job in jobs:
        if job.model.spec.is_cnn and job.named.engine == "torch":
            job.model.model.to(memory_format=torch.channels_last)
    loader = DataLoader(_SharedDecodeDataset(union, transforms), batch_size=batch_size * GROUP_BATCHES,
                        num_workers=workers, collate_fn=_collate_shared,
                        pin_memory=jobs[0].named.accelerator.pin_memory,
                        worker_init_fn=_worker_init if workers else None, persistent_workers=False,
                        prefetch_factor=2 if workers else None)
    groups = iter(loader)  # the decode workers fork now, before the engines start their thread pools
    forwards = [make_forward(job.named.engine, job.model, cache_root,
                             export=_int8_export(job.named, job.model, cache_root, source, reporter))
                if needs[k] else None  # done: no engine
                for k, job in enumerate(jobs)]
    sinks = [ShardSink(job.named.entry_dir, job.manifest, job.model.dims, plan.shard_size) for job in jobs]

    def computed() -> Iterator[Batch]:
        """Each decoded group through every backbone that still needs its images, batch by batch."""
        for group in groups:
            for k, job in enumerate(jobs):
                if forwards[k] is None:
                    continue
                mine = [it for it in group["items"] if union[it["index"]].id in needs[k]]
                batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]

                def features(items: list[dict], job: _Job = job, forward=forwards[k],
                             stacks: list[torch.Tensor] = group["stacks"]) -> dict[str, np.ndarray]:
                    rows = [it["row"] for it in items if it["row"] is not None]
                    if not rows:
                        return {}
                    images = stacks[job.transform][torch.tensor(rows)]
                    return run_views(forward, images, job.named.views, job.named.accelerator)

                for items, feats in run_pipelined(forwards[k], batches, features):
                    yield Batch([union[it["index"]] for it in items], items, feats, 0, k)
            yield Batch([], [], {}, len(group["items"]))  # the group is done for every backbone

    with torch.inference_mode():  # the forwards run as the loop pulls each batch
        return commit_batches(computed(), sinks, reporter,
                              f"extract {', '.join(job.model.spec.name for job in jobs)} (one decode)", len(union),
                              _quiet_worker_teardown)

