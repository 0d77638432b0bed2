"""Heads at scale: k-NN past its cap trains on a stratified sample (and says so); large features are
cross-validated one fold at a time."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.evaluation import heads, runner
from featcache.evaluation.heads import training_sample

from .conftest import shared


def test_training_sample_keeps_every_class_its_share_and_the_seed():
    y = np.array(["nv"] * 90_000 + ["mel"] * 9_999 + ["df"])
    train = np.arange(len(y))
    sample = training_sample("knn", train, y, seed=0)
    assert len(sample) == heads.KNN_MAX_TRAIN and len(np.unique(sample)) == len(sample)
    counts = {c: int((y[sample] == c).sum()) for c in ("nv", "mel", "df")}
    assert counts == {"nv": 45_000, "mel": 4_999, "df": 1}  # shares kept, the single rare row too
    assert np.array_equal(sample, training_sample("knn", train, y, seed=0))
    assert not np.array_equal(sample, training_sample("knn", train, y, seed=1))
    for head in ("logreg", "svm-rbf", "mlp", "xgboost"):  # linear in the rows: every row
        assert training_sample(head, train, y, seed=0) is train
    small = train[:heads.KNN_MAX_TRAIN]
    assert training_sample("knn", small, y, seed=0) is small


def test_knn_past_its_cap_is_sampled_named_and_said(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from featcache.cli import app
    from featcache.store.model_files import load_model
    from featcache.store.runs import read_metrics

    monkeypatch.setattr(heads, "KNN_MAX_TRAIN", 40)
    monkeypatch.setattr(runner, "KNN_MAX_TRAIN", 40)
    # folds one at a time in this process (the path of features over 1 GiB): they see the patched cap
    monkeypatch.setattr(runner, "PARALLEL_FOLDS_MAX_BYTES", 0)
    common = ["--data", str(shared("ham70")), "--cache", str(tmp_path)]  # 7 classes x 10 photos
    assert CliRunner().invoke(app, ["extract", *common, "--workers", "0", "-q"]).exit_code == 0
    out = CliRunner().invoke(app, ["fit", *common, "--head", "knn", "--cv", "2", "--no-groups"])
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())
    assert "stratified sample of 40" in said and "up to 70" in said
    (run_dir,) = list(tmp_path.glob("*/*/runs/knn-*"))
    assert read_metrics(run_dir)["config"]["training_sample"] == 40
    final = load_model(run_dir, False)["pipeline"].named_steps["head"]
    assert final.n_samples_fit_ == 40  # the final fit's 70 rows sampled; the folds' 35 were not


@pytest.mark.parametrize(("nbytes", "jobs"), [(10, 2), (2 << 30, 1)])
def test_large_features_run_one_fold_at_a_time(monkeypatch, nbytes, jobs):
    seen = {}

    class Parallel:
        def __init__(self, n_jobs):
            seen["jobs"] = n_jobs

        def __call__(self, calls):
            return list(calls)

    monkeypatch.setattr(runner.joblib, "Parallel", Parallel)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    X = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(nbytes // 4, 1), strides=(0, 4))
    data = runner.LabeledFeatures(X, np.zeros(len(X)), None, None, [], [])
    runner._run_tasks("logreg", runner.Protocol(), data, X, [(0, None, None)] * 6, None)
    assert seen["jobs"] == jobs


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_large_training_rows_are_standardized_in_place_as_the_pipeline_would(monkeypatch, head):
    from sklearn.base import clone
    from sklearn.preprocessing import StandardScaler

    monkeypatch.setattr(runner, "CHUNKED_SCALING_MIN_BYTES", 0)  # every fold takes the large rows' path
    rng = np.random.default_rng(0)
    X = rng.normal(3, 2, (200, 8)).astype(np.float32)
    before = X.copy()
    y = np.array(["a", "b"] * 100)
    train, test = np.arange(150), np.arange(150, 200)
    est, proba = runner._fit_task(head, runner.Protocol(), runner.Layout(8), X, y, None, train, test, 0, 1)
    np.testing.assert_array_equal(X, before)  # the caller's features untouched
    (scaler,) = [s for s in est.named_steps.values() if isinstance(s, StandardScaler)]
    reference = clone(runner.build_estimator(head, runner.Protocol())).fit(X[train], y[train])
    (expected,) = [s for s in reference.named_steps.values() if isinstance(s, StandardScaler)]
    np.testing.assert_allclose(scaler.mean_, expected.mean_, rtol=1e-6)
    np.testing.assert_allclose(scaler.scale_, expected.scale_, rtol=1e-5)
    np.testing.assert_allclose(proba, reference.predict_proba(X[test]), atol=1e-4)
    rows = X[test]
    est.predict_proba(rows)
    np.testing.assert_array_equal(rows, X[test])  # the kept model copies what it is given later
