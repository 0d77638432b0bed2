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
# below this out-of-fold balanced accuracy the audit's models confuse classes too often for their doubts to point
# at wrong labels: the flags are then mostly hard, confusable presentations
WEAK_AUDIT_BALANCED_ACCURACY = 0.75


@dataclass
class DatasetAudit:
    """The audit's findings, each a list of rows; :func:`write_audit` writes them as CSV files."""

    label_issues: list[dict]  # id, given, suggested, score, reason: label conflicts and lone classes first
    duplicates: list[dict]  # id, other, similarity, identical
    outliers: list[dict]  # id, label, distance, percentile, farthest first
    n_images: int
    model_balanced_accuracy: float | None = None  # of the out-of-fold probabilities the doubts come from
    estimated_wrong: int | None = None  # cleanlab's own estimate of how many labels are wrong
    n_conflicts: int = 0  # images in a label conflict (the same or a near-identical image under another label)
    n_lone: int = 0  # images of classes too small to cross-validate (a typo, often), left out of the models

    @property
    def weak(self) -> bool:
        """Whether the models are too weak for their doubts to mean wrong labels."""
        return self.model_balanced_accuracy is not None and \
            self.model_balanced_accuracy < WEAK_AUDIT_BALANCED_ACCURACY

    def sentence(self) -> str:
        """What the audit found, in one line, with how far its label doubts can be trusted."""
        doubts = len(self.label_issues) - self.n_conflicts - self.n_lone
        parts = [f"{len(self.label_issues)} suspected label errors of {self.n_images} images: "
                 f"{self.n_conflicts} in label conflicts, {self.n_lone} in classes too small to cross-validate, "
                 f"{doubts} doubted by the models"]
        if self.estimated_wrong is not None:
            parts.append(f"cleanlab estimates {self.estimated_wrong} wrong labels")
        if self.model_balanced_accuracy is not None:
            parts.append(f"the models' out-of-fold balanced accuracy is {self.model_balanced_accuracy:.3f}")
        return "; ".join(parts) + f"; {len(self.duplicates)} duplicate pairs, {len(self.outliers)} outliers"

    def weak_warning(self) -> str | None:
        if not self.weak:
            return None
        doubted = len(self.label_issues) - self.n_conflicts - self.n_lone
        return (f"the audit's models reach only {self.model_balanced_accuracy:.3f} out-of-fold balanced accuracy "
                f"(below {WEAK_AUDIT_BALANCED_ACCURACY}): most of the {doubted} images they doubt are likely hard, "
                "confusable cases, not wrong labels; look at the label conflicts first, and read the rest as a list "
                "to check, not a count of errors")


def label_issues(ids: list[str], labels: np.ndarray, classes: list[str], oof: np.ndarray) -> list[dict]:
    """Confident learning on out-of-fold probabilities: the images whose given label the model doubts most."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise FeatcacheError("featcache audit needs cleanlab: pip install 'featcache[audit]' (or cleanlab)") from None
    y_idx = np.searchsorted(classes, labels)
    ranked = find_label_issues(y_idx, oof, return_indices_ranked_by="self_confidence")
    return [{"id": ids[i], "given": labels[i], "suggested": classes[int(np.argmax(oof[i]))],
             "score": float(oof[i, y_idx[i]]), "reason": "doubted by the models (confident learning)"}
            for i in ranked]


def estimated_wrong_labels(labels: np.ndarray, classes: list[str], oof: np.ndarray) -> int:
    """cleanlab's own estimate of how many labels are wrong (from its confident joint), beside the count flagged."""
    from cleanlab.count import num_label_issues

    return int(num_label_issues(np.searchsorted(classes, labels), oof))


def label_conflicts(data: LabeledFeatures) -> list[dict]:
    """Images that are identical or nearly identical to an image under another label, closest pairs first:
    at least one of the two labels is wrong (or the pair is not the same lesion)."""
    pairs = data.duplicates
    if pairs is None:
        return []
    rows = []
    for k in np.argsort(-pairs.similarity, kind="stable"):
        a, b = int(pairs.first[k]), int(pairs.second[k])
        if data.y[a] == data.y[b]:
            continue
        kind = "identical to" if pairs.exact[k] else f"near-identical (cosine {pairs.similarity[k]:.3f}) to"
        for one, other in ((a, b), (b, a)):
            rows.append({"id": data.ids[one], "given": data.y[one], "suggested": data.y[other], "score": "",
                         "reason": f"label conflict: {kind} {data.ids[other]}, labelled {data.y[other]}"})
    return rows


def lone_class_rows(ids: list[str], labels: list[str], counts: dict[str, int], cv: int) -> list[dict]:
    """Images of classes with fewer than ``cv`` images (one image of a class is often a label typo); the
    suggested label is the class of enough images whose name is closest to it, when one is close."""
    import difflib

    full = [c for c, n in counts.items() if n >= cv]

    def row(image_id: str, label: str) -> dict:
        close = difflib.get_close_matches(label, full, n=1, cutoff=0.6)
        typo = f"a typo of {close[0]!r}?" if close else "a typo?"
        return {"id": image_id, "given": label, "suggested": close[0] if close else "", "score": "",
                "reason": f"class {label!r} has only {counts[label]} image{'s' if counts[label] != 1 else ''} (fewer "
                          f"than the {cv} folds): {typo} it was left out of the audit's models"}

    return [row(i, label) for i, label in zip(ids, labels, strict=True) if counts[label] < cv]


def outliers(data: LabeledFeatures, folds: np.ndarray) -> list[dict]:
    """The images farthest from the images of the other folds."""
    X = data.X.mean(axis=1) if data.X.ndim == 3 else data.X
    distance = np.zeros(len(X))
    for fold in np.unique(folds):
        held = folds == fold
        distance[held] = ood_scores(X[~held], X[held])
    count = max(1, int(round(OUTLIER_SHARE * len(X))))
    order = np.argsort(-distance)[:count]
    # the distance's meaning: the share of the dataset's images that lie nearer to the other folds' images
    ranks = np.searchsorted(np.sort(distance), distance, side="left") / len(distance)
    return [{"id": data.ids[i], "label": data.y[i], "distance": round(float(distance[i]), 4),
             "percentile": round(100 * float(ranks[i]), 1)} for i in order]


def duplicate_rows(data: LabeledFeatures) -> list[dict]:
    pairs = data.duplicates
    if pairs is None:
        return []
    order = np.argsort(-pairs.similarity)
    return [{"id": data.ids[pairs.first[k]], "other": data.ids[pairs.second[k]],
             "similarity": round(float(pairs.similarity[k]), 4), "identical": bool(pairs.exact[k])} for k in order]


def scored_part(data: LabeledFeatures, keep: np.ndarray) -> LabeledFeatures:
    """The rows ``keep`` of ``data`` (those a single split scored), their duplicate pairs renumbered."""
    from dataclasses import replace

    from featcache.evaluation.leakage import DuplicatePairs

    index = np.full(len(data.y), -1)
    index[keep] = np.arange(int(keep.sum()))
    pairs = data.duplicates
    if pairs is not None:
        both = keep[pairs.first] & keep[pairs.second]
        pairs = DuplicatePairs(index[pairs.first[both]], index[pairs.second[both]], pairs.similarity[both],
                               pairs.exact[both], pairs.threshold, pairs.calibrated, pairs.search)
    rows = np.flatnonzero(keep)
    return replace(data, X=data.X[rows], y=data.y[rows], ids=[data.ids[i] for i in rows],
                   groups=None if data.groups is None else data.groups[rows],
                   splits=None if data.splits is None else data.splits[rows],
                   meta=None if data.meta is None else data.meta[rows],
                   sha256=[data.sha256[i] for i in rows] if data.sha256 else [], duplicates=pairs,
                   paths=[data.paths[i] for i in rows] if data.paths else [])


def audit_dataset(data: LabeledFeatures, oof: np.ndarray, folds: np.ndarray, lone: list[dict] | None = None
                  ) -> DatasetAudit:
    """Everything the audit finds in ``data`` (its rows in the order of ``oof``); ``lone``: the rows of
    :func:`lone_class_rows`, images left out of ``data``. Label conflicts and lone classes come first (each
    is an error for sure, or nearly), then the models' doubts."""
    from sklearn.metrics import balanced_accuracy_score

    lone = lone or []
    conflicts = label_conflicts(data)
    listed = {row["id"] for row in conflicts}
    doubts = [row for row in label_issues(data.ids, data.y, data.classes, oof) if row["id"] not in listed]
    accuracy = float(balanced_accuracy_score(data.y, np.asarray(data.classes)[oof.argmax(axis=1)]))
    return DatasetAudit(conflicts + lone + doubts, duplicate_rows(data), outliers(data, folds),
                        len(data.ids) + len(lone), accuracy, estimated_wrong_labels(data.y, data.classes, oof),
                        len(conflicts), len(lone))


def write_audit(audit: DatasetAudit, out: Path) -> dict[str, Path]:
    """``label_issues.csv``, ``duplicates.csv`` and ``outliers.csv`` in the folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows, header in (("label_issues", audit.label_issues, ["id", "given", "suggested", "score", "reason"]),
                               ("duplicates", audit.duplicates, ["id", "other", "similarity", "identical"]),
                               ("outliers", audit.outliers, ["id", "label", "distance", "percentile"])):
        path = out / f"{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        files[name] = path
    return files
