"""The one module that names things on disk.

A cache entry is named by the hash of everything that set its feature values (the Hugging Face
datasets fingerprint idea), a run by the hash of everything that set its numbers; this module turns
those inputs into names and folders, and walks back from a run to its entry and cache root::

    <cache root>/<dataset>/<backbone>-<entry fingerprint>/          an entry (see featcache.store.entries)
    <cache root>/<dataset>/<backbone>-<entry fingerprint>/runs/<head>-<pool>-<run id>/   a run
    <run>/heldout/<test dataset>-<evaluation id>/                    one held-out evaluation of that run
    <run or evaluation>/gallery/gallery.json, <n>-map.jpg             its gallery: what explain found (report)
    <cache root>/<dataset>/.dataset-norm-<key>.json                 a dataset's channel statistics
    <cache root>/.engines/<backbone>-<key>.onnx                      a backbone's ONNX export
    <cache root>/.engines/<backbone>-<key>.int8.xml (.bin)          that export quantized (--precision int8)
    <cache root>/.warm/<recipe>.json                                 the entry an extract recipe named last
    <cache root>/report-<study>.html, study-<study>.json             a study's report and its runs
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

from featcache.recipes import named_settings
from featcache.store.hashing import stable_hash


class FeatureMaker(Protocol):
    """What names an entry's features on a loaded backbone (``featcache.backbones.models.LoadedBackbone``), read
    by shape so that this bottom module of the store imports nothing above it."""

    spec: Any  # its registry spec: ``.name``
    weights_sha256: str | None
    preprocess: Any  # its image transform: ``.to_dict()``
    model: Any  # the network: ``.pools``

FORMAT_VERSION = 1
CACHE_ENV = "FEATCACHE_CACHE"
RUNS = "runs"
# A run is named by what trained and cross-validated it; each held-out evaluation of it (test set, alignment,
# shift-weighted sets) is a folder of its own inside it, scored from the run's saved model. Runs made before
# featcache 0.4 hold their one held-out evaluation in the run folder itself.
HELDOUT = "heldout"
METRICS = "metrics.json"  # a run is finished once this file exists
# the report's gallery of a run (or evaluation): what explain found for the images a reviewer should look at
GALLERY = "gallery"
# --preprocess dataset-norm: a dataset's channel statistics, kept beside its entries in the dataset's folder
# and named by the hash of the files and the preprocessing they were computed with.
NORM_STATS_PREFIX = ".dataset-norm-"


def default_cache_root() -> Path:
    """``$FEATCACHE_CACHE``, else ``./cache``."""
    return Path(os.environ.get(CACHE_ENV, "cache"))


# settings added after the first entries were named, at the default they had before there was a choice: left
# out there, so those entries keep their names (featcache.recipes.named_settings)
ENTRY_SETTINGS_ADDED = {"views": 1, "engine": "torch", "calibration": None}


def fingerprint_inputs(backbone: FeatureMaker, dtype: str, precision: str, views: int = 1,
                       engine: str = "torch", calibration: dict | None = None) -> dict:
    """Everything that sets an entry's feature values (the image files are named per image, by SHA-256).
    ``calibration``: with int8, the images and quantizer that set the quantized weights."""
    return named_settings({"backbone": backbone.spec.name, "weights_sha256": backbone.weights_sha256,
                           "preprocess": backbone.preprocess.to_dict(), "pools": sorted(backbone.model.pools),
                           "dtype": dtype, "precision": precision, "views": views, "engine": engine,
                           "calibration": calibration}, ENTRY_SETTINGS_ADDED)


def fingerprint(inputs: dict) -> str:
    """Name of a cache entry: hash of everything that determines the feature values."""
    return stable_hash({"format_version": FORMAT_VERSION, **inputs}, 16)


def fused_fingerprint(parts: list[tuple[str, str]]) -> str:
    """Name of several entries read side by side: their fingerprints and poolings, in order."""
    return stable_hash([[entry_fingerprint, pool] for entry_fingerprint, pool in parts], 16)


def safe_name(name: str) -> str:
    """A backbone's name as a file or folder name: one read from a folder by that folder's own name
    (``hf:/data/models/monet`` -> ``hf-monet``), every character a file name cannot hold as ``-``."""
    prefix, colon, rest = name.partition(":")
    if colon and Path(rest).is_absolute():
        name = f"{prefix}:{Path(rest).name}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-")


def entry_path(cache_root: Path, dataset: str, backbone: str, fp: str) -> Path:
    return Path(cache_root) / dataset / f"{safe_name(backbone)}-{fp}"


def run_id(identity: dict) -> str:
    """Name of a run: hash of everything that set its numbers (see ``evaluation.runner.run_identity``)."""
    return stable_hash(identity, 12)


def run_path(entry_dir: Path, head: str, pool: str, identity: dict) -> Path:
    return Path(entry_dir) / RUNS / f"{head}-{pool.replace('+', '_')}-{run_id(identity)}"


def heldout_path(run_dir: Path, test_dataset: str, identity: dict) -> Path:
    """Where one held-out evaluation of a run goes: named by its test set and the hash of its settings."""
    return Path(run_dir) / HELDOUT / f"{safe_name(test_dataset)}-{run_id(identity)}"


def is_heldout(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a held-out evaluation folder inside a run (not the run itself)."""
    return Path(run_dir).parent.name == HELDOUT


def trained_run(run_dir: Path) -> Path:
    """The run folder that holds the model: ``run_dir`` itself, or the run a held-out evaluation belongs to."""
    return Path(run_dir).parents[1] if is_heldout(run_dir) else Path(run_dir)


def entry_of_run(run_dir: Path) -> Path:
    """The entry folder a run was written into (for a fused run: its first backbone's)."""
    return trained_run(run_dir).parents[1]


def cache_root_of_run(run_dir: Path) -> Path:
    return trained_run(run_dir).parents[3]


def cache_root_of_entry(entry_dir: Path) -> Path:
    return Path(entry_dir).parent.parent


def heldout_of(run_dir: Path) -> list[Path]:
    """The finished held-out evaluations of a run, by name."""
    return [p.parent for p in sorted((Path(run_dir) / HELDOUT).glob(f"*/{METRICS}")) if _finished_name(p.parent)]


def _finished_name(folder: Path) -> bool:
    """Not a hidden folder: a run or evaluation being written is a hidden temporary folder until it is whole."""
    return not folder.name.startswith(".")


def find_runs(cache_root: Path) -> list[Path]:
    """Every finished run under ``cache_root``, as it is scored: each of its held-out evaluations, or the run
    folder itself when it has none."""
    found = []
    for run in (p.parent for p in sorted(Path(cache_root).glob(f"*/*/{RUNS}/*/{METRICS}"))):
        if _finished_name(run):
            found += heldout_of(run) or [run]
    return found


def norm_stats_path(cache_root: Path, dataset: str, inputs: dict) -> Path:
    """Where a dataset's channel statistics computed from ``inputs`` (files and preprocessing) are kept."""
    return Path(cache_root) / dataset / f"{NORM_STATS_PREFIX}{stable_hash(inputs, 16)}.json"


def warm_recipe_path(cache_root: Path, key: str) -> Path:
    """The entry an extraction recipe named last time (featcache.extraction.warm): a hint, checked when used."""
    return Path(cache_root) / ".warm" / f"{key}.json"


def engine_export_path(cache_root: Path, backbone: str, inputs: dict) -> Path:
    """A backbone's ONNX export, named by the hash of everything it was exported from."""
    return Path(cache_root) / ".engines" / f"{safe_name(backbone)}-{stable_hash(inputs, 16)}.onnx"


def engine_int8_path(cache_root: Path, backbone: str, inputs: dict) -> Path:
    """A backbone's export quantized to int8, named by the hash of the export, calibration and quantizer."""
    return Path(cache_root) / ".engines" / f"{safe_name(backbone)}-{stable_hash(inputs, 16)}.int8.xml"


def study_report_path(cache_root: Path, study_name: str) -> Path:
    """The report ``featcache run`` writes for a study."""
    return Path(cache_root) / f"report-{study_name}.html"


def study_record_path(cache_root: Path, study_name: str) -> Path:
    """What ``featcache run`` did last for a study: its runs and ensemble (read by ``predict --study``)."""
    return Path(cache_root) / f"study-{study_name}.json"



def neighbours_path(predictions: Path) -> Path:
    """Where the similar cases of a ``predictions.csv`` go: ``predictions-neighbours.csv`` beside it."""
    predictions = Path(predictions)
    return predictions.with_name(f"{predictions.stem}-neighbours.csv")


def free_predictions_path(folder: Path = Path(".")) -> Path:
    """``predictions.csv`` in ``folder``, or ``predictions-2.csv`` … : the first name whose files (it and its
    neighbours file) do not exist yet, so no prediction is written over an earlier one."""
    for k in range(1, 100_000):
        path = Path(folder) / ("predictions.csv" if k == 1 else f"predictions-{k}.csv")
        if not path.exists() and not neighbours_path(path).exists():
            return path
    raise FileExistsError(f"{folder}: 100,000 prediction files already; pass --out")


def card_beside(model_file: Path) -> Path:
    """Where ``featcache export`` puts the run's model card beside its file: ``model-MODEL_CARD.md``."""
    model_file = Path(model_file)
    return model_file.with_name(f"{model_file.stem}-MODEL_CARD.md")
