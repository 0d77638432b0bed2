"""Hyper-parameter search with a time budget (inner CV on the training part only)."""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import ParameterGrid, cross_val_score


class BudgetedSearch(ClassifierMixin, BaseEstimator):
    """Grid search by inner cross-validation that stops when its time budget is spent.

    Candidates are tried in grid order, and every head's grid in ``head_registry`` lists the documented
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
