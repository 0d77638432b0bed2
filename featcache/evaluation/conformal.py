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
