"""Heads at scale: k-NN past its cap trains on a stratified sample (and says so); large features are
cross-validated one fold at a time."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.evaluation import heads, runner
from featcache.evaluation.head_registry import training_sample

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
    assert len(final.rows_) == 40  # the final fit's 70 rows sampled; the folds' 35 were not


def test_svm_linear_and_mlp_past_their_limits_take_fewer_passes_or_check_more_often_named_and_said(
        tmp_path, monkeypatch, capfd):
    from featcache.evaluation.features import LabeledFeatures
    from featcache.evaluation.protocol import Protocol
    from featcache.progress import Reporter
    from featcache.store.model_files import load_model
    from featcache.store.runs import read_metrics

    from .fakes import FakeEntry

    assert heads.sgd_epochs(100_000) == 15 and heads.sgd_epochs(533_333) == 3 and heads.sgd_epochs(10**8) == 2
    rng = np.random.default_rng(0)
    y = np.array(["mel", "nv", "bcc"])[np.arange(600) % 3]
    X = (rng.normal(size=(600, 16)) + (y[:, None] == np.array(["mel", "nv", "bcc"] * 6)[None, :16]) * 2)
    data = LabeledFeatures(X.astype(np.float32), y, None, None, [f"i{k}" for k in range(600)], ["bcc", "mel", "nv"])
    below = {h: fit_head_quietly(data, FakeEntry(tmp_path / "a"), h) for h in ("svm-linear", "mlp")}
    monkeypatch.setattr(heads, "SGD_FULL_EPOCHS_ROWS", 100)
    monkeypatch.setattr(heads, "MLP_PASS_ROWS", 100)
    monkeypatch.setattr(runner, "PARALLEL_FOLDS_MAX_BYTES", 0)  # folds in this process: they see the patches
    capfd.readouterr()
    above = {h: runner.fit_head(data, FakeEntry(tmp_path / "b"), h, "gap", Protocol(cv=3), "toy", reporter=Reporter())
             for h in ("svm-linear", "mlp")}
    said = " ".join(capfd.readouterr().err.split())
    assert ("so 4 passes, the same number of updates, and each calibration map learns from a sample of 100 of its "
            "held-out rows (recorded in the run as svm_linear_scale_rows)") in said
    assert "every 100 rows, not once per epoch (recorded in the run as mlp_pass_rows)" in said
    assert read_metrics(above["svm-linear"])["config"]["svm_linear_scale_rows"] == 100
    assert read_metrics(above["mlp"])["config"]["mlp_pass_rows"] == 100
    for head in ("svm-linear", "mlp"):  # the rules name the run; below the limits the name is as before
        assert above[head].name != below[head].name and "mlp_pass_rows" not in read_metrics(below[head])["config"]
        assert read_metrics(above[head])["pooled"]["balanced_accuracy"] > 0.8
    svm = load_model(above["svm-linear"], False)["pipeline"].named_steps["head"]
    assert {c.estimator.max_iter for c in svm.model_.calibrated_classifiers_} == {4}  # 400 rows per calibration fit
    from sklearn.model_selection import StratifiedKFold

    plain = list(StratifiedKFold(3).split(data.X, data.y))  # what CalibratedClassifierCV(cv=3) makes
    for (train, test), (kept_train, kept_test) in zip(plain, heads._sampled_calibration(3, data.X, data.y, 100, 0),
                                                      strict=True):
        assert np.array_equal(train, kept_train) and len(kept_test) == 100 and set(kept_test) <= set(test)
    import torch

    steps = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    for limit, batches in ((100, 2 * 2), (10**6, 2 * 11)):  # two checks: 2 passes of 100 rows, or 2 epochs of 510
        monkeypatch.setattr(heads, "MLP_PASS_ROWS", limit)
        steps.clear()
        heads.TorchMLPClassifier(max_epochs=2, batch_size=50).fit(data.X, data.y)
        assert len(steps) == batches, limit


def fit_head_quietly(data, entry, head: str):  # noqa: ANN001, ANN201
    from featcache.evaluation.protocol import Protocol

    return runner.fit_head(data, entry, head, "gap", Protocol(cv=3), "toy")


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


def test_the_knn_head_votes_as_scikit_learn_s_cosine_knn_with_distance_weights():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 24)).astype(np.float32) + np.repeat(np.eye(3, 24) * 2, [200, 150, 50], axis=0)
    y = np.repeat(np.array(["nv", "mel", "bcc"]), [200, 150, 50])
    X[5] = 0.0  # a zero row: cosine 0 to everything
    queries = np.concatenate([rng.normal(size=(150, 24)).astype(np.float32), X[:3] * 2.5])  # exact copies (scaled)
    ours = heads.CosineKNN(n_neighbors=11).fit(X, y)
    theirs = KNeighborsClassifier(n_neighbors=11, metric="cosine", weights="distance").fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(queries), theirs.predict_proba(queries), atol=1e-4)
    assert list(ours.classes_) == list(theirs.classes_)
    assert list(ours.predict(queries[-3:])) == list(y[:3])  # an exact copy takes its original's label
    with pytest.raises(heads.RunError, match="11 neighbours asked for, and only 5 training rows"):
        heads.CosineKNN(n_neighbors=11).fit(X[:5], y[:5])


def test_past_its_exact_limit_the_duplicate_audit_searches_approximately_finds_the_same_pairs_and_says_so():
    from featcache.evaluation.audit import leakage_message
    from featcache.evaluation.leakage import find_duplicates

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 48)) * 3
    X = (centres[rng.integers(0, 12, 3000)] + rng.normal(size=(3000, 48))).astype(np.float32)
    copies = rng.choice(3000, 40, replace=False)
    X[copies[20:]] = X[copies[:20]] + rng.normal(size=(20, 48)).astype(np.float32) * 0.05  # 20 near copies
    sha = [f"{k:064x}" for k in range(3000)]
    sha[copies[1]] = sha[copies[0]]  # and one byte-identical pair
    exact = find_duplicates(X, sha, 0.91)
    approximate = find_duplicates(X, sha, 0.91, exact_max=1000)
    assert exact.search == "exact" and approximate.search.startswith("approximate (faiss IVF: 54 cells, 8 probed")
    found = {(a, b): s for a, b, s in zip(approximate.first, approximate.second, approximate.similarity, strict=True)}
    assert found.keys() == set(zip(exact.first, exact.second, strict=True)) and len(found) >= 21
    np.testing.assert_allclose(list(found.values()), exact.similarity, atol=1e-5)
    assert approximate.n_exact == exact.n_exact == 1
    leak = {"exact_duplicate_pairs": 1, "near_duplicate_pairs": approximate.n_near, "threshold": 0.91,
            "threshold_calibrated": True, "search": approximate.search, "held_out_with_duplicate_in_train": 0,
            "held_out": 3000}
    assert "cosine >= 0.91, by an approximate (faiss IVF" in leakage_message(leak, {})[0]
    assert "approximate" not in leakage_message(leak | {"search": "exact"}, {})[0]
