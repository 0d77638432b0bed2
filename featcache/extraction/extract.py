"""Extraction: run a frozen backbone once over a source and commit its features to the store.

Decoding, hashing and resizing run in DataLoader workers while the backbone computes; shards are
committed in source order, so a killed run resumes with exactly the batches it would have run."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from featcache.backbones.models import LoadedBackbone, load_backbone
from featcache.data.images import Preprocess, views_for
from featcache.data.sources import ImageRecord, ImageSource
from featcache.errors import CacheError, FeatcacheError, RunError
from featcache.options import Dtype, Engine, Precision
from featcache.progress import Reporter
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.store.entries import (
    MANIFEST,
    SHARD_GLOB,
    CacheEntry,
    EntryLock,
    rebuild_manifest,
    remove_temporaries,
    write_json_atomic,
)
from featcache.store.naming import default_cache_root, fingerprint

if TYPE_CHECKING:
    from featcache.extraction.ray import RayCluster
from featcache.extraction.device import Accelerator, provenance, resolve_device, resolve_precision
from featcache.extraction.lean import EXPORTED_ENGINES, default_batch_size, default_workers, lean_recipe
from featcache.extraction.loader import _collate, _ImageDataset, _quiet_worker_teardown, _worker_init, run_views
from featcache.extraction.norm import _apply_dataset_norm, dataset_norm_known
from featcache.extraction.result import ExtractResult
from featcache.extraction.resume import cached_line, images_to_extract
from featcache.extraction.reuse import reuse_known_images
from featcache.extraction.writer import (
    Batch,
    ShardSink,
    _writable,
    _write_manifest,
    commit_batches,
    disk_errors,
)
from featcache.store.naming import entry_path, fingerprint_inputs


def extract(source: ImageSource, backbone: str | LoadedBackbone, recipe: FeatureRecipe = FeatureRecipe(),
            plan: ExecutionPlan = ExecutionPlan(), cache_root: str | os.PathLike | None = None,
            reporter: Reporter | None = None) -> ExtractResult:
    """Extract features of every image in ``source`` into the cache (resuming where it stopped).

    ``backbone``: a registry name (loaded with ``recipe.weights`` and ``recipe.pools``) or a loaded backbone.
    ``recipe`` names the entry (:class:`featcache.recipes.FeatureRecipe`; its fields are the options of
    ``featcache extract``: ``views`` are flips and quarter turns stored as an extra axis, features ``(n, views,
    dim)``; ``engine`` ``auto`` is the engine measured fastest for the backbone on the CPU, PyTorch on CUDA;
    ``resampler`` ``torch`` has its own fingerprint; ``norm_from`` with ``dataset-norm`` may be the statistics
    themselves). ``plan`` says how the job runs (:class:`featcache.recipes.ExecutionPlan`: device, batch size,
    workers, shard size, lock, re-hashing, a Ray cluster, whose features and entry are the local path's).
    """
    reporter = reporter or Reporter(quiet=True)
    cluster = plan.cluster
    dev = _device_of(plan)
    model = backbone if isinstance(backbone, LoadedBackbone) else \
        load_backbone(backbone, weights=recipe.weights, pools=recipe.pools, device=dev if cluster is None else "cpu")
    root = Path(cache_root or default_cache_root())
    named = name_entry(source, model, root, recipe, plan, reporter)
    entry_dir = named.entry_dir
    if not _writable(entry_dir):
        return _read_only_result(source, entry_dir)

    with EntryLock(entry_dir, break_lock=plan.break_lock):
        todo, skipped, manifest = begin_entry(source, model, named, plan, reporter)
        start = time.perf_counter()
        with disk_errors(entry_dir):
            todo, reused = reuse_known_images(todo, entry_dir, manifest, model.dims, plan.shard_size, reporter)
            export = _int8_export(named, model, root, source, reporter) if todo else None
            extracted = _run(todo, model, named, plan, manifest, reporter, root, export=export)
            entry = _write_manifest(entry_dir, manifest, source, complete=True)
        seconds = time.perf_counter() - start
    result = ExtractResult(entry, extracted, skipped, entry.failed, seconds, list(source.notes), reused)
    result.lean = _lean_info(model, named.engine, dev, cluster, root) \
        if named.precision != Precision.int8.value else None
    return result


def _device_of(plan: ExecutionPlan) -> torch.device:
    """The device the backbone runs on: this machine's, or a cluster's actors' (the driver's copy names the entry)."""
    return resolve_device(plan.device) if plan.cluster is None else plan.cluster.device(plan.device)


def _int8_export(named: NamedEntry, model: LoadedBackbone, cache_root: Path, source: ImageSource,
                 reporter: Reporter) -> Path | None:
    """With int8, the quantized model the forward runs (quantized now when not cached); else None."""
    if named.precision != Precision.int8.value:
        return None
    from featcache.extraction.quantize import ensure_int8

    return ensure_int8(model, cache_root, named.inputs["calibration"], source, reporter)


def _lean_info(model: LoadedBackbone, engine: str, dev: torch.device, cluster: RayCluster | None,
               cache_root: Path) -> dict | None:
    """How a later extraction into this entry can run without PyTorch: on the CPU, an exported engine
    whose export is cached, images resized by PIL (featcache.extraction.lean)."""
    from featcache.extraction.engines import export_path

    if cluster is not None or dev.type != "cpu" or engine not in EXPORTED_ENGINES \
            or model.preprocess.resampler != "pil":
        return None
    path = export_path(model, cache_root)
    return lean_recipe(engine, path, torch.get_num_threads(), cache_root) if path.is_file() else None


def begin_entry(source: ImageSource, model: LoadedBackbone, named: NamedEntry, plan: ExecutionPlan,
                reporter: Reporter) -> tuple[list[ImageRecord], int, dict]:
    """Under the entry's lock: clear what an interrupted run left, rebuild a lost manifest from the shards,
    plan what is still to extract, and write the manifest of an entry begun. Returns the images still to
    do, how many are already in, and the manifest."""
    entry_dir = named.entry_dir
    removed = remove_temporaries(entry_dir)
    if removed:
        reporter.info(f"removed {len(removed)} unfinished file(s) of an interrupted run")
    if not (entry_dir / MANIFEST).exists() and any(entry_dir.glob(SHARD_GLOB)):
        # its shards are still the truth: without this, every image would be extracted again
        rebuild_manifest(entry_dir)
        reporter.warn(f"{entry_dir / MANIFEST} was missing; rebuilt it from the shards")
    todo, skipped = images_to_extract(source, entry_dir, plan.rehash)
    manifest = {
        "fingerprint": named.fingerprint, "fingerprint_inputs": named.inputs, "format_version": 1,
        "dataset": source.name, "source": str(Path(source.location).resolve()),
        "source_kind": source.kind, "backbone": model.spec.name, "pools": list(model.model.pools),
        "dims": model.dims, "dtype": named.dtype, "provenance": provenance(named.device, model.weights_origin),
        "views": list(named.views),
    }
    if named.norm:
        manifest["dataset_norm"] = named.norm
    if named.own:
        manifest["backbone_preprocess"] = named.own
    if plan.cluster is not None:
        manifest["provenance"]["cluster"] = plan.cluster.describe()
    if skipped:
        reporter.info(f"{model.spec.name}: {cached_line(source, entry_dir, todo)}")
    with disk_errors(entry_dir):
        if not (entry_dir / MANIFEST).exists():
            write_json_atomic(entry_dir / MANIFEST, {**manifest, "complete": False})
    return todo, skipped, manifest


def configure_preprocess(model: LoadedBackbone, recipe: FeatureRecipe) -> None:
    """Apply the recipe's resize, JPEG draft, input size, filters and resampler to the backbone's own
    preprocessing (resize and resampler None: the backbone's own)."""
    jpeg_draft, filters, input_size = recipe.jpeg_draft, recipe.preprocess, recipe.input_size
    resampler, resize = recipe.resampler, recipe.resize
    changes: dict = {} if jpeg_draft else {"jpeg_draft": False}
    if filters:
        changes["filters"] = filters
    if resampler is not None and resampler != model.preprocess.resampler:
        changes["resampler"] = resampler
    if resize is not None and resize != model.preprocess.resize_mode:
        changes["resize_mode"] = resize
    if input_size and input_size != model.preprocess.crop_size:  # keep the resize/crop ratio at the new size
        ratio = model.preprocess.resize_size / model.preprocess.crop_size
        changes |= {"crop_size": input_size, "resize_size": int(input_size * ratio)}
    if changes:
        try:  # Preprocess checks the values (an unknown --resize) and says what to use
            model.preprocess = Preprocess(**{**model.preprocess.to_dict(), **changes})
        except ValueError as exc:
            raise FeatcacheError(str(exc)) from None


@dataclass
class NamedEntry:
    """Where an extraction's features go, everything that named them, and how they are computed."""

    entry_dir: Path
    inputs: dict  # the fingerprint's inputs
    fingerprint: str
    engine: str  # the concrete engine (auto resolved)
    precision: str  # the concrete precision (fp32 off CUDA)
    norm: dict | None  # with dataset-norm: where the statistics came from
    # the backbone's own resize and resampler where they are not crop and pil (a transformers model's): compare
    # labels an entry by what was asked beyond them, not by the model's own preprocessing
    own: dict | None = None
    dtype: str = Dtype.float16.value  # how the features are stored
    views: tuple[str, ...] = ("original",)  # the views computed of each image
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the backbone runs

    @property
    def accelerator(self) -> Accelerator:
        """How batches reach the backbone's device, and the precision it computes in."""
        return Accelerator(self.device, self.precision)


def name_entry(source: ImageSource, model: LoadedBackbone, cache_root: Path, recipe: FeatureRecipe = FeatureRecipe(),
               plan: ExecutionPlan = ExecutionPlan(), reporter: Reporter | None = None,
               plan_only: bool = False) -> NamedEntry | None:
    """Apply ``recipe`` to ``model``'s preprocessing and name the entry it makes: the one computation of an
    entry's name, shared by :func:`extract` and a study's dry-run plan (``plan`` gives the device, and the
    workers that compute dataset-norm statistics).

    ``plan_only``: say nothing and compute nothing; None when the name cannot be known yet (dataset-norm
    statistics not computed)."""
    reporter = reporter or Reporter(quiet=True)
    cluster = plan.cluster
    dev = _device_of(plan)
    view_names = _checked_views(recipe.views)
    precision, engine = recipe.precision, recipe.engine
    int8 = precision == Precision.int8.value
    if int8:
        engine = _int8_engine(engine, model, dev, cluster)
    elif precision not in ("auto", "fp32") and dev.type != "cuda" and not plan_only:
        reporter.warn(f"--precision {precision} applies on CUDA only; on {dev.type} features are computed "
                      "in fp32 (and the entry is named so)")
    # on a cluster the actors run the model on their own device; the driver's copy names the entry
    precision = resolve_precision(precision, dev) if cluster is None else cluster.precision(precision, dev)
    own = {"resize": model.preprocess.resize_mode, "resampler": model.preprocess.resampler}
    configure_preprocess(model, recipe)
    if plan_only and not dataset_norm_known(model, source, cache_root, recipe.norm_from):
        return None
    norm = _apply_dataset_norm(model, source, cache_root, recipe.norm_from, plan.workers, reporter)
    engine = _resolved_engine(engine, model, dev, reporter if not plan_only else None)
    calibration = recipe.calibration
    if int8 and calibration is None:
        from featcache.extraction.quantize import calibration_identity

        calibration = calibration_identity(source, model)
    inputs = fingerprint_inputs(model, recipe.dtype, precision, recipe.views, engine, calibration if int8 else None)
    fp = fingerprint(inputs)
    return NamedEntry(entry_path(cache_root, source.name, model.spec.name, fp), inputs, fp, engine, precision, norm,
                      own if own != {"resize": "crop", "resampler": "pil"} else None, recipe.dtype, view_names, dev)


def weights_of(entry: CacheEntry, weights: str | None = None) -> str | None:
    """The ``--weights`` that made ``entry``: ``weights`` when given, else the file (or a foundation model's
    folder) or ``random`` its manifest recorded, else None (the backbone's own pretrained weights)."""
    if weights is not None:
        return weights
    origin = entry.manifest["provenance"]["weights_origin"]
    kind, _, where = origin.split(" ")[0].partition(":")
    return where if kind in ("file", "dir") else "random" if origin.startswith("random") else None


def backbone_of(entry: CacheEntry, weights: str | None = None) -> LoadedBackbone:
    """The backbone that made ``entry``, with its preprocessing, refused when the weights loaded are not the
    ones the entry was made with (``weights``: the file given at extraction, if any)."""
    manifest = entry.manifest
    inputs = manifest["fingerprint_inputs"]
    model = load_backbone(manifest["backbone"], weights=weights_of(entry, weights), pools=tuple(manifest["pools"]))
    model.preprocess = Preprocess.from_fields(entry.manifest["fingerprint_inputs"]["preprocess"])
    made = fingerprint_inputs(model, inputs["dtype"], inputs["precision"], entry.views, inputs.get("engine", "torch"))
    if made["weights_sha256"] != inputs["weights_sha256"]:
        raise RunError(f"the weights loaded for {manifest['backbone']} (SHA-256 {made['weights_sha256'][:12]}…) "
                       f"are not the ones {entry.path} was made with ({inputs['weights_sha256'][:12]}…); pass the same "
                       "--weights file given at extraction")
    return model


def extract_like(source: ImageSource, entry: CacheEntry, cache_root: str | os.PathLike,
                 weights: str | None = None, reporter: Reporter | None = None) -> ExtractResult:
    """Features of ``source`` made exactly like ``entry``'s (same backbone, poolings, dtype,
    preprocessing and views), extracting what is missing. ``weights``: the file given at extraction,
    if any (default: the one the entry recorded, when it was a file)."""
    manifest = entry.manifest
    inputs = manifest["fingerprint_inputs"]
    weights = weights_of(entry, weights)
    preprocess = inputs["preprocess"]
    # dataset-norm: the images are normalised with exactly the statistics the entry was made with (not
    # the training dataset's newest, which differ once images were added to it)
    norm_from = None
    if "dataset_norm" in manifest:
        norm_from = {**manifest["dataset_norm"], "dataset": manifest["dataset_norm"]["from"],
                     "mean": preprocess["mean"], "std": preprocess["std"]}
    recipe = FeatureRecipe(weights=weights, pools=tuple(manifest["pools"]), dtype=inputs["dtype"],
                           jpeg_draft=preprocess["jpeg_draft"], input_size=preprocess["crop_size"],
                           preprocess=tuple(preprocess.get("filters", ())), norm_from=norm_from,
                           engine=inputs.get("engine", "torch"), resampler=preprocess.get("resampler", "pil"),
                           views=entry.views, resize=entry.resize_mode,
                           # int8: the training entry's quantized model, not one calibrated on these images
                           **({"precision": Precision.int8.value, "calibration": inputs["calibration"]}
                              if "calibration" in inputs else {}))
    return extract(source, manifest["backbone"], recipe, cache_root=cache_root, reporter=reporter)


def _checked_views(views: int) -> tuple[str, ...]:
    try:
        return views_for(views)
    except ValueError as exc:
        raise FeatcacheError(str(exc)) from None


def _read_only_result(source: ImageSource, entry_dir: Path) -> ExtractResult:
    """A read-only cache is fine when it already holds everything; otherwise say what to do."""
    todo, skipped = images_to_extract(source, entry_dir)
    if todo:
        raise CacheError(
            f"the cache folder {entry_dir} is read-only and {len(todo)} of {len(source.records)} images "
            f"still need extracting (first: {todo[0].id}); use --cache (or $FEATCACHE_CACHE) to pick a "
            "writable folder")
    entry = CacheEntry(entry_dir)
    return ExtractResult(entry, 0, skipped, entry.failed, 0.0, list(source.notes) + [
        f"{entry_dir} is read-only; it already holds every image, so nothing was written"])


def _int8_engine(engine: str | Engine, model: LoadedBackbone, dev: torch.device, cluster: RayCluster | None) -> str:
    """The engine an int8 extraction runs on (OpenVINO on this machine's CPU), or why it cannot run."""
    from featcache.extraction.quantize import INT8_ENGINE, quantizer_version

    engine = str(getattr(engine, "value", engine))
    if dev.type != "cpu" or cluster is not None:
        where = "a Ray cluster" if cluster is not None else str(dev)
        raise FeatcacheError(f"--precision int8 runs the quantized backbone on this machine's CPU, not on {where}: "
                             "add --device cpu (and drop --ray), or use bf16/fp16 on CUDA")
    if model.spec.torch_only:
        raise FeatcacheError(f"--precision int8 quantizes the ONNX export, and {model.spec.name} runs on PyTorch "
                             f"only ({model.spec.torch_only}); use --precision fp32")
    if engine not in ("auto", INT8_ENGINE):
        raise FeatcacheError(f"--precision int8 runs on --engine {INT8_ENGINE} (NNCF quantizes for OpenVINO), not "
                             f"{engine}; drop --engine or give --engine {INT8_ENGINE}")
    quantizer_version()  # refused now when NNCF is missing, before any work
    return INT8_ENGINE


def _resolved_engine(engine: str, model: LoadedBackbone, dev: torch.device, reporter: Reporter | None) -> str:
    from featcache.extraction.engines import auto_note, resolve_engine

    try:
        resolved = resolve_engine(engine, model, dev)
    except ValueError:
        raise FeatcacheError(f"--engine {engine!r}: choose one of {', '.join(e.value for e in Engine)}") from None
    if str(getattr(engine, "value", engine)) == "auto" and reporter is not None:
        note, loud = auto_note(model, dev, resolved)
        (reporter.warn if loud else reporter.info)(note)
    return resolved


def _run(todo: list[ImageRecord], model: LoadedBackbone, named: NamedEntry, plan: ExecutionPlan, manifest: dict,
         reporter: Reporter, cache_root: Path, *, export: Path | None = None) -> int:
    if not todo:
        return 0
    if plan.cluster is not None:  # decoded by Ray Data tasks, run by a pool of backbone actors
        batches = plan.cluster.extract_batches(todo, model, named.views, named.engine, cache_root, plan.batch_size,
                                               named.device, named.precision)
    else:
        batches = _local_batches(todo, model, named, plan, cache_root, export=export)
    sink = ShardSink(named.entry_dir, manifest, model.dims, plan.shard_size)
    with torch.inference_mode():  # the driver's forward runs as the loop pulls each batch
        return commit_batches((Batch([todo[item["index"]] for item in items], items, feats, len(items))
                               for items, feats in batches), [sink], reporter, f"extract {model.spec.name}",
                              len(todo), _quiet_worker_teardown)[0]


def _local_batches(todo: list[ImageRecord], model: LoadedBackbone, named: NamedEntry, plan: ExecutionPlan,
                   cache_root: Path, *,
                   export: Path | None = None) -> Iterator[tuple[list[dict], dict[str, np.ndarray]]]:
    """(items, features) per batch: decoded by DataLoader workers, run here. ``features[pool]`` has one
    row per item that decoded, in order. ``export``: the model file the engine runs (int8), else its export."""
    from featcache.extraction.engines import make_forward, run_pipelined

    forward = make_forward(named.engine, model, cache_root, export=export)
    workers = default_workers() if plan.workers is None else plan.workers
    accelerator = named.accelerator
    batch_size = plan.batch_size or default_batch_size(named.device.type == "cuda")
    memory_format = torch.channels_last if model.spec.is_cnn and named.engine == "torch" else torch.contiguous_format
    model.model.to(memory_format=memory_format)
    loader = DataLoader(_ImageDataset(todo, model.preprocess), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=accelerator.pin_memory,
                        worker_init_fn=_worker_init if workers else None,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    def features(batch: dict) -> dict[str, np.ndarray]:
        if batch["images"] is None:
            return {}
        return run_views(forward, batch["images"], named.views, accelerator)

    for batch, feats in run_pipelined(forward, loader, features):  # the engine's streams run batches at once
        yield batch["items"], feats


def find_or_extract_like(cache_root: Path, source: ImageSource, entry: CacheEntry,
                         reporter: Reporter | None = None) -> CacheEntry:
    """Features of ``source`` made exactly like ``entry`` (same fingerprint), extracting if needed."""
    result = extract_like(source, entry, cache_root, reporter=reporter)
    if result.entry.fingerprint != entry.fingerprint:
        raise FeatcacheError(f"--test-data features ({result.entry.fingerprint}) were not made like the "
                             f"training features ({entry.fingerprint}); extract both with the same options")
    return result.entry
