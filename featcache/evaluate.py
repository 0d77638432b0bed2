"""Fitting heads on cached features with an honest protocol, and the metrics that go with it.

Cross-validation is stratified and grouped by the source's group column (lesion / patient id)
whenever there is one; out-of-fold predictions are kept; every number comes with its spread.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import joblib
import numpy as np
from sklearn import metrics as skm
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import ParameterGrid, StratifiedGroupKFold, StratifiedKFold, cross_val_score
from sklearn.utils.class_weight import compute_sample_weight

from . import __version__, options
from .errors import RunError
from .hashing import bytes_hash, rows_hash, stable_hash
from .heads import GRIDS, HEADS_VERSION, ViewEnsemble, XGBHead, calibrated_grid, make_pipeline
from .leakage import DuplicatePairs, duplicate_groups, find_duplicates, held_out_with_duplicate, threshold_for
from .options import Calibration, ClassWeight, Grouping, Split, UseViews
from .progress import Reporter
from .runs import is_finished, run_path, write_run
from .sources import ImageSource, is_number
from .store import CacheEntry

if TYPE_CHECKING:
    from .cluster import RayCluster

MAIN_METRICS = ("balanced_accuracy", "macro_f1", "auroc", "accuracy")


def checked_choice(value: object, choices: type[Enum], option: str, optional: bool = False) -> str:
    """:func:`featcache.options.checked_choice`, failing as a :class:`RunError`."""
    try:
        return options.checked_choice(value, choices, option, optional)
    except options.ChoiceError as exc:
        raise RunError(str(exc)) from None


@dataclass
class Protocol:
    cv: int = 5
    split: str = "cv"  # Split
    seeds: int = 1
    class_weight: str = "balanced"  # ClassWeight
    pca: int | None = None
    tune: bool = False
    tune_budget_s: float = 300.0
    standardize: bool = True
    # On entries with several views: "all" = train on every view, average predictions over them;
    # "train" = train on every view, predict from the original; "first" = the original view only.
    views: str = "all"
    meta: str = ""  # comma list of metadata columns used as extra features, e.g. "age,sex,localization"
    calibrate: str = ""  # "", sigmoid, isotonic or temperature: recalibrate the head's probabilities
    groups: str = "auto"  # Grouping
    near_dup_threshold: float | None = None  # None: the calibrated one for the backbone (leakage.py)

    def __post_init__(self) -> None:
        self.split = checked_choice(self.split, Split, "--split")
        self.class_weight = checked_choice(self.class_weight, ClassWeight, "--class-weight")
        self.views = checked_choice(self.views, UseViews, "--use-views")
        self.calibrate = checked_choice(self.calibrate, Calibration, "--calibrate", optional=True)
        self.groups = checked_choice(self.groups, Grouping, "--groups")
        for name, value, low in (("--cv", self.cv, 2), ("--seeds", self.seeds, 1)):
            if int(value) < low:
                raise RunError(f"{name} {value}: must be at least {low}")
        if self.pca is not None and self.pca < 1:
            raise RunError(f"--pca {self.pca}: give a positive number of components")

    def describe(self, grouping: dict, split_counts: dict | None = None) -> str:
        """The protocol line shown with every score; an ungrouped CV says so in capitals."""
        counts = split_counts or {}
        if self.split == "official":
            val = f" / val {counts['val']} unused" if counts.get("val") else ""
            return f"official split (train {counts.get('train')}{val} / test {counts.get('test')})"
        if self.split == "random712":
            return (f"image-level random 7:1:2 split, UNGROUPED (train {counts.get('train')} / val "
                    f"{counts.get('val')} unused / test {counts.get('test')})")
        seeds = f" x{self.seeds} seeds" if self.seeds > 1 else " x1"
        if grouping.get("grouped"):
            return f"{self.cv}-fold grouped stratified CV{seeds} (groups: {grouping['by']})"
        return f"{self.cv}-fold stratified CV{seeds}, UNGROUPED ({grouping['by']})"

    def config(self) -> dict:
        """What names a run, with everything else that sets its numbers (see :func:`fit_head`)."""
        return asdict(self)


@dataclass
class LabeledFeatures:
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None
    splits: np.ndarray | None
    ids: list[str]
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    meta: np.ndarray | None = None  # (n, numeric + categorical columns), NaN where missing
    meta_spec: list[dict] = field(default_factory=list)  # per column: name, kind, categories
    sha256: list[str] = field(default_factory=list)  # of each row's image file (or array)
    # how the groups were found: {"grouped": bool, "by": text, "mode": Grouping value, "column": name}
    grouping: dict = field(default_factory=lambda: {"grouped": False, "by": "no groups", "mode": "none"})
    duplicates: DuplicatePairs | None = None  # the leakage audit of these rows

    def identity(self) -> str:
        """Hash of every value of these rows that sets a run's numbers: ids, image SHA-256s,
        labels, groups, splits and metadata (features are named by the image hash and the entry's
        fingerprint)."""
        n = len(self.ids)
        groups = self.groups if self.groups is not None else [None] * n
        splits = self.splits if self.splits is not None else [None] * n
        meta = self.meta.tolist() if self.meta is not None else [None] * n
        # rows built without a cache entry (the Python API) are named by their exact feature bytes
        images = self.sha256 or [bytes_hash(self.X)] * n
        return rows_hash(zip(self.ids, images, self.y.tolist(), list(groups), list(splits), meta, strict=True))


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"akiec=malignant,mel=malignant,*=benign"`` -> mapping; ``*`` maps every other label."""
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        if "=" not in part:
            raise RunError(f"--label-map {text!r}: {part!r} is not OLD=NEW")
        old, new = (s.strip() for s in part.split("=", 1))
        mapping[old] = new
    return mapping


def encode_meta(records: list, columns: list[str], spec: list[dict] | None = None,
                source_name: str = "") -> tuple[np.ndarray, list[dict]]:
    """Metadata columns as numbers: numeric ones as floats, categorical ones as codes into their
    sorted categories; empty cells are NaN (imputed later, inside the pipeline). Numeric columns
    come first. ``spec`` (from training data) fixes the categories, so test data is coded alike;
    a category unseen in training becomes missing."""
    names = [c["name"] for c in spec] if spec is not None else columns
    missing = [name for name in names if name not in records[0].meta]
    if missing:
        raise RunError(f"--meta {missing[0]}: {source_name} has no column {missing[0]!r}; it has "
                       f"{', '.join(records[0].meta) or 'no extra columns'}")
    if spec is None:
        spec = []
        for name in columns:
            filled = [v for v in (r.meta.get(name, "").strip() for r in records) if v]
            if all(is_number(v) for v in filled):
                spec.append({"name": name, "kind": "numeric"})
            else:
                spec.append({"name": name, "kind": "categorical", "categories": sorted(set(filled))})
        spec.sort(key=lambda c: c["kind"] != "numeric")
    out = np.full((len(records), len(spec)), np.nan)
    for j, column in enumerate(spec):
        codes = {c: float(i) for i, c in enumerate(column.get("categories", []))}
        for i, record in enumerate(records):
            value = record.meta.get(column["name"], "").strip()
            if value:
                out[i, j] = float(value) if column["kind"] == "numeric" else codes.get(value, np.nan)
    return out, spec


def labeled_features(source: ImageSource, entry: CacheEntry, pool: str, label_map: str | None = None,
                     classes: str | None = None, meta: str = "",
                     meta_spec: list[dict] | None = None, groups: str = "auto",
                     near_dup_threshold: float | None = None, audit: bool = True) -> LabeledFeatures:
    """Features of every labelled, successfully extracted image of ``source``, in source order.

    ``meta``: metadata columns to add (see :func:`encode_meta`); ``meta_spec`` codes them like
    the training data's. ``groups``: a :class:`Grouping` value. The leakage audit (identical and
    near-identical images) is run on the rows and kept in ``duplicates`` (``audit=False`` skips it
    for a held-out set, unless its groups come from it)."""
    from .extract import plan

    groups = checked_choice(groups, Grouping, "--groups")
    for part in getattr(entry, "parts", [(entry, pool)]):  # a fused entry: every backbone's
        stale, _ = plan(source, part[0].path)
        if stale:
            raise RunError(
                f"{len(stale)} images of {source.location} are not in {part[0].path} or changed since "
                f"extraction (first: {stale[0].id}); run `featcache extract` on this data first")
    mapping = parse_label_map(label_map)
    keep = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if keep is not None:
        known = {mapping.get(r.label, mapping.get("*", r.label)) for r in source.records if r.label is not None}
        unknown = [c for c in keep if c not in known]
        if unknown:
            raise RunError(f"--classes: {', '.join(map(repr, unknown))} not among the labels of {source.location} "
                           f"({', '.join(sorted(known))})")
    failed = entry.failed
    notes, rows = [], []
    unlabeled = 0
    for record in source.records:
        if record.id in failed:
            notes.append(f"left out {record.id}: extraction failed ({failed[record.id]})")
            continue
        label = record.label
        if label is not None and mapping:
            label = mapping.get(label, mapping.get("*", label))
        if label is None:
            unlabeled += 1
            continue
        if keep is not None and label not in keep:
            continue
        rows.append((record, label))
    if unlabeled:
        notes.append(f"left out {unlabeled} images without a label")
    if not rows:
        raise RunError(f"no labelled images left in {source.location} after --label-map/--classes")
    ids = [r.id for r, _ in rows]
    y = np.array([label for _, label in rows])
    class_names = sorted(set(y.tolist()))
    if len(class_names) < 2:
        raise RunError(f"only one class ({class_names[0]}) in {source.location}; need at least two")
    splits = np.array([r.split or "" for r, _ in rows]) if source.has_splits else None
    X = entry.read(pool, ids)
    finite = np.isfinite(X.reshape(len(X), -1)).all(axis=1)
    if not finite.all():
        raise RunError(f"{int((~finite).sum())} images have NaN/Inf features in {entry.path} (first: "
                       f"{ids[int(np.argmin(finite))]}): the cache is damaged. Run `featcache verify --repair "
                       f"{entry.path}`, then `featcache extract` again")
    state = entry.state()
    sha256 = [state[i].sha256 for i in ids]
    duplicates = None
    if audit or groups == Grouping.near_duplicates.value:
        threshold, calibrated = _threshold(entry, pool, near_dup_threshold)
        duplicates = find_duplicates(X, sha256, threshold, calibrated)
    group_values, grouping = _grouping(source, [r for r, _ in rows], groups, duplicates)
    meta_values, spec = None, []
    columns = [c.strip() for c in meta.split(",") if c.strip()]
    if columns:
        meta_values, spec = encode_meta([r for r, _ in rows], columns, meta_spec, str(source.location))
    return LabeledFeatures(X, y, group_values, splits, ids, class_names, notes, meta_values, spec, sha256,
                           grouping, duplicates)


def _threshold(entry: CacheEntry, pool: str, given: float | None) -> tuple[float, bool]:
    try:
        return threshold_for(entry.manifest["backbone"], pool, given)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def _grouping(source: ImageSource, records: list, mode: str,
              duplicates: DuplicatePairs | None) -> tuple[np.ndarray | None, dict]:
    """Group labels for ``records`` under ``mode`` and a description of where they came from."""
    column = source.group_column
    if mode == Grouping.near_duplicates.value:
        if column:
            raise RunError(f"--groups near-duplicates: {source.location} already has the group column "
                           f"{column!r}; use it (the default) or pass --no-groups, not both")
        groups = duplicate_groups(len(records), duplicates)
        return groups, {"grouped": True, "mode": mode, "column": None,
                        "by": f"near-duplicates, {len(set(groups.tolist()))} groups of {len(records)} images"}
    if mode == Grouping.none.value:
        return None, {"grouped": False, "mode": mode, "column": column, "by": "--no-groups"}
    if column:
        groups = np.array([r.group or f"(image {r.id})" for r in records])  # an empty cell: its own group
        return groups, {"grouped": True, "mode": mode, "column": column, "by": f"column {column!r}"}
    why = "no group column"
    if source.suspect_group_columns:
        why += f"; {', '.join(map(repr, source.suspect_group_columns))} may be one: pass --group-col NAME"
    return None, {"grouped": False, "mode": mode, "column": None, "by": why,
                  "suspects": list(source.suspect_group_columns)}


_FOLDS_MEMO: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}


def make_folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold, grouped when ``groups`` is given (no group in two folds).

    Memoized by the content of ``y`` and ``groups``: StratifiedGroupKFold takes ~2 s on 10k images
    (its search is in Python), which every head of a grid would otherwise pay again.
    """
    key = stable_hash([np.asarray(y, dtype=str).tolist(),
                       None if groups is None else np.asarray(groups, dtype=str).tolist(), k, seed])
    if key not in _FOLDS_MEMO:
        _FOLDS_MEMO[key] = _make_folds(y, groups, k, seed)
    return [(train.copy(), test.copy()) for train, test in _FOLDS_MEMO[key]]


def _make_folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    if smallest < k:
        raise RunError(f"--cv {k}: the smallest class has only {smallest} images; use --cv {max(2, smallest)}")
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y, groups))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


VALIDATION_SPLITS = ("val", "valid", "validation", "dev")


def official_split(splits: np.ndarray | None) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """Train on the rows marked train (or anything but test and validation), test on ``test``.
    Validation rows are left out: heads choose their settings by inner CV on the training part."""
    if splits is None:
        raise RunError("--split official: this source has no split column (or npz splits)")
    lowered = np.char.lower(splits.astype(str))
    test = lowered == "test"
    val = np.isin(lowered, VALIDATION_SPLITS)
    if not test.any() or (test | val).all():
        raise RunError("--split official: need rows with split 'test' and rows with a training split; "
                       f"found {', '.join(sorted(set(lowered.tolist())))}")
    train = ~(test | val)
    counts = {"train": int(train.sum()), "val": int(val.sum()), "test": int(test.sum())}
    return [(np.flatnonzero(train), np.flatnonzero(test))], counts


def random_712_split(y: np.ndarray, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """Image-level stratified random split 70 / 10 / 20 (DermaMNIST's protocol): train on the 70 %,
    test on the 20 %; the 10 % validation part is left unused. Lesions are *not* kept together,
    which is the point of running it: it shows how much image-level splitting inflates scores."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=0.2, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=y[rest])
    counts = {"train": len(train), "val": len(val), "test": len(test)}
    return [(np.sort(train), np.sort(test))], counts


def _clip_rows(proba: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Keep log-loss finite for hard 0/1 predictions (kNN, baselines) while rows still sum to one."""
    clipped = np.clip(proba, eps, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def expected_calibration_error(y_idx: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |confidence - accuracy| averaged over ``bins`` equal-width confidence bins,
    weighted by the share of images in each (Guo et al. 2017)."""
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == y_idx
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        in_bin = which == b
        total += in_bin.mean() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(total)


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """All scalar metrics plus per-class scores and the confusion matrix."""
    classes = list(classes)
    y_idx = np.array([classes.index(v) for v in y_true])
    pred = proba.argmax(axis=1)
    labels = np.arange(len(classes))
    p, r, f, support = skm.precision_recall_fscore_support(y_idx, pred, labels=labels, zero_division=0)
    out = {
        "accuracy": skm.accuracy_score(y_idx, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_idx, pred),
        "macro_f1": float(np.mean(f)),
        "macro_recall": float(np.mean(r)),
        "macro_precision": float(np.mean(p)),
        "log_loss": skm.log_loss(y_idx, _clip_rows(proba), labels=labels),
        # the same with every class weighing equally: the yardstick for class-balanced probabilities
        "log_loss_balanced": skm.log_loss(y_idx, _clip_rows(proba), labels=labels,
                                          sample_weight=compute_sample_weight("balanced", y_idx)),
        "brier": float(np.mean(np.sum((proba - np.eye(len(classes))[y_idx]) ** 2, axis=1))),
        "ece": expected_calibration_error(y_idx, proba),
    }
    present = np.unique(y_idx)
    if len(classes) == 2:
        positive = int(np.argmin(np.bincount(y_idx, minlength=2)))  # the rarer class, e.g. melanoma
        if len(present) == 2:
            out["auroc"] = skm.roc_auc_score(y_idx == positive, proba[:, positive])
        out["positive_class"] = classes[positive]
        tp = np.sum((pred == positive) & (y_idx == positive))
        tn = np.sum((pred != positive) & (y_idx != positive))
        out["sensitivity"] = tp / max(1, np.sum(y_idx == positive))
        out["specificity"] = tn / max(1, np.sum(y_idx != positive))
    else:
        if len(present) == len(classes):
            out["auroc"] = skm.roc_auc_score(y_idx, proba, multi_class="ovr", average="macro",
                                             labels=labels)
        out["top2_accuracy"] = skm.top_k_accuracy_score(y_idx, proba, k=2, labels=labels)
    for i, c in enumerate(classes):  # one-vs-rest, per class: `compare --metric auroc:<class>`
        if 0 < np.sum(y_idx == i) < len(y_idx):
            out[f"auroc:{c}"] = skm.roc_auc_score(y_idx == i, proba[:, i])
    out = {k: (float(v) if not isinstance(v, str) else v) for k, v in out.items()}
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(support[i])} for i, c in enumerate(classes)}
    out["confusion_matrix"] = skm.confusion_matrix(y_idx, pred, labels=labels).tolist()
    return out


def bootstrap_draws(y_true: np.ndarray, proba: np.ndarray, classes: list[str], n: int = 500,
                    seed: int = 0, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The main metrics on ``n`` bootstrap resamples (NaN where a resample cannot score one).

    With ``groups`` whole groups are resampled (all images of a lesion together), as the folds
    were made: resampling images of correlated groups would make the interval too narrow.
    A resample is a vector of counts per image, so every metric is computed for blocks of resamples
    at once from weighted confusion matrices and weighted rank sums: the same numbers as scikit-learn
    on each resample (tested), about 100x faster (10 s per run on 10k images before). The same
    ``seed`` draws the same resamples for the same rows, so draws of several seeds' predictions line up.
    """
    rng = np.random.default_rng(seed)
    classes = list(classes)
    k, m = len(classes), len(y_true)
    y_idx = np.array([classes.index(v) for v in y_true])
    group_of = None if groups is None else np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    units = m if group_of is None else int(group_of.max()) + 1
    pred = proba.argmax(axis=1)
    pairs = np.eye(k * k)[y_idx * k + pred]  # (m, k*k): one-hot of (true, predicted)
    auc_columns = [int(np.argmin(np.bincount(y_idx, minlength=2)))] if k == 2 else list(range(k))
    draws: dict[str, list[np.ndarray]] = {metric: [] for metric in MAIN_METRICS}
    for start in range(0, n, 100):
        counts = np.stack([np.bincount(rng.integers(0, units, units), minlength=units)
                           for _ in range(min(100, n - start))]).astype(np.int32)
        if group_of is not None:
            counts = counts[:, group_of]  # every image of a drawn group, as often as the group
        confusion = (counts.astype(np.float64) @ pairs).reshape(-1, k, k)
        support, predicted = confusion.sum(axis=2), confusion.sum(axis=1)
        tp = np.diagonal(confusion, axis1=1, axis2=2)
        present = support > 0
        usable = present.sum(axis=1) >= 2
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                       where=(precision + recall) > 0)
        n_present = np.maximum(present.sum(axis=1), 1)
        draws["accuracy"].append(np.where(usable, tp.sum(axis=1) / np.maximum(counts.sum(axis=1), 1), np.nan))
        draws["balanced_accuracy"].append(np.where(usable, (recall * present).sum(axis=1) / n_present, np.nan))
        draws["macro_f1"].append(np.where(usable, (f1 * present).sum(axis=1) / n_present, np.nan))
        complete = present.all(axis=1)
        aucs = np.full(len(counts), np.nan)
        if complete.any():
            aucs[complete] = np.mean([_weighted_auc(proba[:, c], y_idx == c, counts[complete])
                                      for c in auc_columns], axis=0)
        draws["auroc"].append(aucs)
    return {metric: np.concatenate(parts) for metric, parts in draws.items()}


def percentile_ci(draws: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """95 % percentile intervals of bootstrap ``draws`` (resamples that cannot score are left out)."""
    out = {}
    for metric, values in draws.items():
        values = values[~np.isnan(values)]
        if len(values):
            out[metric] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, classes: list[str], n: int = 500,
                 seed: int = 0, groups: np.ndarray | None = None) -> dict[str, list[float]]:
    """Percentile 95 % intervals of the main metrics (see :func:`bootstrap_draws`)."""
    return percentile_ci(bootstrap_draws(y_true, proba, classes, n, seed, groups))


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` for each row of image ``counts`` (ties count one half, as sklearn)."""
    if len(counts) == 0:
        return np.zeros(0)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    # Integer counts keep every sum exact (the same numbers as sklearn) and halve the memory traffic.
    weights = counts.astype(np.int32, copy=False).take(order, axis=1)
    pos = weights * positive[order]
    neg = weights - pos
    ties = len(starts) < len(scores)
    if ties:  # merge tied scores into one column per distinct score
        pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
    # pairs (positive above negative) + half the tied pairs = sum pos * (negatives at or below - neg / 2)
    twice_pairs = 2 * (pos * np.cumsum(neg, axis=1, dtype=np.int32)).sum(axis=1, dtype=np.int64)
    if ties:
        twice_pairs -= (pos * neg).sum(axis=1, dtype=np.int64)
    return twice_pairs / (2.0 * pos.sum(axis=1, dtype=np.int64) * neg.sum(axis=1, dtype=np.int64))


def _align(proba: np.ndarray, fitted: list, classes: list[str]) -> np.ndarray:
    """Columns of ``proba`` (the estimator's classes) placed under the full class list."""
    out = np.zeros((len(proba), len(classes)))
    for j, c in enumerate(fitted):
        out[:, classes.index(c)] = proba[:, j]
    return out


class BudgetedSearch(ClassifierMixin, BaseEstimator):
    """Grid search by inner cross-validation that stops when its time budget is spent.

    Candidates are tried in grid order, and every grid in ``heads.GRIDS`` lists the documented
    default first, so a search that runs out of time still returns at least the default. A
    candidate is not started when the mean cost of those before it would overrun the budget.
    Ties go to the earlier (default-most) candidate. ``cv_results_`` records what was tried.
    """

    def __init__(self, estimator, param_grid: dict, cv, budget_s: float = 300.0,
                 scoring: str = "balanced_accuracy"):
        self.estimator, self.param_grid, self.cv = estimator, param_grid, cv
        self.budget_s, self.scoring = budget_s, scoring

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> BudgetedSearch:
        started = time.perf_counter()
        self.cv_results_: list[dict] = []
        candidates = list(ParameterGrid(self.param_grid))
        for params in candidates:
            spent = time.perf_counter() - started
            if self.cv_results_ and spent + spent / len(self.cv_results_) > self.budget_s:
                break
            tick = time.perf_counter()
            scores = cross_val_score(clone(self.estimator).set_params(**params), X, y, groups=groups,
                                     cv=self.cv, scoring=self.scoring)
            self.cv_results_.append({"params": params, "score": float(np.mean(scores)),
                                     "seconds": time.perf_counter() - tick})
        best = max(self.cv_results_, key=lambda r: r["score"])  # first maximum: the default wins ties
        self.best_params_ = best["params"]
        self.n_candidates_ = len(candidates)
        self.best_estimator_ = clone(self.estimator).set_params(**self.best_params_).fit(X, y)
        self.classes_ = self.best_estimator_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.best_estimator_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.best_estimator_.predict(X)


@dataclass(frozen=True)
class Layout:
    """How a row of features is laid out: image features (per view), then metadata columns."""

    image_dim: int
    views: bool = False  # rows are (views, dim) blocks: wrap the pipeline in a ViewEnsemble
    meta_numeric: int = 0
    meta_categorical: int = 0

    @classmethod
    def of(cls, data: LabeledFeatures) -> Layout:
        kinds = [c["kind"] for c in data.meta_spec]
        return cls(int(data.X.shape[-1]), data.X.ndim == 3, kinds.count("numeric"), kinds.count("categorical"))


def with_meta(X: np.ndarray, meta: np.ndarray | None) -> np.ndarray:
    """Image features ``X`` with the metadata columns appended (repeated for every view)."""
    if meta is None:
        return X
    meta = meta.astype(X.dtype)
    if X.ndim == 3:
        meta = np.repeat(meta[:, None, :], X.shape[1], axis=1)
    return np.concatenate([X, meta], axis=-1)


def score_with_ci(y_true: np.ndarray, proba: np.ndarray, classes: list[str],
                  groups: np.ndarray | None = None) -> dict:
    """:func:`compute_metrics` plus the bootstrap 95 % intervals under ``ci95`` (``groups``:
    resample whole groups)."""
    return score_parts([(y_true, proba, groups)], classes)


def score_parts(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], classes: list[str]) -> dict:
    """Scores of several seeds' predictions ``(y_true, proba, groups)``, one part per seed.

    Every scalar is the mean over seeds, ``seeds`` holds each seed's value and their spread, the
    confusion matrix counts every seed's predictions, and the interval is that of the
    seed-averaged score: resample k of every seed is scored, the k-th scores are averaged, and the
    percentiles are taken over those averages (the same rows draw the same resamples)."""
    per_seed = [compute_metrics(y, p, classes) for y, p, _ in parts]
    draws = [bootstrap_draws(y, p, classes, groups=g) for y, p, g in parts]
    ci = percentile_ci({m: np.mean([d[m] for d in draws], axis=0) for m in draws[0]})
    if len(per_seed) == 1:
        return {**per_seed[0], "ci95": ci}
    first = per_seed[0]
    scores = {k: float(np.mean([s[k] for s in per_seed])) for k, v in first.items()
              if isinstance(v, float) and all(k in s for s in per_seed)}
    scores.update({k: v for k, v in first.items() if isinstance(v, str)})
    scores["per_class"] = {c: {m: (float(np.mean([s["per_class"][c][m] for s in per_seed])) if m != "support"
                                   else first["per_class"][c][m]) for m in first["per_class"][c]}
                           for c in first["per_class"]}
    scores["confusion_matrix"] = np.sum([s["confusion_matrix"] for s in per_seed], axis=0).tolist()
    scores["seeds"] = {m: {"values": [s[m] for s in per_seed], "std": float(np.std([s[m] for s in per_seed]))}
                       for m in MAIN_METRICS if m in scores}
    scores["ci95"] = ci
    return scores


def build_estimator(head: str, protocol: Protocol, seed: int = 0, layout: Layout | None = None,
                    groups_for_inner: bool = False):
    """The whole model for one fit: pipeline, view handling, and the tuning search around them."""
    layout = layout or Layout(0)
    model = make_pipeline(head, protocol.class_weight, protocol.pca, seed, protocol.standardize,
                          layout.image_dim, layout.meta_numeric, layout.meta_categorical, protocol.calibrate)
    grid = calibrated_grid(GRIDS.get(head, {}), model.named_steps["head"])
    prefix = ""
    if layout.views:
        model = ViewEnsemble(model, train_views="first" if protocol.views == "first" else "all",
                             test_views="all" if protocol.views == "all" else "first")
        prefix = "estimator__"
    if protocol.tune and grid:
        inner = StratifiedGroupKFold(3, shuffle=True, random_state=seed) if groups_for_inner \
            else StratifiedKFold(3, shuffle=True, random_state=seed)
        grid = {prefix + key: values for key, values in grid.items()}
        return BudgetedSearch(model, grid, cv=inner, budget_s=protocol.tune_budget_s)
    return model


def _fit(estimator, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None):
    if isinstance(estimator, BudgetedSearch):
        return estimator.fit(X, y, groups=groups)
    return estimator.fit(X, y)


def _fit_task(head: str, protocol: Protocol, layout: Layout, X: np.ndarray, y: np.ndarray,
              groups: np.ndarray | None, train: np.ndarray, test_idx: np.ndarray | None, seed: int, threads: int):
    """One fold (or the final refit when ``test_idx`` is None) in a worker with ``threads`` threads."""
    from threadpoolctl import threadpool_limits

    if head == "mlp":
        import torch

        torch.set_num_threads(threads)
    with threadpool_limits(threads):
        est = build_estimator(head, protocol, seed, layout, groups is not None)
        for step in est.get_params().values():  # XGBoost's OpenMP pool is not one threadpoolctl reaches
            if isinstance(step, XGBHead):
                step.set_params(n_jobs=threads)
        _fit(est, X[train], y[train], None if groups is None else groups[train])
        proba = None if test_idx is None else est.predict_proba(X[test_idx])
    return est, proba


def _fit_shared(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, head: str, protocol: Protocol,
                layout: Layout, train: np.ndarray, test_idx: np.ndarray | None, seed: int, threads: int):
    """:func:`_fit_task` with the arrays every task shares first (they travel once, as Ray objects)."""
    return _fit_task(head, protocol, layout, X, y, groups, train, test_idx, seed, threads)


def _run_tasks(head: str, protocol: Protocol, data: LabeledFeatures, X: np.ndarray, tasks: list,
               jobs: int | None, cluster: RayCluster | None = None) -> list:
    if cluster is not None:  # one CPU and one thread per task, as the local path gives each when busy
        calls = [(head, protocol, Layout.of(data), train, test_idx, seed, 1) for seed, train, test_idx in tasks]
        return cluster.run_tasks(_fit_shared, (X, data.y, data.groups), calls)
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs or cores, len(tasks)))
    threads = max(1, cores // jobs)
    layout = Layout.of(data)
    calls = [joblib.delayed(_fit_task)(head, protocol, layout, X, data.y, data.groups, train, test_idx,
                                       seed, threads) for seed, train, test_idx in tasks]
    return joblib.Parallel(n_jobs=jobs)(calls)  # n_jobs=1 runs in this process


def estimator_params(estimator) -> dict:
    """The plain-valued parameters of an estimator, so a run is named by everything that made it."""
    return {k: v for k, v in sorted(estimator.get_params(deep=True).items())
            if v is None or isinstance(v, (str, int, float, bool))}


def _summarise(per_fold: list[dict]) -> dict:
    keys = [k for k, v in per_fold[0].items() if isinstance(v, float)]
    return {k: {"mean": float(np.mean([f[k] for f in per_fold if k in f])),
                "std": float(np.std([f[k] for f in per_fold if k in f]))} for k in keys}


Folds = list[tuple[np.ndarray, np.ndarray]]


def split_plan(data: LabeledFeatures, protocol: Protocol, seed: int) -> tuple[Folds, dict]:
    """The (train, held-out) index pairs of one seed, and the part sizes of a single split."""
    if protocol.split == "official":
        return official_split(data.splits)
    if protocol.split == "random712":
        return random_712_split(data.y, seed)
    return make_folds(data.y, data.groups, protocol.cv, seed), {}


def leakage_summary(data: LabeledFeatures, folds: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """What the duplicate audit found in ``data``, and how many held-out images of ``folds`` have an
    identical or near-identical image on the training side."""
    pairs = data.duplicates
    if pairs is None:
        return {}
    leaking = held_out_with_duplicate(pairs, folds, len(data.y))
    held_out = int(sum(len(test) for _, test in folds))
    return {"exact_duplicate_pairs": pairs.n_exact, "near_duplicate_pairs": pairs.n_near,
            "threshold": pairs.threshold, "threshold_calibrated": pairs.calibrated,
            "held_out_with_duplicate_in_train": leaking, "held_out": held_out}


def leakage_message(leak: dict, grouping: dict) -> tuple[str, bool]:
    """A sentence for the user about ``leak`` and whether it is a warning (scores likely inflated)."""
    if not leak:
        return "", False
    calibrated = "" if leak["threshold_calibrated"] else (
        " (threshold not calibrated for this backbone; set --near-dup-threshold)")
    found = (f"leakage audit: {leak['exact_duplicate_pairs']} identical and {leak['near_duplicate_pairs']} "
             f"near-identical image pairs (cosine >= {leak['threshold']:.2f}){calibrated}")
    n, total = leak["held_out_with_duplicate_in_train"], leak["held_out"]
    if not n:
        return found + "; no held-out image has one on its training side", False
    found += f"; {n} of {total} held-out images have one on their training side"
    if grouping.get("grouped"):
        return found + f" despite the groups ({grouping['by']}): check that the groups are right", True
    return (found + ": scores are likely inflated. Pass --group-col NAME if the data has a patient or lesion "
            "column, or --groups near-duplicates to keep such images together"), True


def run_identity(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol,
                 test: LabeledFeatures | None = None) -> dict:
    """Everything that sets a run's numbers; its hash names the run (see :func:`fit_head`)."""
    return {"head": head, "heads_version": HEADS_VERSION, "pool": pool, "protocol": protocol.config(),
            "classes": data.classes, "feature_fingerprint": entry.fingerprint,
            "estimator": estimator_params(build_estimator(head, protocol, 0, Layout.of(data))),
            "data_sha256": data.identity(), "test_data_sha256": test.identity() if test else None,
            "views": int(data.X.shape[1]) if data.X.ndim == 3 else 1, "meta_spec": data.meta_spec}


def run_dir_for(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol,
                test: LabeledFeatures | None = None) -> Path:
    """The folder :func:`fit_head` writes this run to (finished or not)."""
    return run_path(entry.path, head, pool, stable_hash(run_identity(data, entry, head, pool, protocol, test), 12))


def _check_neighbours(params: dict, smallest_train: int, head: str, tune: bool) -> None:
    """A neighbour count larger than a training part fails deep inside scikit-learn; say it here."""
    wanted = max((v for k, v in params.items() if k.endswith("n_neighbors")), default=0)
    tuned = max((max(v) for k, v in GRIDS.get(head, {}).items() if k.endswith("n_neighbors")), default=0)
    inner_train = smallest_train * 2 // 3  # --tune's inner 3-fold CV trains on two thirds
    if wanted > smallest_train:
        raise RunError(f"{head}: {wanted} neighbours, but a training part has only {smallest_train} rows; "
                       "use fewer --cv folds, more images, or another head")
    if tune and tuned > inner_train:
        raise RunError(f"{head} --tune tries up to {tuned} neighbours, but its inner training parts have about "
                       f"{inner_train} images; drop --tune or use fewer --cv folds")


def fit_head(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol,
             source_name: str, label_desc: str = "", force: bool = False,
             test: LabeledFeatures | None = None, reporter: Reporter | None = None,
             jobs: int | None = None, cluster: RayCluster | None = None) -> Path:
    """Cross-validate one head, refit it on all training rows, and write a run directory.

    The run is named by the hash of everything that sets its numbers: the head's code version and
    every estimator parameter, the protocol, the feature fingerprint and pooling, and every row
    used (id, image SHA-256, label, group, split, metadata) of the training and the test data.
    A change to any of these makes a new run; an identical fit reuses the finished one.

    ``jobs``: worker processes for the folds (default: one per CPU core, at most the number of
    tasks). Every fold's estimator is seeded, so the result does not depend on it.
    """
    reporter = reporter or Reporter(quiet=True)
    meta_names = [c["name"] for c in data.meta_spec]
    if test is not None and [c["name"] for c in test.meta_spec] != meta_names:
        raise RunError(f"the test data must carry the same --meta columns as the training data "
                       f"({','.join(meta_names) or 'none'}); pass the same --meta for both")
    identity = run_identity(data, entry, head, pool, protocol, test)
    config = {**identity, "dataset": source_name, "labels": label_desc, "backbone": entry.manifest["backbone"],
              "grouping": data.grouping,
              # which images were scored: runs whose predictions line up image by image (ensembles)
              "ids_sha256": rows_hash([i] for i in data.ids),
              "test_ids_sha256": rows_hash([i] for i in test.ids) if test else None}
    run_dir = run_path(entry.path, head, pool, stable_hash(identity, 12))
    if is_finished(run_dir) and not force:
        reporter.info(f"{head}: identical run already finished, reusing {run_dir} (--force to redo)")
        return run_dir
    started = time.perf_counter()
    plans = [split_plan(data, protocol, seed) for seed in range(protocol.seeds)]
    split_counts = plans[0][1]
    fold_plan = [(seed, fold, train, test_idx) for seed, (folds, _) in enumerate(plans)
                 for fold, (train, test_idx) in enumerate(folds)]
    # Every fold and the final refit on all rows are independent tasks, run side by side in worker
    # processes of one BLAS/OpenMP/torch thread each: most head solvers are single-threaded, and
    # the small-matrix ones lose time to a second thread (logreg: 0.7 s on 1 thread, 1.7 s on 2).
    tasks = [(seed, train, test_idx) for seed, _, train, test_idx in fold_plan]
    tasks.append((0, np.arange(len(data.y)), None))  # the final refit on all rows
    views = data.X.shape[1] if data.X.ndim == 3 and protocol.views != "first" else 1  # a head sees every view
    _check_neighbours(identity["estimator"], views * min(len(train) for _, train, _ in tasks), head, protocol.tune)
    X = with_meta(data.X, data.meta)
    outputs = _run_tasks(head, protocol, data, X, tasks, jobs, cluster)
    final, cv_seconds = outputs[-1][0], time.perf_counter() - started
    fold_metrics, oof_rows, oof_by_seed = [], [], {}
    for (seed, fold, _, test_idx), (est, proba) in zip(fold_plan, outputs[:-1], strict=True):
        proba = _align(proba, list(est.classes_), data.classes)
        oof = oof_by_seed.setdefault(seed, np.full((len(data.y), len(data.classes)), np.nan))
        oof[test_idx] = proba
        fold_metrics.append(compute_metrics(data.y[test_idx], proba, data.classes))
        oof_rows.extend((seed, fold, data.ids[i], None if data.groups is None else data.groups[i], data.y[i],
                         proba[k]) for k, i in enumerate(test_idx))
    # Pooled over every seed: each seed's out-of-fold predictions scored, then averaged; the
    # interval resamples groups when there are groups.
    parts = []
    for seed in range(protocol.seeds):
        scored = ~np.isnan(oof_by_seed[seed]).any(axis=1)
        parts.append((data.y[scored], oof_by_seed[seed][scored],
                      None if data.groups is None else data.groups[scored]))
    pooled = score_parts(parts, data.classes)
    model = final.best_estimator_ if hasattr(final, "best_estimator_") else final
    leak = leakage_summary(data, plans[0][0])
    result = {"config": config, "protocol": protocol.describe(data.grouping, split_counts),
              "grouping": data.grouping, "split_counts": split_counts, "leakage": leak,
              "n_images": len(data.y), "n_folds": len(plans[0][0]), "seeds": protocol.seeds,
              "folds": _summarise(fold_metrics), "pooled": pooled, "per_fold": fold_metrics,
              "cv_seconds": cv_seconds, "notes": data.notes, "featcache": __version__}
    if isinstance(final, BudgetedSearch):
        result["best_params"] = final.best_params_
        result["search"] = {"tried": final.cv_results_, "grid_size": final.n_candidates_,
                            "budget_s": protocol.tune_budget_s}
    head_est = model.named_steps["head"]
    if hasattr(head_est, "loss_curve_"):
        result["mlp_loss_curve"] = head_est.loss_curve_
        # epochs and rows of every fit (folds, then the final refit): what a training loop would redo
        result["mlp_fits"] = [{"epochs": out[0].named_steps["head"].n_epochs_, "rows": len(task[1])}
                              for out, task in zip(outputs, tasks, strict=True)
                              if hasattr(out[0], "named_steps")]
    test_rows = None
    if test is not None:
        proba = _align(model.predict_proba(with_meta(test.X, test.meta)), list(model.classes_), data.classes)
        test_rows = (test.ids, test.y, proba)
        keep = np.isin(test.y, data.classes)
        result["test"] = score_with_ci(test.y[keep], proba[keep], data.classes,
                                       None if test.groups is None else test.groups[keep])
        result["test"]["n_images"] = int(keep.sum())
    payload = {"pipeline": model, "classes": data.classes, "feature_fingerprint": entry.fingerprint,
               "pool": pool, "backbone": config["backbone"], "config": config,
               "train_ids": data.ids, "train_sha256": data.sha256,  # for predict's duplicate check
               "fusion": entry.manifest.get("parts")}  # a fused run: which entries and poolings it read
    write_run(run_dir, config, result, payload, data.classes, oof_rows, test_rows)
    return run_dir
