"""--calibrate: recalibrated probabilities that keep the class balancing, and the metrics that judge them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, recall_score

from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.head_registry import make_pipeline
from featcache.evaluation.heads import CalibratedHead, SVMHead, ViewEnsemble, _calibration_setup
from featcache.evaluation.metrics import expected_calibration_error
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import build_estimator, estimator_params, fit_head
from featcache.reporting.compare import collect_runs

from .fakes import FakeEntry


def _imbalanced(n: int = 1200, minority: float = 0.06, shift: float = 1.6, seed: int = 0):
    """Two overlapping Gaussian classes, the second rare: where the prior decides most errors."""
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < minority, "mel", "nv")
    X = rng.normal(size=(n, 5))
    X[:, 0] += (y == "mel") * shift
    return X, y


def test_expected_calibration_error_by_hand():
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.array([[1.0, 0], [1, 0], [0, 1], [0, 1]])) == 0.0
    # every row said 0.9 for class 0: half right -> |0.9 - 0.5| = 0.4
    proba = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(y, proba) == pytest.approx(0.4)
    # two bins: 0.9 (all right) and 0.6 (half right) -> 0.5 * 0.1 + 0.5 * 0.1
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    assert expected_calibration_error(np.array([0, 0, 0, 0]), proba) == pytest.approx(0.1)


def test_temperature_calibration_never_changes_the_predicted_class():
    X, y = _imbalanced()
    plain = LogisticRegression(class_weight="balanced", C=0.01).fit(X, y)
    calibrated = CalibratedHead(LogisticRegression(class_weight="balanced", C=0.01), "temperature").fit(X, y)
    np.testing.assert_array_equal(calibrated.predict(X), plain.predict(X))
    assert not np.allclose(calibrated.predict_proba(X), plain.predict_proba(X), atol=1e-3)


def test_the_calibrator_keeps_the_class_balancing():
    """Calibrated on unweighted rows, the map learns the 94 % prior back and the rare class is lost."""
    X, y = _imbalanced()
    Xt, yt = _imbalanced(seed=1)
    recall, balanced = {}, {}
    for weighting in ("balanced", None):
        model = CalibratedHead(LogisticRegression(class_weight="balanced"), "sigmoid", class_weight=weighting)
        pred = model.fit(X, y).predict(Xt)
        recall[weighting] = recall_score(yt, pred, pos_label="mel")
        balanced[weighting] = balanced_accuracy_score(yt, pred)
    plain = LogisticRegression(class_weight="balanced").fit(X, y).predict(Xt)
    assert recall["balanced"] > recall[None] + 0.3
    assert balanced["balanced"] > balanced[None] + 0.1
    assert abs(balanced["balanced"] - balanced_accuracy_score(yt, plain)) < 0.05


@pytest.mark.slow
def test_views_of_one_image_share_a_calibration_fold():
    X, y = _imbalanced(400)
    groups = np.arange(400) // 4
    weights, folds = _calibration_setup(X, y, groups, "balanced", seed=0)
    assert len(folds) == 3 and weights is not None
    assert _calibration_setup(X, y, None, "balanced", seed=0)[1] == 3  # plain StratifiedKFold, as SVMs always had
    for train, held_out in folds:
        assert not set(groups[train]) & set(groups[held_out])
    # and ViewEnsemble hands the image groups through the pipeline to the calibrated head
    rng = np.random.default_rng(0)
    Xv = rng.normal(size=(90, 4, 3))
    yv = np.array(["a", "b", "c"])[np.arange(90) % 3]
    Xv[:, :, 0] += (np.arange(90) % 3)[:, None]
    model = ViewEnsemble(make_pipeline("mlp", calibrate="isotonic"), "all", "all").fit(Xv, yv)
    assert isinstance(model.named_steps["head"], CalibratedHead)
    assert model.predict_proba(Xv).shape == (90, 3)


def test_calibrate_choices_and_what_they_wrap():
    assert isinstance(make_pipeline("logreg", calibrate="sigmoid").named_steps["head"], CalibratedHead)
    svm = make_pipeline("svm-rbf", calibrate="isotonic").named_steps["head"]
    assert isinstance(svm, SVMHead) and svm.calibration == "isotonic"  # the SVM's own calibrator
    assert not isinstance(make_pipeline("majority", calibrate="sigmoid").named_steps["head"], CalibratedHead)
    with pytest.raises(Exception, match="--calibrate 'platt'"):
        make_pipeline("logreg", calibrate="platt")
    # every parameter names the run, the SVM's default calibrator too
    assert estimator_params(make_pipeline("svm-rbf"))["head__calibration"] == "sigmoid"
    assert estimator_params(make_pipeline("svm-rbf", calibrate="isotonic"))["head__calibration"] == "isotonic"
    tuned = build_estimator("logreg", Protocol(tune=True, calibrate="sigmoid"))
    assert all(k.startswith("head__estimator__") for k in tuned.param_grid)


def test_a_calibrated_run_is_scored_named_and_labelled(tmp_path):
    X, y = _imbalanced(600)
    data = LabeledFeatures(X, y, None, None, [f"i{k}" for k in range(600)], ["mel", "nv"])
    cache = tmp_path / "cache"
    entry = cache / "toy" / "bb-0"
    entry.mkdir(parents=True)
    plain = fit_head(data, FakeEntry(entry), "xgboost", "gap", Protocol(cv=3), "toy")
    calibrated = fit_head(data, FakeEntry(entry), "xgboost", "gap", Protocol(cv=3, calibrate="sigmoid"), "toy")
    assert plain != calibrated
    metrics = {run: json.loads((run / "metrics.json").read_text())["pooled"] for run in (plain, calibrated)}
    for scores in metrics.values():
        assert {"log_loss", "log_loss_balanced", "brier", "ece"} <= scores.keys()
    # boosted trees are over-confident; a class-weighted sigmoid map must improve the balanced log-loss
    assert metrics[calibrated]["log_loss_balanced"] < metrics[plain]["log_loss_balanced"]
    labels = sorted(row.head for row in collect_runs(cache))
    assert labels == ["xgboost", "xgboost (sigmoid calibration)"]
