"""Prediction sets that keep their promise: "this image is {melanoma, nevus}, with 90 % coverage".

Cross-conformal on the training folds: an image's nonconformity is one minus the out-of-fold probability of
its true class. The threshold is the conformal quantile of those scores (``marginal``: over every image;
``class``: per true class, so that every class is covered at the level, not only the common ones), and a
prediction set holds every class whose score stays under it. The out-of-fold coverage of an image is
judged with the threshold of the other folds' images only, so it is an honest estimate; the model that
predicts new images uses the threshold of all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def quantile(scores: np.ndarray, level: float) -> float:
    """The conformal quantile: the ceil((n + 1) * level)-th smallest score (inf when n is too small)."""
    n = len(scores)
    rank = math.ceil((n + 1) * level)
    return float(np.sort(scores)[rank - 1]) if 0 < rank <= n else math.inf


def thresholds(proba: np.ndarray, y_idx: np.ndarray, level: float, mode: str, n_classes: int) -> np.ndarray:
    """One threshold per class (all equal when ``marginal``), from calibration probabilities and labels."""
    scores = 1.0 - proba[np.arange(len(y_idx)), y_idx]
    if mode == "marginal":
        return np.full(n_classes, quantile(scores, level))
    return np.array([quantile(scores[y_idx == c], level) for c in range(n_classes)])


def prediction_sets(proba: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Boolean (images, classes): class c is in an image's set when 1 - p_c <= the threshold of c (``limits``:
    one per class, or one row per image: each image its group's, with ``--conformal-by``)."""
    limits = np.asarray(limits, dtype=float)
    return (1.0 - proba) <= (limits if limits.ndim == 2 else limits[None, :])


def summary(sets: np.ndarray, y_idx: np.ndarray) -> dict:
    return {"coverage": float(sets[np.arange(len(y_idx)), y_idx].mean()),
            "mean_set_size": float(sets.sum(axis=1).mean()),
            "empty_sets": float((sets.sum(axis=1) == 0).mean())}


def out_of_fold_sets(oof: np.ndarray, y_idx: np.ndarray, folds: np.ndarray, level: float, mode: str) -> np.ndarray:
    """Every image's out-of-fold prediction set, judged with the threshold of the other folds' images."""
    n_classes = oof.shape[1]
    sets = np.zeros_like(oof, dtype=bool)
    for fold in np.unique(folds):
        held = folds == fold
        limits = thresholds(oof[~held], y_idx[~held], level, mode, n_classes)
        sets[held] = prediction_sets(oof[held], limits)
    return sets


def cross_conformal(oof: np.ndarray, y_idx: np.ndarray, folds: np.ndarray, level: float, mode: str) -> dict:
    """Thresholds from every out-of-fold prediction (for new images), and the out-of-fold coverage and set
    size of :func:`out_of_fold_sets`."""
    sets = out_of_fold_sets(oof, y_idx, folds, level, mode)
    out = {"level": level, "mode": mode, "thresholds": thresholds(oof, y_idx, level, mode, oof.shape[1]).tolist()}
    return out | summary(sets, y_idx)


def set_column(level: float) -> str:
    """The prediction-set column of every file featcache writes, e.g. ``set_90``."""
    return f"set_{round(level * 100)}"


def uninformative(mean_set_size: float, n_classes: int) -> bool:
    """Sets that say little: on average within half a class of holding every class."""
    return n_classes > 1 and mean_set_size >= n_classes - 0.5


def set_labels(sets: np.ndarray, classes: list[str]) -> list[str]:
    """Each image's set as ``a|b`` (empty when no class is plausible enough)."""
    return ["|".join(c for c, keep in zip(classes, row, strict=True) if keep) for row in sets]


# --- Mondrian: calibrated within each group of a column (--conformal-by) --------------------------------------

def by_group_sets(oof: np.ndarray, y_idx: np.ndarray, folds: np.ndarray, level: float, mode: str,
                  strata: np.ndarray) -> np.ndarray:
    """Every image's out-of-fold set, judged with the threshold of the other folds' images of its own group."""
    sets = np.zeros_like(oof, dtype=bool)
    for value in np.unique(strata):
        mine = strata == value
        sets[mine] = out_of_fold_sets(oof[mine], y_idx[mine], folds[mine], level, mode)
    return sets


def by_group(oof: np.ndarray, y_idx: np.ndarray, folds: np.ndarray, level: float, mode: str, strata: np.ndarray,
             column: str) -> tuple[dict, np.ndarray]:
    """Mondrian cross-conformal (Vovk et al. 2005): thresholds within each value of ``strata`` (a clinic, a site,
    a device), so that every group keeps the coverage, not only all of them together. Returns the calibration
    (overall thresholds for images of a group not seen here, each group's thresholds, images, out-of-fold
    coverage and set size) and the out-of-fold sets."""
    n_classes = oof.shape[1]
    sets = by_group_sets(oof, y_idx, folds, level, mode, strata)
    groups = {}
    for value in np.unique(strata):
        mine = strata == value
        limits = thresholds(oof[mine], y_idx[mine], level, mode, n_classes)
        groups[str(value)] = {"thresholds": [float(t) for t in limits], "n": int(mine.sum()),
                              **summary(sets[mine], y_idx[mine])}
    out = {"level": level, "mode": mode, "thresholds": thresholds(oof, y_idx, level, mode, n_classes).tolist(),
           "by": {"column": column, "groups": groups}}
    return out | summary(sets, y_idx), sets


def group_limits(conformal: dict, strata: list[str] | np.ndarray | None) -> tuple[np.ndarray, int]:
    """Each image's thresholds (one row per image) from its group's calibration; an image of a group the
    calibration never saw, or without a value, takes the overall thresholds. Returns them and how many did."""
    overall = np.array(conformal["thresholds"], dtype=float)
    by = conformal.get("by")
    if by is None or strata is None:
        return overall, 0
    rows, unseen = [], 0
    for value in strata:
        found = by["groups"].get(str(value))
        unseen += found is None
        rows.append(found["thresholds"] if found else overall)
    return np.array(rows, dtype=float).reshape(len(rows), len(overall)), unseen


# --- shift-weighted: sets for a test set from elsewhere (--conformal-shift weighted) ---------------------------
# The domain classifier that estimates the density ratio. Chosen on HAM10000 -> ISIC 2018 (docs/results.md,
# `conformal-shift`): on the full 1,280-d features it tells the two clinics apart perfectly (AUROC 1.00), every
# weight but a few goes to zero and the sets cover 0.73; on their first 8 principal components it keeps a usable
# effective sample and covers 0.876 unaligned, 0.901 after --test-align moments.
DOMAIN_COMPONENTS = 8
DOMAIN_FOLDS = 5
# below this share of the calibration images left in effect, or above this share of test images without a
# threshold, the weighted sets lean on a few images or hold every class: said
FEW_EFFECTIVE = 0.1


@dataclass(frozen=True)
class ShiftWeights:
    """Each calibration (training) image's and each test image's weight: the density ratio test/train that a
    domain classifier estimates, cross-fitted, scaled by the two sides' sizes (Tibshirani et al. 2019)."""

    calibration: np.ndarray
    test: np.ndarray
    auroc: float  # the domain classifier's, cross-fitted: 0.5 = the two sides look alike

    @property
    def effective_calibration_images(self) -> float:
        """(sum w)^2 / sum w^2: how many equally weighted calibration images the weights amount to."""
        w = self.calibration
        return float(w.sum() ** 2 / max(float((w ** 2).sum()), 1e-300))

    def record(self) -> dict:
        """What metrics.json keeps: enough to recompute the weights with :func:`domain_weights`."""
        return {"method": "weighted", "classifier": f"standardize, PCA {DOMAIN_COMPONENTS}, logistic regression; "
                                                   f"{DOMAIN_FOLDS}-fold cross-fitted, seed 0",
                "domain_auroc": self.auroc, "calibration_images": len(self.calibration),
                "effective_calibration_images": self.effective_calibration_images, "test_images": len(self.test)}


def _image_rows(X: np.ndarray) -> np.ndarray:
    """One row per image: the views of a multi-view entry averaged."""
    X = np.asarray(X, dtype=np.float32)
    return X.mean(axis=1) if X.ndim == 3 else X


def domain_weights(train: np.ndarray, test: np.ndarray, seed: int = 0) -> ShiftWeights:
    """The calibration and test weights of shift-weighted conformal: P(test | x) / P(train | x) x n_train / n_test,
    from a logistic regression on the first :data:`DOMAIN_COMPONENTS` principal components of the standardized
    features, each image's probability from the folds that did not see it."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = _image_rows(train), _image_rows(test)
    X = np.concatenate([train, test])
    side = np.r_[np.zeros(len(train)), np.ones(len(test))]
    components = min(DOMAIN_COMPONENTS, X.shape[1], len(X) - 1)
    model = make_pipeline(StandardScaler(), PCA(components, random_state=seed), LogisticRegression(max_iter=1000))
    p = cross_val_predict(model, X, side, cv=StratifiedKFold(DOMAIN_FOLDS, shuffle=True, random_state=seed),
                          method="predict_proba")[:, 1]
    p = np.clip(p, 1e-4, 1 - 1e-4)  # a certain classifier would give a weight of 0 or infinity
    w = p / (1 - p) * len(train) / len(test)
    return ShiftWeights(w[: len(train)], w[len(train):], float(roc_auc_score(side, p)))


def weighted_quantiles(scores: np.ndarray, calibration: np.ndarray, test: np.ndarray, level: float) -> np.ndarray:
    """Each test image's threshold: the ``level`` quantile of the calibration ``scores`` weighted by
    ``calibration``, the test image's own weight placed at +inf (Tibshirani et al. 2019, eq. 8); inf when the
    calibration weight cannot reach the level. With equal weights it is :func:`quantile`."""
    if not len(scores):
        return np.full(len(test), math.inf)
    order = np.argsort(scores, kind="stable")
    ranked, cumulative = scores[order], np.cumsum(calibration[order])
    # the smallest k whose cumulative weight reaches level x (all calibration weight + the test image's)
    k = np.searchsorted(cumulative, level * (cumulative[-1] + test), side="left")
    return np.where(k < len(ranked), ranked[np.minimum(k, len(ranked) - 1)], math.inf)


def weighted_limits(proba: np.ndarray, y_idx: np.ndarray, weights: ShiftWeights, level: float,
                    mode: str) -> np.ndarray:
    """Thresholds per test image and class (images, classes) from the calibration probabilities and labels:
    one weighted quantile over every image (``marginal``) or within each true class (``class``)."""
    n_classes = proba.shape[1]
    scores = 1.0 - proba[np.arange(len(y_idx)), y_idx]
    if mode == "marginal":
        return np.repeat(weighted_quantiles(scores, weights.calibration, weights.test, level)[:, None], n_classes,
                         axis=1)
    return np.stack([weighted_quantiles(scores[y_idx == c], weights.calibration[y_idx == c], weights.test, level)
                     for c in range(n_classes)], axis=1)


def shift_weighted(calibration_X: np.ndarray, calibration_proba: np.ndarray, calibration_y: np.ndarray,
                   test_X: np.ndarray, conformal: dict, *, calibration_ids: list[str],
                   test_ids: list[str]) -> tuple[np.ndarray, dict, str | None]:
    """--conformal-shift weighted: each test image's thresholds (images, classes) at the run's level and mode,
    from the calibration images' out-of-fold probabilities and labels (``calibration_y``: class indices) weighted
    by the density ratio between their features and ``test_X`` (the test features the head saw); the record of
    the weights for metrics.json; and a warning when the weights leave few calibration images in effect.

    The domain classifier sees both sides in the order of their ids, so the weights depend on which images there
    are, not on the order they come in (fit's test set and the same images given to predict get the same)."""
    cal, new = np.argsort(np.asarray(calibration_ids)), np.argsort(np.asarray(test_ids))
    in_order = domain_weights(np.asarray(calibration_X)[cal], np.asarray(test_X)[new])
    weights = ShiftWeights(in_order.calibration[np.argsort(cal)], in_order.test[np.argsort(new)], in_order.auroc)
    limits = weighted_limits(calibration_proba, calibration_y, weights, conformal["level"], conformal["mode"])
    # a test image weighted beyond what the calibration images can balance has no threshold: its set holds every
    # class (with a clipped, certain domain classifier every calibration weight is alike but the test weight huge)
    unbounded = int(np.isinf(limits).any(axis=1).sum())
    record = weights.record() | {"test_images_without_threshold": unbounded}
    warning = None
    if (record["effective_calibration_images"] < FEW_EFFECTIVE * len(weights.calibration)
            or unbounded > FEW_EFFECTIVE * len(weights.test)):
        warning = (f"--conformal-shift weighted: the test images resemble few training images (a domain classifier "
                   f"tells them apart with AUROC {weights.auroc:.2f}; the weights leave "
                   f"{record['effective_calibration_images']:.0f} of {len(weights.calibration)} calibration images in "
                   f"effect, and {unbounded} of {len(weights.test)} test images outweigh them all), so the sets are "
                   "wide or hold every class; --test-align moments brings the two sides closer first")
    return limits, record, warning
