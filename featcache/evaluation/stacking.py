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
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from threadpoolctl import threadpool_limits

# inverse regularisation strengths tried by the inner CV. On HAM10000 (9 runs, nested 5-fold) the members'
# probabilities as they are beat standardised log-probabilities (0.677-0.681 against 0.651-0.671 balanced
# accuracy over C 1e-4..1e-2), and the best Cs were small: the runs mostly agree, so little is left to fit
META_CS = (3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1)
INNER_FOLDS = 3


@dataclass
class Stacked:
    """The meta-learner's out-of-fold probabilities (rows as the members', every seed) and, when the
    members have test probabilities, its test probabilities; ``chosen_c`` per outer fold."""

    oof: np.ndarray
    test: np.ndarray | None
    chosen_c: list[float]


def stack_features(probas: list[np.ndarray]) -> np.ndarray:
    """Each member's probabilities side by side: the meta-learner's input (all on one scale, so not
    standardised)."""
    return np.concatenate(probas, axis=1)


def fit_meta_learner(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int) -> Pipeline:
    """Balanced logistic regression on the members' probabilities, its C chosen by inner CV (grouped
    when the runs were) for balanced accuracy, the score featcache ranks by; fit on ``X``, ``y``.

    Each inner split walks the Cs upwards warm-started, on one BLAS thread: the problem is small
    (images x runs x classes), and threads fighting a busy machine made it 6x slower (measured)."""
    smallest = int(np.bincount(y).min(initial=0)) if len(y) else 0
    folds = max(2, min(INNER_FOLDS, smallest))
    inner = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if groups is not None
             else StratifiedKFold(folds, shuffle=True, random_state=seed))
    scores = np.zeros(len(META_CS))
    with threadpool_limits(1):
        for train, held in inner.split(X, y, groups):
            fitted, seen = X[train], X[held]
            model = LogisticRegression(class_weight="balanced", max_iter=2000, warm_start=True)
            for k, c in enumerate(META_CS):
                model.set_params(C=c).fit(fitted, y[train])
                scores[k] += balanced_accuracy_score(y[held], model.predict(seen))
        best = META_CS[int(np.argmax(scores))]  # the first of equals: the strongest regularisation
        return make_pipeline(LogisticRegression(C=best, class_weight="balanced", max_iter=2000)).fit(X, y)


def chosen_c(model: Pipeline) -> float:
    """The C the inner CV chose."""
    return float(model[-1].C)


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
            meta = fit_meta_learner(X[train], y[train], None if groups is None else groups[train], int(seed))
            oof[held] = _full_proba(meta, X[held], len(classes))
            chosen.append(chosen_c(meta))
    test = None
    if test_probas is not None:
        test = stacked_proba(final_meta_learner(probas, labels, classes, seeds, groups), test_probas, len(classes))
    return Stacked(oof, test, chosen)


def final_meta_learner(probas: list[np.ndarray], labels: np.ndarray, classes: list[str], seeds: np.ndarray,
                       groups: np.ndarray | None = None) -> Pipeline:
    """The meta-learner that predicts new images: fit on every image's out-of-fold probabilities (one
    seed's rows: each seed holds every image once). Deterministic, so compare's test score and predict
    use the same model."""
    first = seeds == np.unique(seeds)[0]
    y = np.array([classes.index(v) for v in np.asarray(labels)[first]])
    return fit_meta_learner(stack_features([p[first] for p in probas]), y,
                            None if groups is None else groups[first], 0)


def stacked_proba(meta: Pipeline, probas: list[np.ndarray], n_classes: int) -> np.ndarray:
    """The meta-learner's probabilities for the members' ``probas`` of some images."""
    return _full_proba(meta, stack_features(probas), n_classes)


def _full_proba(meta: Pipeline, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every class, zero for a class the training part lacked."""
    out = np.zeros((len(X), n_classes))
    out[:, meta.classes_] = meta.predict_proba(X)
    return out
