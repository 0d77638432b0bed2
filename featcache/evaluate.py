"""Fitting heads on cached features with an honest protocol, and the metrics that go with it.

Cross-validation is stratified and grouped by the source's group column (lesion / patient id)
whenever there is one; out-of-fold predictions are kept; every number comes with its spread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import joblib
import numpy as np
from sklearn import metrics as skm
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import ParameterGrid, StratifiedGroupKFold, StratifiedKFold, cross_val_score
from sklearn.utils.class_weight import compute_sample_weight

from . import __version__
from .errors import RunError
from .heads import GRIDS, ViewEnsemble, XGBHead, calibrated_grid, make_pipeline
from .progress import Reporter
from .sources import ImageSource
from .store import CacheEntry, write_json_atomic

MAIN_METRICS = ("balanced_accuracy", "macro_f1", "auroc", "accuracy")


@dataclass
class Protocol:
    cv: int = 5
    split: str = "cv"  # "cv" or "official"
    seeds: int = 1
    class_weight: str = "balanced"
    pca: int | None = None
    tune: bool = False
    tune_budget_s: float = 300.0
    standardize: bool = True
    # On entries with several views: "all" = train on every view, average predictions over them;
    # "train" = train on every view, predict from the original; "first" = the original view only.
    views: str = "all"
    meta: str = ""  # comma list of metadata columns used as extra features, e.g. "age,sex,localization"
    calibrate: str = ""  # "", sigmoid, isotonic or temperature: recalibrate the head's probabilities

    def describe(self, grouped: bool) -> str:
        if self.split == "official":
            return "official split"
        if self.split == "random712":
            return "image-level random 7:1:2 split (train on 70 %, test on 20 %)"
        return f"{self.cv}-fold {'grouped ' if grouped else ''}stratified CV x{self.seeds}"

    def config(self) -> dict:
        """What names a run: every field, except the newer ones while they hold their defaults
        (so runs made before those options existed keep their names)."""
        fields = asdict(self)
        for key, default in (("views", "all"), ("meta", ""), ("calibrate", "")):
            if fields[key] == default:
                del fields[key]
        return fields


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
            if all(_is_number(v) for v in filled):
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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def labeled_features(source: ImageSource, entry: CacheEntry, pool: str, label_map: str | None = None,
                     classes: str | None = None, meta: str = "",
                     meta_spec: list[dict] | None = None) -> LabeledFeatures:
    """Features of every labelled, successfully extracted image of ``source``, in source order.

    ``meta``: metadata columns to add (see :func:`encode_meta`); ``meta_spec`` codes them like
    the training data's."""
    from .extract import plan

    stale, _ = plan(source, entry.path)
    if stale:
        raise RunError(
            f"{len(stale)} images of {source.location} are not in {entry.path} or changed since "
            f"extraction (first: {stale[0].id}); run `featcache extract` on this data first")
    mapping = parse_label_map(label_map)
    keep = [c.strip() for c in classes.split(",")] if classes else None
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
    groups = np.array([r.group or r.id for r, _ in rows]) if source.has_groups else None
    splits = np.array([r.split or "" for r, _ in rows]) if source.has_splits else None
    X = entry.read(pool, ids)
    meta_values, spec = None, []
    columns = [c.strip() for c in meta.split(",") if c.strip()]
    if columns:
        meta_values, spec = encode_meta([r for r, _ in rows], columns, meta_spec, str(source.location))
    return LabeledFeatures(X, y, groups, splits, ids, class_names, notes, meta_values, spec)


_FOLDS_MEMO: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}


def make_folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold, grouped when ``groups`` is given (no group in two folds).

    Memoized by the content of ``y`` and ``groups``: StratifiedGroupKFold takes ~2 s on 10k images
    (its search is in Python), which every head of a grid would otherwise pay again.
    """
    key = hashlib.sha256(b"".join([np.asarray(y, dtype=str).tobytes(), b"|",
                                   b"" if groups is None else np.asarray(groups, dtype=str).tobytes(),
                                   f"|{k}|{seed}|{groups is None}".encode()])).hexdigest()
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


def official_split(splits: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    if splits is None:
        raise RunError("--split official: this source has no split column (or npz splits)")
    test = np.isin(np.char.lower(splits.astype(str)), ["test"])
    if not test.any() or test.all():
        raise RunError("--split official: need rows with split 'test' and rows with another split")
    return [(np.flatnonzero(~test), np.flatnonzero(test))]


def random_712_split(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Image-level stratified random split 70 / 10 / 20 (DermaMNIST's protocol): train on the 70 %,
    test on the 20 %; the 10 % validation part is left unused. Lesions are *not* kept together,
    which is the point of running it: it shows how much image-level splitting inflates scores."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=0.2, random_state=seed, stratify=y)
    train, _val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=y[rest])
    return [(np.sort(train), np.sort(test))]


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
    out = {k: (float(v) if not isinstance(v, str) else v) for k, v in out.items()}
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(support[i])} for i, c in enumerate(classes)}
    out["confusion_matrix"] = skm.confusion_matrix(y_idx, pred, labels=labels).tolist()
    return out


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, classes: list[str], n: int = 500,
                 seed: int = 0) -> dict[str, list[float]]:
    """Percentile 95 % intervals of the main metrics over bootstrap resamples of the images.

    A resample is a vector of counts per image, so every metric is computed for blocks of resamples
    at once from weighted confusion matrices and weighted rank sums: the same numbers as scikit-learn
    on each resample (tested), about 100x faster (10 s per run on 10k images before).
    """
    rng = np.random.default_rng(seed)
    classes = list(classes)
    k, m = len(classes), len(y_true)
    y_idx = np.array([classes.index(v) for v in y_true])
    pred = proba.argmax(axis=1)
    pairs = np.eye(k * k)[y_idx * k + pred]  # (m, k*k): one-hot of (true, predicted)
    auc_columns = [int(np.argmin(np.bincount(y_idx, minlength=2)))] if k == 2 else list(range(k))
    draws: dict[str, list[np.ndarray]] = {metric: [] for metric in MAIN_METRICS}
    for start in range(0, n, 100):
        counts = np.stack([np.bincount(rng.integers(0, m, m), minlength=m)
                           for _ in range(min(100, n - start))]).astype(np.int32)
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
        draws["accuracy"].append((tp.sum(axis=1) / m)[usable])
        draws["balanced_accuracy"].append(((recall * present).sum(axis=1) / n_present)[usable])
        draws["macro_f1"].append(((f1 * present).sum(axis=1) / n_present)[usable])
        complete_counts = counts[present.all(axis=1)]
        aucs = np.mean([_weighted_auc(proba[:, c], y_idx == c, complete_counts) for c in auc_columns], axis=0)
        draws["auroc"].append(np.atleast_1d(aucs))
    out = {}
    for metric, parts in draws.items():
        values = np.concatenate(parts) if parts else np.array([])
        if len(values):
            out[metric] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
    return out


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


def score_with_ci(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """:func:`compute_metrics` plus the bootstrap 95 % intervals under ``ci95``."""
    scores = compute_metrics(y_true, proba, classes)
    scores["ci95"] = bootstrap_ci(y_true, proba, classes)
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


def _run_tasks(head: str, protocol: Protocol, data: LabeledFeatures, X: np.ndarray, tasks: list,
               jobs: int | None) -> list:
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs or cores, len(tasks)))
    threads = max(1, cores // jobs)
    layout = Layout.of(data)
    calls = [joblib.delayed(_fit_task)(head, protocol, layout, X, data.y, data.groups, train, test_idx,
                                       seed, threads) for seed, train, test_idx in tasks]
    return joblib.Parallel(n_jobs=jobs)(calls)  # n_jobs=1 runs in this process


# Estimator parameters added after runs were first named, left out while at their defaults so that
# those runs keep their names (as Protocol.config does for protocol fields).
_LATER_PARAM_DEFAULTS = {"calibration": "sigmoid"}


def estimator_params(estimator) -> dict:
    """The plain-valued parameters of an estimator, so a run is named by everything that made it."""
    def later_default(key: str, value) -> bool:
        name = key.rsplit("__", 1)[-1]
        return name in _LATER_PARAM_DEFAULTS and value == _LATER_PARAM_DEFAULTS[name]

    return {k: v for k, v in sorted(estimator.get_params(deep=True).items())
            if (v is None or isinstance(v, (str, int, float, bool))) and not later_default(k, v)}


def _summarise(per_fold: list[dict]) -> dict:
    keys = [k for k, v in per_fold[0].items() if isinstance(v, float)]
    return {k: {"mean": float(np.mean([f[k] for f in per_fold if k in f])),
                "std": float(np.std([f[k] for f in per_fold if k in f]))} for k in keys}


def run_id(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def fit_head(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol,
             source_name: str, label_desc: str = "", force: bool = False,
             test: LabeledFeatures | None = None, reporter: Reporter | None = None,
             jobs: int | None = None) -> Path:
    """Cross-validate one head, refit it on all training rows, and write a run directory.

    ``jobs``: worker processes for the folds (default: one per CPU core, at most the number of
    tasks). Every fold's estimator is seeded, so the result does not depend on it.
    """
    reporter = reporter or Reporter(quiet=True)
    grouped = data.groups is not None and protocol.split == "cv"
    meta_names = [c["name"] for c in data.meta_spec]
    if test is not None and [c["name"] for c in test.meta_spec] != meta_names:
        raise RunError(f"the test data must carry the same --meta columns as the training data "
                       f"({','.join(meta_names) or 'none'}); pass the same --meta for both")
    config = {"head": head, "pool": pool, "protocol": protocol.config(), "dataset": source_name,
              "labels": label_desc, "classes": data.classes, "feature_fingerprint": entry.fingerprint,
              "backbone": entry.manifest["backbone"],
              "estimator": estimator_params(build_estimator(head, protocol, 0, Layout.of(data))),
              "ids_sha256": hashlib.sha256("\n".join(data.ids).encode()).hexdigest(),
              "test_ids_sha256": hashlib.sha256("\n".join(test.ids).encode()).hexdigest() if test else None}
    if data.X.ndim == 3:
        config["views"] = int(data.X.shape[1])
    if data.meta_spec:
        config["meta_spec"] = data.meta_spec  # how to code the columns again at prediction time
    run_dir = entry.path / "runs" / f"{head}-{pool.replace('+', '_')}-{run_id(config)}"
    if (run_dir / "metrics.json").exists() and not force:
        reporter.info(f"{head}: identical run already finished, reusing {run_dir} (--force to redo)")
        return run_dir
    started = time.perf_counter()
    fold_plan = [(seed, fold, train, test_idx) for seed in range(protocol.seeds)
                 for fold, (train, test_idx) in enumerate(
                     official_split(data.splits) if protocol.split == "official"
                     else random_712_split(data.y, seed) if protocol.split == "random712"
                     else make_folds(data.y, data.groups, protocol.cv, seed))]
    # Every fold and the final refit on all rows are independent tasks, run side by side in worker
    # processes of one BLAS/OpenMP/torch thread each: most head solvers are single-threaded, and
    # the small-matrix ones lose time to a second thread (logreg: 0.7 s on 1 thread, 1.7 s on 2).
    tasks = [(seed, train, test_idx) for seed, _, train, test_idx in fold_plan]
    tasks.append((0, np.arange(len(data.y)), None))  # the final refit on all rows
    X = with_meta(data.X, data.meta)
    outputs = _run_tasks(head, protocol, data, X, tasks, jobs)
    final, cv_seconds = outputs[-1][0], time.perf_counter() - started
    fold_metrics, oof_rows, oof_by_seed = [], [], {}
    for (seed, fold, _, test_idx), (est, proba) in zip(fold_plan, outputs[:-1], strict=True):
        proba = _align(proba, list(est.classes_), data.classes)
        oof = oof_by_seed.setdefault(seed, np.full((len(data.y), len(data.classes)), np.nan))
        oof[test_idx] = proba
        fold_metrics.append(compute_metrics(data.y[test_idx], proba, data.classes))
        oof_rows.extend((seed, fold, data.ids[i], data.y[i], proba[k]) for k, i in enumerate(test_idx))
    oof = oof_by_seed[0]
    scored = ~np.isnan(oof).any(axis=1)
    pooled = score_with_ci(data.y[scored], oof[scored], data.classes)
    model = final.best_estimator_ if hasattr(final, "best_estimator_") else final
    result = {"config": config, "protocol": protocol.describe(grouped), "n_images": len(data.y),
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
        result["test"] = score_with_ci(test.y[keep], proba[keep], data.classes)
        result["test"]["n_images"] = int(keep.sum())
    _write_run(run_dir, config, result, model, data, oof_rows, test_rows)
    return run_dir


def _write_run(run_dir: Path, config: dict, result: dict, model, data: LabeledFeatures,
               oof_rows: list, test_rows: tuple | None = None) -> None:
    """Written to a temporary directory and renamed, so a run is either complete or absent."""
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise RunError(f"cannot write the run to {run_dir.parent} ({exc.strerror}); the features are readable "
                       "but runs are saved next to them: copy the cache to a writable folder and pass "
                       "--cache") from None
    write_json_atomic(tmp / "config.json", config)
    joblib.dump({"pipeline": model, "classes": data.classes, "feature_fingerprint":
                 config["feature_fingerprint"], "pool": config["pool"], "backbone": config["backbone"],
                 "config": config}, tmp / "model.joblib")
    with open(tmp / "oof_predictions.csv", "w") as handle:
        handle.write("seed,fold,id,label," + ",".join(f"p_{c}" for c in data.classes) + "\n")
        for seed, fold, image_id, label, proba in oof_rows:
            handle.write(f"{seed},{fold},{image_id},{label}," + ",".join(f"{v:.6f}" for v in proba) + "\n")
    if test_rows is not None:  # the test set's predictions, for ensembles scored on it later
        with open(tmp / "test_predictions.csv", "w") as handle:
            handle.write("id,label," + ",".join(f"p_{c}" for c in data.classes) + "\n")
            for image_id, label, proba in zip(*test_rows, strict=True):
                handle.write(f"{image_id},{label}," + ",".join(f"{v:.6f}" for v in proba) + "\n")
    write_json_atomic(tmp / "metrics.json", result)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(tmp, run_dir)
