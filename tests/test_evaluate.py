"""The head stage: no leakage across groups, scaler on training rows only, metrics as sklearn's."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from featcache.cli import app
from featcache.evaluation import head_registry as H
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.heads import TorchMLPClassifier
from featcache.evaluation.metrics import compute_metrics
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.evaluation.splits import make_folds
from featcache.recipes import FitPlan

from .conftest import shared
from .fakes import FakeEntry


@pytest.mark.slow
def test_no_lesion_in_both_train_and_test():
    import csv

    with open(shared("ham10000_200x150") / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    y = np.array([r["dx"] for r in rows])
    groups = np.array([r["lesion_id"] for r in rows])
    folds = make_folds(y, groups, 5, seed=0)
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert set(y[test]) == set(y)  # still stratified: every class in every fold
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(len(y)))


def _blobs(n: int = 120, dim: int = 8, seed: int = 0) -> LabeledFeatures:
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b", "c"])[np.arange(n) % 3]
    X = rng.normal(size=(n, dim)) * 50 + 1000  # unscaled, as raw CNN features can be
    X[:, 0] += (np.arange(n) % 3) * 250
    X[:, 1] = np.arange(n)  # row identity, to see which rows a scaler saw
    return LabeledFeatures(X, y, np.array([f"g{i // 2}" for i in range(n)]), None,
                           [f"id{i}" for i in range(n)], ["a", "b", "c"])


SEEN: list[set[int]] = []


class RecordingScaler(StandardScaler):
    """Remembers which rows (by the id in column 1) each fit saw."""

    def fit(self, X, y=None, sample_weight=None):
        SEEN.append(set(np.asarray(X)[:, 1].astype(int).tolist()))
        return super().fit(X, y, sample_weight)


def test_scaler_is_fit_on_training_rows_only(tmp_path, monkeypatch):
    SEEN.clear()
    seen = SEEN
    monkeypatch.setattr(H, "StandardScaler", RecordingScaler)
    data = _blobs()
    # jobs=1: the folds run in this process, where the recording scaler is patched in
    fit_head(data, FakeEntry(tmp_path), "logreg", "gap", Protocol(cv=4), "blobs", plan=FitPlan(jobs=1))
    folds = make_folds(data.y, data.groups, 4, seed=0)
    assert len(seen) == 5  # four folds, then the final refit on everything
    for rows, (train, test) in zip(seen, folds, strict=False):
        assert rows == set(train.tolist()) and not rows & set(test.tolist())
    assert seen[-1] == set(range(len(data.y)))


@pytest.mark.parametrize("head", ["logreg", pytest.param("mlp", marks=pytest.mark.slow)])
def test_parallel_folds_give_the_same_run_as_serial_ones(tmp_path, head):
    data = _blobs()
    runs = [fit_head(data, FakeEntry(tmp_path / f"jobs{jobs}"), head, "gap", Protocol(cv=4), "blobs",
                     plan=FitPlan(jobs=jobs))
            for jobs in (1, 2)]
    serial, parallel = ((run / "oof_predictions.csv").read_text() for run in runs)
    assert serial.count("\n") == len(data.y) + 1
    assert serial == parallel


def test_metrics_match_sklearn_on_known_predictions():
    classes = ["akiec", "mel", "nv"]
    y = np.array(["nv"] * 6 + ["mel"] * 3 + ["akiec"])
    pred_idx = np.array([2, 2, 2, 2, 2, 1, 1, 1, 2, 0])
    proba = np.full((10, 3), 0.1)
    proba[np.arange(10), pred_idx] = 0.8
    m = compute_metrics(y, proba, classes)
    y_idx = np.array([classes.index(v) for v in y])
    # Balanced accuracy by hand: recalls nv 5/6, mel 2/3, akiec 1/1.
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 2 / 3 + 1) / 3)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_idx, pred_idx))
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_idx, pred_idx, average="macro"))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y_idx, proba, multi_class="ovr"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y_idx, proba))
    assert m["confusion_matrix"] == skm.confusion_matrix(y_idx, pred_idx).tolist()


def test_binary_metrics_use_the_rarer_class_as_positive():
    y = np.array(["nevus"] * 8 + ["melanoma"] * 2)
    proba = np.array([[0.1, 0.9]] * 7 + [[0.6, 0.4]] + [[0.7, 0.3], [0.2, 0.8]])
    m = compute_metrics(y, proba, ["melanoma", "nevus"])
    assert m["positive_class"] == "melanoma"
    assert m["sensitivity"] == pytest.approx(0.5) and m["specificity"] == pytest.approx(7 / 8)


@pytest.mark.slow
def test_mlp_learns_unscaled_features_and_is_deterministic():
    data = _blobs(n=300, seed=1)
    X = np.delete(data.X, 1, axis=1)  # drop the row-id column
    a = H.make_pipeline("mlp", seed=3).fit(X, data.y)  # scaler + MLP, as featcache always runs it
    b = H.make_pipeline("mlp", seed=3).fit(X, data.y)
    curve = a.named_steps["head"].loss_curve_
    assert isinstance(a.named_steps["head"], TorchMLPClassifier)
    assert curve[-1] < 0.5 * curve[0]
    assert (a.predict(X) == data.y).mean() > 0.6  # chance is 1/3
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


@pytest.mark.parametrize("n_classes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_vectorized_bootstrap_equals_sklearn_on_every_resample(n_classes):
    from featcache.evaluation.metrics import bootstrap_ci

    rng = np.random.default_rng(n_classes)
    classes = [f"c{i}" for i in range(n_classes)]
    y = np.array(classes)[rng.choice(n_classes, 300, p=np.r_[0.55, [0.45 / (n_classes - 1)] * (n_classes - 1)])]
    proba = rng.dirichlet(np.ones(n_classes), 300)
    proba[np.arange(300), [classes.index(v) for v in y]] += rng.uniform(0, 0.6, 300)
    proba = np.round(proba / proba.sum(axis=1, keepdims=True), 2)  # rounding makes ties, as kNN gives
    # (rounded rows no longer sum to 1, so the reference averages the one-vs-rest AUCs itself)
    got = bootstrap_ci(y, proba, classes, n=200, seed=7)

    draws = {m: [] for m in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")}
    resample_rng, y_idx, pred = np.random.default_rng(7), np.array([classes.index(v) for v in y]), proba.argmax(1)
    for _ in range(200):  # the resamples bootstrap_ci draws, scored one by one by scikit-learn
        idx = np.sort(resample_rng.integers(0, 300, 300))
        yt, pp = y_idx[idx], pred[idx]
        draws["accuracy"].append(skm.accuracy_score(yt, pp))
        draws["balanced_accuracy"].append(skm.balanced_accuracy_score(yt, pp))
        draws["macro_f1"].append(skm.f1_score(yt, pp, average="macro", labels=np.unique(yt), zero_division=0))
        if n_classes == 2:
            positive = int(np.argmin(np.bincount(y_idx)))
            draws["auroc"].append(skm.roc_auc_score(yt == positive, proba[idx, positive]))
        else:
            draws["auroc"].append(np.mean([skm.roc_auc_score(yt == c, proba[idx, c]) for c in range(n_classes)]))
    for metric, values in draws.items():
        assert got[metric] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)], abs=1e-9)


def test_svm_probabilities_keep_the_class_balance():
    # 90 % / 10 %, the minority shifted by 0.4 std per feature: calibrating without the class
    # weights gives the minority a recall of 0.0 here (checked by hand); weighted, about 0.85.
    rng = np.random.default_rng(0)
    y = np.array(["common"] * 900 + ["rare"] * 100)
    X = rng.normal(size=(1000, 16)) + (y == "rare")[:, None] * 0.4
    for head in ("svm-linear", "svm-rbf", "svm-rbf-exact"):
        model = H.make_pipeline(head).fit(X[::2], y[::2])
        predicted = model.classes_[model.predict_proba(X[1::2]).argmax(axis=1)]
        recall_rare = (predicted[y[1::2] == "rare"] == "rare").mean()
        assert recall_rare > 0.5, (head, recall_rare)
        assert skm.balanced_accuracy_score(y[1::2], predicted) > 0.7, head


def test_tune_search_stops_at_its_time_budget_and_keeps_the_default_first():
    from sklearn.model_selection import StratifiedKFold

    from featcache.evaluation.search import BudgetedSearch

    data = _blobs(n=300, seed=2)
    grid = H.grid_of("logreg")
    unbounded = BudgetedSearch(H.make_pipeline("logreg"), grid, StratifiedKFold(3), budget_s=600).fit(data.X, data.y)
    assert [r["params"]["head__C"] for r in unbounded.cv_results_] == grid["head__C"]
    bounded = BudgetedSearch(H.make_pipeline("logreg"), grid, StratifiedKFold(3), budget_s=0).fit(data.X, data.y)
    assert [r["params"] for r in bounded.cv_results_] == [{"head__C": grid["head__C"][0]}]  # the default only
    assert bounded.best_params_ == {"head__C": 1.0} and bounded.predict_proba(data.X).shape == (300, 3)


@pytest.mark.slow
def test_cli_extract_fit_compare_predict_end_to_end(small_folder, tmp_path):
    runner = CliRunner()
    cache = str(tmp_path / "cache")
    out = runner.invoke(app, ["extract", "--data", str(small_folder), "--cache", cache, "-q"])
    assert out.exit_code == 0, out.output
    fit = ["fit", "--data", str(small_folder), "--cache", cache, "--head", "logreg,majority", "--cv", "3", "-q"]
    out = runner.invoke(app, fit)
    assert out.exit_code == 0, out.output
    assert "logreg" in out.output and "majority (baseline)" in out.output
    again = runner.invoke(app, fit[:-1])
    assert "already finished, reusing" in again.output
    (run,) = list((tmp_path / "cache").glob("*/*/runs/logreg-*"))
    assert {p.name for p in run.iterdir()} >= {"metrics.json", "oof_predictions.csv", "model.skops", "model.json",
                                               "config.json"}
    out = runner.invoke(app, ["compare", "--cache", cache, "--metric", "auroc"])
    assert out.exit_code == 0 and (tmp_path / "cache" / "compare.md").exists()
    preds = tmp_path / "p.csv"
    out = runner.invoke(app, ["predict", "--run", str(run), str(small_folder / "nevus"), "--out", str(preds),
                              "--cache", cache])
    assert out.exit_code == 0, out.output
    lines = preds.read_text().splitlines()
    header = ("id,group,predicted,p_melanoma,p_nevus,near_duplicate_of,similarity,neighbours_agree,ood_score,"
              "ood_percentile,ood")
    assert lines[0] == header and len(lines) == 7
    # these are the training images themselves: every one is named as an exact duplicate
    with open(preds, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["near_duplicate_of"].startswith("nevus/") and r["similarity"] == "1.0000" for r in rows)
    assert all(r["ood"] in ("true", "false") and 0 <= float(r["ood_percentile"]) <= 100 for r in rows)
    assert "identical or nearly identical to a training image" in out.output
