"""Stacking: a meta-learner over several runs' out-of-fold probabilities, nested in the runs' own folds.

The members' out-of-fold probabilities of an image come from models that never saw that image, so they
are honest features for a second-level model. That model must be held to the same rule: for each outer
fold of the runs, it is fit on the training part's rows only and predicts the held-out part. Its own
regularisation is chosen by an inner grouped CV of that training part, so no held-out label is ever
seen. The test set (if the members scored one) is predicted by a meta-learner fit on all out-of-fold
rows, applied to the members' test probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# inverse regularisation strengths tried by the inner CV; log-probabilities of a few runs need little
META_CS = (0.001, 0.01, 0.1, 1.0)
INNER_FOLDS = 3
_FLOOR = 1e-6  # probabilities below this are taken as this before the log (a run's hard 0 is not -inf)


@dataclass
class Stacked:
    """The meta-learner's out-of-fold probabilities (rows as the members', every seed) and, when the
    members have test probabilities, its test probabilities; ``chosen_c`` per outer fold."""

    oof: np.ndarray
    test: np.ndarray | None
    chosen_c: list[float]


def stack_features(probas: list[np.ndarray]) -> np.ndarray:
    """Each member's log-probabilities side by side: the meta-learner's input."""
    return np.concatenate([np.log(np.clip(p, _FLOOR, 1.0)) for p in probas], axis=1)


def fit_meta_learner(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int) -> GridSearchCV:
    """Balanced logistic regression on standardised log-probabilities, its C chosen by inner CV (grouped
    when the runs were) for balanced accuracy, the score featcache ranks by; fit on ``X``, ``y``."""
    smallest = int(np.bincount(y).min(initial=0)) if len(y) else 0
    folds = max(2, min(INNER_FOLDS, smallest))
    inner = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if groups is not None
             else StratifiedKFold(folds, shuffle=True, random_state=seed))
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    search = GridSearchCV(model, {"logisticregression__C": list(META_CS)}, scoring="balanced_accuracy", cv=inner,
                          error_score="raise")
    return search.fit(X, y, groups=groups)


def stack(probas: list[np.ndarray], labels: np.ndarray, classes: list[str], seeds: np.ndarray, folds: np.ndarray,
          groups: np.ndarray | None = None, test_probas: list[np.ndarray] | None = None) -> Stacked:
    """Stack ``probas`` (one array per member, rows aligned, columns in ``classes`` order) nested in the
    members' folds: for every seed and fold, the meta-learner is fit on that seed's other folds and
    predicts this one. ``groups`` (per row) keep a group's images together in the inner CV."""
    if len(probas) < 2:
        raise ValueError("stacking needs at least two runs")
    X = stack_features(probas)
    labels = np.asarray(labels)
    y = np.array([classes.index(v) for v in labels])
    oof = np.zeros((len(y), len(classes)))
    chosen = []
    for seed in np.unique(seeds):
        for fold in np.unique(folds[seeds == seed]):
            train = (seeds == seed) & (folds != fold)
            held = (seeds == seed) & (folds == fold)
            search = fit_meta_learner(X[train], y[train], None if groups is None else groups[train], int(seed))
            oof[held] = _full_proba(search, X[held], len(classes))
            chosen.append(float(search.best_params_["logisticregression__C"]))
    test = None
    if test_probas is not None:
        test = stacked_proba(final_meta_learner(probas, labels, classes, seeds, groups), test_probas, len(classes))
    return Stacked(oof, test, chosen)


def final_meta_learner(probas: list[np.ndarray], labels: np.ndarray, classes: list[str], seeds: np.ndarray,
                       groups: np.ndarray | None = None) -> GridSearchCV:
    """The meta-learner that predicts new images: fit on every image's out-of-fold probabilities (one
    seed's rows: each seed holds every image once). Deterministic, so compare's test score and predict
    use the same model."""
    first = seeds == np.unique(seeds)[0]
    y = np.array([classes.index(v) for v in np.asarray(labels)[first]])
    return fit_meta_learner(stack_features([p[first] for p in probas]), y,
                            None if groups is None else groups[first], 0)


def stacked_proba(search: GridSearchCV, probas: list[np.ndarray], n_classes: int) -> np.ndarray:
    """The meta-learner's probabilities for the members' ``probas`` of some images."""
    return _full_proba(search, stack_features(probas), n_classes)


def _full_proba(search: GridSearchCV, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every class, zero for a class the training part lacked."""
    out = np.zeros((len(X), n_classes))
    out[:, search.classes_] = search.predict_proba(X)
    return out
