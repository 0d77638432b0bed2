"""Stacking (`--ensemble stack`): a meta-learner over runs' out-of-fold probabilities, nested in their folds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from featcache.evaluation import stacking
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import HeldOut, fit_head
from featcache.evaluation.stacking import fit_meta_learner, stack, stack_features
from featcache.options import BY_NAME, OptionError
from featcache.reporting.compare import collect_runs, ensemble_rows

from .fakes import FakeEntry

CLASSES = ["a", "b", "c"]


def _noise(n: int = 300, members: int = 15, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.array(CLASSES)[rng.integers(0, 3, n)]
    return y, [rng.dirichlet(np.ones(3), n) for _ in range(members)]


def test_members_that_know_nothing_stack_to_chance_though_a_leaky_fit_would_not():
    y, probas = _noise()
    folds, seeds = np.arange(len(y)) % 5, np.zeros(len(y), dtype=int)
    stacked = stack(probas, y, CLASSES, seeds, folds)
    y_idx = np.array([CLASSES.index(v) for v in y])
    nested = balanced_accuracy_score(y_idx, stacked.oof.argmax(axis=1))
    assert abs(nested - 1 / 3) < 0.08
    # the same meta-learner scored on the rows it was fit on: what an un-nested stack would report
    leaky = fit_meta_learner(stack_features(probas), y_idx, None, 0)
    assert balanced_accuracy_score(y_idx, leaky.predict(stack_features(probas))) > nested + 0.08


def test_each_meta_learner_sees_only_its_folds_training_part(monkeypatch):
    y, probas = _noise(n=120, members=3)
    folds = np.tile(np.arange(4), 60)
    seeds = np.repeat([0, 1], 120)
    y2, probas2 = np.concatenate([y, y]), [np.concatenate([p, p[::-1]]) for p in probas]
    seen = []
    real = stacking.fit_meta_learner

    def spy(X, y_part, groups, seed):
        seen.append(X)
        return real(X, y_part, groups, seed)

    monkeypatch.setattr(stacking, "fit_meta_learner", spy)
    features = stack_features(probas2)
    stack(probas2, y2, CLASSES, seeds, folds)
    assert len(seen) == 8  # 2 seeds x 4 folds
    for (seed, fold), X in zip([(s, f) for s in (0, 1) for f in range(4)], seen, strict=True):
        train = (seeds == seed) & (folds != fold)
        assert X.shape[0] == train.sum() and np.array_equal(X, features[train])


def test_stacking_learns_what_a_soft_vote_cannot():
    """One member is confidently wrong: the vote follows it, the meta-learner learns to discount it."""
    rng = np.random.default_rng(1)
    n = 600
    y_idx = rng.integers(0, 3, n)
    truth = np.eye(3)[y_idx]
    good = 0.55 * truth + 0.45 * rng.dirichlet(np.ones(3), n)
    wrong = 0.9 * np.eye(3)[(y_idx + 1) % 3] + 0.1 * rng.dirichlet(np.ones(3), n)
    y = np.array(CLASSES)[y_idx]
    folds, seeds = np.arange(n) % 5, np.zeros(n, dtype=int)
    stacked = stack([good, wrong], y, CLASSES, seeds, folds, test_probas=[good[:50], wrong[:50]])
    vote = balanced_accuracy_score(y_idx, (good + wrong).argmax(axis=1))
    assert balanced_accuracy_score(y_idx, stacked.oof.argmax(axis=1)) > vote + 0.2
    assert stacked.test.shape == (50, 3) and np.allclose(stacked.test.sum(axis=1), 1)


def _runs(tmp_path, y: np.ndarray, X: np.ndarray, heads=("logreg", "knn", "svm-linear"), shift: float = 0.0,
          protocol: Protocol | None = None):
    data = LabeledFeatures(X, y, np.array([f"g{k // 2}" for k in range(len(y))]), None,
                           [f"i{k}" for k in range(len(y))], sorted(set(y)),
                           grouping={"grouped": True, "by": "column 'group'", "mode": "auto", "column": "group"})
    test = LabeledFeatures(X[:60] * (2 if shift else 1) + shift, y[:60], None, None, [f"t{k}" for k in range(60)],
                           sorted(set(y)))
    entry_dir = tmp_path / "cache" / "toy" / "bb-0"
    entry_dir.mkdir(parents=True)
    for head in heads:
        fit_head(data, FakeEntry(entry_dir), head, "gap", protocol or Protocol(cv=3), "toy", test=HeldOut(test))
    return collect_runs(tmp_path / "cache")


@pytest.mark.slow
def test_stack_of_real_runs_on_shuffled_labels_scores_chance(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(240, 8))
    y = np.array(CLASSES)[rng.permutation(np.arange(240) % 3)]  # labels that owe nothing to the features
    [row] = ensemble_rows(_runs(tmp_path, y, X), "stack")
    assert row.backbone == "ensemble" and row.head.startswith("stack of 3:")
    assert abs(row.metrics["balanced_accuracy"]["pooled"] - 1 / 3) < 0.1


def test_stack_of_real_runs_is_scored_out_of_fold_and_on_the_test_set(tmp_path):
    rng = np.random.default_rng(4)
    y_idx = np.arange(240) % 3
    X = rng.normal(size=(240, 8)) + y_idx[:, None] * 0.7
    [row] = ensemble_rows(_runs(tmp_path, np.array(CLASSES)[y_idx], X), "stack")
    assert row.metrics["balanced_accuracy"]["pooled"] > 0.6
    assert row.metrics["balanced_accuracy"]["ci"][0] < row.metrics["balanced_accuracy"]["pooled"]
    assert row.test is not None and row.test["balanced_accuracy"] > 0.6


def test_ensembles_of_aligned_runs_are_scored_before_and_after_alignment(tmp_path):
    rng = np.random.default_rng(5)
    y_idx = np.arange(240) % 3
    X = rng.normal(size=(240, 8)) + y_idx[:, None] * 0.8
    rows = _runs(tmp_path, np.array(CLASSES)[y_idx], X, heads=("logreg", "svm-linear"), shift=3.0,
                 protocol=Protocol(cv=3, test_align="moments"))
    for spec in ("top2", "stack"):
        [row] = ensemble_rows(rows, spec)
        assert row.test["test_align"] == "moments"
        # the test features were scaled and moved: the as-trained ensemble fails, the aligned one does not
        assert row.test["balanced_accuracy"] > row.test["unaligned"]["balanced_accuracy"] + 0.15


@pytest.mark.parametrize(("given", "spec"), [(3, "top3"), ("top4", "top4"), ("stack", "stack"), ("Stack", "stack")])
def test_the_ensemble_option_takes_a_count_or_stack(given, spec):
    assert BY_NAME["ensemble"].checked(given) == spec


@pytest.mark.parametrize("given", [1, "best", "stack3", "top1"])
def test_the_ensemble_option_refuses_other_spellings(given):
    with pytest.raises(OptionError, match="stack"):
        BY_NAME["ensemble"].checked(given)


def test_a_single_split_cannot_be_stacked_and_says_why(tmp_path):
    rng = np.random.default_rng(6)
    y_idx = np.arange(240) % 3
    X = rng.normal(size=(240, 8)) + y_idx[:, None] * 0.8
    rows = _runs(tmp_path, np.array(CLASSES)[y_idx], X, heads=("logreg", "svm-linear"),
                 protocol=Protocol(split="random712"))
    notes: list[str] = []
    assert ensemble_rows(rows, "stack", notes=notes) == []
    assert len(notes) == 1 and "single train/test split" in notes[0] and "--split cv" in notes[0]
    assert len(ensemble_rows(rows, "top2")) == 1  # a soft vote needs no out-of-fold training predictions


def test_an_ensemble_to_predict_with_names_its_runs_consistently(tmp_path):
    import featcache as fc

    rng = np.random.default_rng(7)
    y_idx = np.arange(240) % 3
    X = rng.normal(size=(240, 8)) + y_idx[:, None]
    rows = _runs(tmp_path, np.array(CLASSES)[y_idx], X, heads=("logreg", "knn"))
    runs = [row.run for row in rows]
    assert fc.Ensemble(runs, 2).spec == "top2" and fc.Ensemble(runs, "stack").spec == "stack"
    with pytest.raises(OptionError, match="2 runs are given"):
        fc.Ensemble(runs, "top3")
    with pytest.raises(OptionError, match="two or more"):
        fc.Ensemble(runs[:1], "stack")


def test_a_top_n_vote_chooses_its_members_for_each_fold_on_the_other_folds_only(monkeypatch):
    """Choosing the N best on the images they are then scored on would reward luck; for each fold the
    vote ranks the runs on the other folds' images only, and votes the chosen ones on this fold's."""
    from types import SimpleNamespace

    from featcache.evaluation import metrics
    from featcache.reporting.compare import _nested_vote

    y, probas = _noise(n=100, members=6, seed=5)
    folds, seeds = np.arange(len(y)) % 5, np.zeros(len(y), dtype=int)
    oof = [SimpleNamespace(proba=p, labels=y, classes=CLASSES, seeds=seeds, folds=folds) for p in probas]
    seen = []
    real = metrics.compute_metrics

    def spy(y_true, proba, classes):
        seen.append(proba)
        return real(y_true, proba, classes)

    monkeypatch.setattr(metrics, "compute_metrics", spy)
    voted = _nested_vote(oof, 2, "balanced_accuracy")
    assert len(seen) == 5 * len(probas)  # each run ranked once per fold
    for fold in range(5):
        rest = folds != fold
        ranked = seen[fold * len(probas):(fold + 1) * len(probas)]
        assert all(np.array_equal(r, p[rest]) for r, p in zip(ranked, probas, strict=True))
        scores = [real(y[rest], p[rest], CLASSES)["balanced_accuracy"] for p in probas]
        best = np.argsort(scores, kind="stable")[::-1][:2]
        np.testing.assert_allclose(voted[folds == fold], np.mean([probas[k][folds == fold] for k in best], axis=0))


def test_runs_named_by_path_are_read_from_their_own_cache_and_a_wrong_path_is_refused(tmp_path, monkeypatch):
    import featcache as fc
    from featcache.errors import FeatcacheError

    rng = np.random.default_rng(6)
    y_idx = np.arange(90) % 3
    rows = _runs(tmp_path, np.array(CLASSES)[y_idx], rng.normal(size=(90, 4)) + y_idx[:, None], heads=("logreg", "knn"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the default cache is ./cache, which holds nothing
    monkeypatch.delenv("FEATCACHE_CACHE", raising=False)
    table = fc.compare(runs=[r.run for r in rows], ensemble=2)
    assert {r.run for r in table.rows if r.backbone != "ensemble"} == {r.run for r in rows}
    assert any(r.backbone == "ensemble" for r in table.rows)
    with pytest.raises(FeatcacheError, match="not a finished run"):
        fc.compare(runs=[rows[0].run, tmp_path / "elsewhere"])
