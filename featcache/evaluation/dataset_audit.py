"""What can be wrong with a dataset, from its cached features and out-of-fold predictions.

Suspected label errors come from confident learning (cleanlab): an image whose out-of-fold probability of
its given label is low for its class's standards is listed, most suspect first, with the label the model
suggests. Identical and near-identical images come from the leakage audit; outliers are the images
farthest from the other folds' images (each fold measured against the rest, as the shift audit does).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.shift import ood_scores

OUTLIER_SHARE = 0.01  # the farthest 1 % of images are listed as outliers


@dataclass
class DatasetAudit:
    """The audit's findings, each a list of rows; :func:`write_audit` writes them as CSV files."""

    label_issues: list[dict]  # id, given, suggested, score (probability of the given label), most suspect first
    duplicates: list[dict]  # id, other, similarity, identical
    outliers: list[dict]  # id, label, distance, farthest first
    n_images: int


def label_issues(ids: list[str], labels: np.ndarray, classes: list[str], oof: np.ndarray) -> list[dict]:
    """Confident learning on out-of-fold probabilities: the images whose given label the model doubts most."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise FeatcacheError("featcache audit needs cleanlab: pip install 'featcache[audit]' (or cleanlab)") from None
    y_idx = np.searchsorted(classes, labels)
    ranked = find_label_issues(y_idx, oof, return_indices_ranked_by="self_confidence")
    return [{"id": ids[i], "given": labels[i], "suggested": classes[int(np.argmax(oof[i]))],
             "score": round(float(oof[i, y_idx[i]]), 6)} for i in ranked]


def outliers(data: LabeledFeatures, folds: np.ndarray) -> list[dict]:
    """The images farthest from the images of the other folds."""
    X = data.X.mean(axis=1) if data.X.ndim == 3 else data.X
    distance = np.zeros(len(X))
    for fold in np.unique(folds):
        held = folds == fold
        distance[held] = ood_scores(X[~held], X[held])
    count = max(1, int(round(OUTLIER_SHARE * len(X))))
    order = np.argsort(-distance)[:count]
    return [{"id": data.ids[i], "label": data.y[i], "distance": round(float(distance[i]), 4)} for i in order]


def duplicate_rows(data: LabeledFeatures) -> list[dict]:
    pairs = data.duplicates
    if pairs is None:
        return []
    order = np.argsort(-pairs.similarity)
    return [{"id": data.ids[pairs.first[k]], "other": data.ids[pairs.second[k]],
             "similarity": round(float(pairs.similarity[k]), 4), "identical": bool(pairs.exact[k])} for k in order]


def audit_dataset(data: LabeledFeatures, oof: np.ndarray, folds: np.ndarray) -> DatasetAudit:
    """Everything the audit finds in ``data`` (its rows in the order of ``oof``)."""
    return DatasetAudit(label_issues(data.ids, data.y, data.classes, oof), duplicate_rows(data),
                        outliers(data, folds), len(data.ids))


def write_audit(audit: DatasetAudit, out: Path) -> dict[str, Path]:
    """``label_issues.csv``, ``duplicates.csv`` and ``outliers.csv`` in the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows, header in (("label_issues", audit.label_issues, ["id", "given", "suggested", "score"]),
                               ("duplicates", audit.duplicates, ["id", "other", "similarity", "identical"]),
                               ("outliers", audit.outliers, ["id", "label", "distance"])):
        path = out / f"{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        files[name] = path
    return files
