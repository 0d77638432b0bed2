"""Predicting with a saved run: extract new images through the cache, then apply the saved model."""

from __future__ import annotations

import csv
from pathlib import Path

import joblib
import numpy as np

from .errors import RunError
from .evaluate import encode_meta, with_meta
from .extract import extract_like
from .progress import Reporter
from .sources import IMAGE_SUFFIXES, ImageRecord, ImageSource, open_source, slug
from .store import CacheEntry

# joblib files are pickles: loading one can run code. featcache only loads model.joblib from run
# directories inside the user's own cache, which featcache itself wrote.


def load_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "model.joblib"
    if not path.is_file():
        raise RunError(f"{run_dir}: no model.joblib; pass a run directory written by `featcache fit`")
    return joblib.load(path)


def predict_proba_from_entry(saved: dict, entry: CacheEntry, ids: list[str],
                             records: list[ImageRecord] | None = None, source_name: str = "") -> np.ndarray:
    """Apply a saved head to features in ``entry``; refuses features made unlike its training ones.

    A head trained with ``--meta`` also needs the images' ``records`` (from a CSV with the same
    metadata columns)."""
    if entry.fingerprint != saved["feature_fingerprint"]:
        raise RunError(
            f"the features in {entry.path} have fingerprint {entry.fingerprint} but this head was trained on "
            f"{saved['feature_fingerprint']} (other backbone, weights or preprocessing); extract the images "
            "with the same settings as the training data")
    X = entry.read(saved["pool"], ids)
    spec = saved["config"].get("meta_spec")
    if spec:
        if records is None:
            raise RunError("this head was trained with metadata (--meta "
                           f"{','.join(c['name'] for c in spec)}); predict from a CSV that has those columns")
        by_id = {r.id: r for r in records}
        meta, _ = encode_meta([by_id[i] for i in ids], [c["name"] for c in spec], spec, source_name)
        X = with_meta(X, meta)
    return saved["pipeline"].predict_proba(X)


def images_source(inputs: list[str]) -> ImageSource:
    """A source of unlabelled images from file paths and/or folders (searched recursively)."""
    if len(inputs) == 1 and (Path(inputs[0]).suffix.lower() in (".csv", ".npz")
                             or (Path(inputs[0]) / "labels.csv").is_file()):
        return open_source(inputs[0])
    records = []
    for item in inputs:
        path = Path(item)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
            if path.is_dir() else [path]
        records += [ImageRecord(id=str(f.resolve()), path=f) for f in files]
    if not records:
        raise RunError(f"no images found in {', '.join(inputs)}")
    return ImageSource(name=slug("predict-" + Path(inputs[0]).resolve().name), location=Path(inputs[0]),
                       kind="files", records=records)


def predict(run_dir: Path, inputs: list[str], cache_root: Path, out: Path,
            reporter: Reporter | None = None, weights: str | None = None) -> Path:
    saved = load_run(run_dir)
    source = images_source(inputs)
    result = extract_like(source, CacheEntry(Path(run_dir).resolve().parent.parent), cache_root,
                          weights, reporter)
    ids = [r.id for r in source.records if r.id not in result.failed]
    proba = predict_proba_from_entry(saved, result.entry, ids, source.records, str(source.location))
    classes = [str(c) for c in saved["pipeline"].classes_]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "predicted", *[f"p_{c}" for c in classes]])
        for image_id, p in zip(ids, proba, strict=True):
            writer.writerow([image_id, classes[int(np.argmax(p))], *[f"{v:.6f}" for v in p]])
        listed = {r.id for r in source.records}
        for image_id, reason in result.failed.items():
            if image_id in listed:
                writer.writerow([image_id, f"FAILED: {reason}", *[""] * len(classes)])
    return out
