"""Across clinics: the shift audit and the label-free test alignment (issue 23, first part)."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import RunError
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import HeldOut, fit_head
from featcache.evaluation.shift import align, domain_auroc, em_prevalence, shift_warning
from featcache.progress import Reporter
from featcache.store.runs import read_metrics, read_model_card, read_predictions

from .fakes import FakeEntry


def _clinic(n: int, seed: int, scale: float = 1.0, offset: float = 0.0, ids: str = "a") -> LabeledFeatures:
    """Two classes apart along every dimension; another clinic's camera scales and shifts the features."""
    rng = np.random.default_rng(seed)
    y = np.array(["mel", "nv"])[np.arange(n) % 2]
    X = rng.normal(size=(n, 8)) + (y == "mel")[:, None] * 1.5
    return LabeledFeatures((X * scale + offset).astype(np.float32), y, None, None,
                           [f"{ids}{k}" for k in range(n)], ["mel", "nv"])


@pytest.mark.parametrize("method", ["moments", "coral"])
def test_aligning_a_set_to_itself_changes_nothing(method):
    X = _clinic(200, 0).X
    np.testing.assert_allclose(align(X, X, method), X, atol=1e-4 if method == "coral" else 1e-5)
    views = np.stack([X, X[:, ::-1]], axis=1)  # (images, views, dim) keeps its shape
    assert align(views, views, method).shape == views.shape


def test_alignment_maps_the_moments_and_refuses_a_batch_too_small():
    train, test = _clinic(300, 0).X, _clinic(300, 1, scale=2.0, offset=3.0).X
    moved = align(test, train, "moments")
    np.testing.assert_allclose(moved.mean(axis=0), train.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(moved.std(axis=0), train.std(axis=0), rtol=1e-4)
    coral = align(test, train, "coral")
    np.testing.assert_allclose(np.cov(coral.T), np.cov(train.T), atol=0.15)
    with pytest.raises(RunError, match="too few to estimate .* --align-from"):
        align(test[:10], train, "moments")


def test_coral_shrinks_a_covariance_a_small_batch_cannot_estimate_towards_moments():
    from featcache.evaluation.shift import coral_shrinkage

    rng = np.random.default_rng(0)
    mixing = np.eye(200) + 0.5 * rng.normal(size=(200, 200)) / np.sqrt(200)
    train = rng.normal(size=(3000, 200)) @ mixing
    small = rng.normal(size=(40, 200)) @ mixing * 2.0 + 1.0  # 40 images, 200 dimensions: a singular covariance
    assert coral_shrinkage(small) > 0.9 and coral_shrinkage(train) < 0.5
    coral, moments = align(small, train, "coral"), align(small, train, "moments")
    fixed = align(small, train, "coral", shrinkage=0.1)  # the old fixed shrinkage whitens with noise
    assert np.abs(coral - moments).mean() < 0.5 * np.abs(fixed - moments).mean()
    assert Protocol(test_align="coral").config()["coral_shrinkage"] == "ledoit-wolf"
    assert "coral_shrinkage" not in Protocol(test_align="moments").config()


def test_the_domain_classifier_tells_clinics_apart_only_when_they_differ():
    same, _ = domain_auroc(_clinic(400, 0).X, _clinic(400, 1).X)
    shifted, interval = domain_auroc(_clinic(400, 0).X, _clinic(400, 1, scale=2.0, offset=3.0).X)
    assert 0.4 < same < 0.62 and shifted > 0.95 and interval[0] <= shifted <= interval[1]


def test_em_recovers_a_test_prevalence_from_calibrated_probabilities():
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.8).astype(int)  # 80 % positive at test time, 50 % in training
    score = rng.normal(size=5000) + (2 * y - 1)
    p1 = 1 / (1 + np.exp(-2 * score))  # calibrated for the training prior of 0.5
    estimate = em_prevalence(np.c_[1 - p1, p1], np.array([0.5, 0.5]))
    assert estimate[1] == pytest.approx(0.8, abs=0.03)


def test_fit_on_another_clinic_warns_audits_and_moments_alignment_recovers_it(tmp_path, capfd):
    train, test = _clinic(300, 0), _clinic(200, 1, scale=2.0, offset=3.0, ids="b")
    plain = read_metrics(fit_head(train, FakeEntry(tmp_path / "p"), "logreg", "gap", Protocol(cv=3), "toy",
                                  test=HeldOut(test), reporter=Reporter()))
    warning = capfd.readouterr().err
    assert "domain shift:" in warning and "try --test-align auto (or moments)" in " ".join(warning.split())
    shift = plain["test"]["shift"]
    assert shift["domain_auroc"] > 0.95 and shift["ood_fraction"] > 0.5
    assert set(shift["prevalence_estimate"]) == {"mel", "nv"} and shift["prevalence_true"]["mel"] == 0.5
    run = fit_head(train, FakeEntry(tmp_path / "a"), "logreg", "gap", Protocol(cv=3, test_align="moments"), "toy",
                   test=HeldOut(test), reporter=Reporter())
    warning = capfd.readouterr().err  # an aligned run does not advise what it already does
    assert "domain shift:" in warning and "try --test-align" not in warning
    assert "after --test-align moments" in " ".join(warning.split())
    aligned = read_metrics(run)
    assert aligned["test"]["balanced_accuracy"] >= plain["test"]["balanced_accuracy"] + 0.2
    assert aligned["test"]["unaligned"]["balanced_accuracy"] == pytest.approx(plain["test"]["balanced_accuracy"])
    assert aligned["config"]["protocol"]["test_align"] == "moments"  # part of the run's name
    assert "test_align" not in plain["config"]["protocol"]  # runs made without it keep their names


@pytest.mark.slow
def test_permuting_the_test_labels_changes_no_prediction(tmp_path):
    train, test = _clinic(300, 0), _clinic(200, 1, scale=2.0, offset=3.0, ids="b")
    shuffled = LabeledFeatures(test.X, np.random.default_rng(5).permutation(test.y), None, None, test.ids,
                               test.classes)
    protocol = Protocol(cv=3, test_align="coral")
    first = read_predictions(fit_head(train, FakeEntry(tmp_path / "1"), "logreg", "gap", protocol, "toy",
                                      test=HeldOut(test)), "test")
    second = read_predictions(fit_head(train, FakeEntry(tmp_path / "2"), "logreg", "gap", protocol, "toy",
                                       test=HeldOut(shuffled)), "test")
    np.testing.assert_array_equal(first.proba, second.proba)


def test_no_warning_when_the_test_set_is_like_the_training_set():
    assert shift_warning({"domain_auroc": 0.55, "domain_auroc_ci": [0.5, 0.6], "ood_fraction": 0.05}) is None


@pytest.mark.slow
def test_each_image_s_ood_percentile_says_how_many_held_out_training_images_lie_closer():
    from featcache.evaluation.shift import ood_per_image

    train = _clinic(600, 0).X
    alike, elsewhere = _clinic(400, 1).X, _clinic(400, 2, scale=1.5, offset=2.5).X
    _, percentile = ood_per_image(train, alike)
    # images like the training ones: about 5 % above the 95th percentile of held-out training images
    assert 0.01 <= np.mean(percentile > 95) <= 0.12 and 35 < np.median(percentile) < 65
    scores, far = ood_per_image(train, elsewhere)
    assert np.mean(far > 95) > 0.8 and scores.shape == (400,)
    views = np.stack([train, train * 1.01], axis=1)  # (images, views, dim): one score per image
    assert ood_per_image(views, np.stack([alike, alike], axis=1))[0].shape == (400,)


def test_bbse_estimates_a_label_shift_that_em_gets_wrong_and_a_degenerate_estimate_is_flagged():
    from featcache.evaluation.shift import bbse_prevalence, prevalence_estimates

    rng = np.random.default_rng(0)
    prior = np.array([0.5, 0.5])

    def predictions(y: np.ndarray, overconfident: float) -> np.ndarray:
        score = rng.normal(size=len(y)) + (2 * y - 1)
        p1 = 1 / (1 + np.exp(-overconfident * score))
        return np.c_[1 - p1, p1]

    heldout_y = (rng.random(4000) < 0.5).astype(int)
    heldout = predictions(heldout_y, 2.0)
    test_y = (rng.random(3000) < 0.2).astype(int)  # 20 % positive at the other hospital
    # the shift also made the model overconfident: EM, which trusts calibration, runs away; BBSE does not
    test = predictions(test_y, 12.0)
    bbse = bbse_prevalence(test, heldout, heldout_y, prior)
    assert bbse[1] == pytest.approx(0.2, abs=0.04)
    assert abs(em_prevalence(test, prior)[1] - 0.2) > 2 * abs(bbse[1] - 0.2)
    found = prevalence_estimates(test, prior, ["a", "b"], (heldout, np.array(["a", "b"])[heldout_y]))
    low, high = found["prevalence_bbse_ci"]["b"]
    assert low < 0.2 < high and found["prevalence_bbse"]["b"] == pytest.approx(bbse[1])
    calibrated = prevalence_estimates(predictions(test_y, 2.0), prior, ["a", "b"],
                                      (heldout, np.array(["a", "b"])[heldout_y]))
    assert calibrated["prevalence_degenerate"] is None
    runaway = prevalence_estimates(np.c_[np.full(50, 0.01), np.full(50, 0.99)], prior, ["a", "b"])
    assert "degenerate" in runaway["prevalence_degenerate"]


def test_predict_aligns_a_batch_or_refuses_one_too_small_to_align(tmp_path):
    import shutil

    from typer.testing import CliRunner

    import featcache as fc
    from featcache.cli import app

    from .conftest import DEMO

    folder = tmp_path / "clinic_b"
    for label in ("melanoma", "nevus"):
        (folder / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[:18]:
            shutil.copy(src, folder / label / src.name)
    cache = tmp_path / "cache"
    fc.extract(folder, cache=cache, engine="torch", quiet=True)
    [run] = fc.fit(folder, heads=["logreg"], cv=3, cache=cache, engine="torch", quiet=True, conformal=0.9)
    few = [str(p) for p in sorted(folder.rglob("*.jpg"))[:3]]
    out = CliRunner().invoke(app, ["predict", "--run", str(run.path), *few, "--test-align", "moments",
                                   "--cache", str(cache), "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 2 and "too few to estimate" in out.output and "--align-from" in out.output, out.output
    aligned = run.predict(few, test_align="moments", align_from=folder, cache=cache)
    plain = run.predict(few, cache=cache)
    assert list(aligned.index) == list(plain.index) and np.allclose(aligned.filter(like="p_").sum(axis=1), 1.0)
    assert all(s and set(s.split("|")) <= {"melanoma", "nevus"} for s in plain["set_90"])  # each image's set
    out = CliRunner().invoke(app, ["predict", "--run", str(run.path), *few, "--cache", str(cache), "--out",
                                   str(tmp_path / "sets.csv")])
    assert out.exit_code == 0 and "set_90" in (tmp_path / "sets.csv").read_text().splitlines()[0]
    # each image's distance from the training images, and the flag whose meaning the column names say
    header = (tmp_path / "sets.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["ood_score", "ood_percentile", "ood"]
    assert plain["ood_percentile"].between(0, 100).all() and (plain["ood"] == (plain["ood_percentile"] > 95)).all()
    # the statistics came from the training images themselves: aligning to them changes nothing
    np.testing.assert_allclose(aligned.filter(like="p_").to_numpy(), plain.filter(like="p_").to_numpy(), atol=1e-4)
    # a fused run aligns too: every backbone's features, each with its pooling, side by side
    fc.extract(folder, backbone="squeezenet1_1", cache=cache, engine="torch", quiet=True)
    [fused] = fc.fit(folder, backbone="efficientnet_lite0+squeezenet1_1", heads=["logreg"], cv=3, cache=cache,
                     engine="torch", quiet=True)
    aligned = fused.predict(few, test_align="moments", align_from=folder, cache=cache)
    plain = fused.predict(few, cache=cache)
    np.testing.assert_allclose(aligned.filter(like="p_").to_numpy(), plain.filter(like="p_").to_numpy(), atol=1e-4)
    batch = fused.predict(sorted(folder.rglob("*.jpg")), test_align="moments", cache=cache)
    assert batch["failed"].eq("").all() and np.allclose(batch.filter(like="p_").sum(axis=1), 1.0)
    # auto: the batch's choice and why, and the probabilities of the alignment it chose
    auto = fused.predict(sorted(folder.rglob("*.jpg")), test_align="auto", cache=cache)
    choice = auto.attrs["test_align_choice"]
    assert choice["chosen"] in ("none", "moments") and choice["reason"]
    chosen = batch if choice["chosen"] == "moments" else fused.predict(sorted(folder.rglob("*.jpg")), cache=cache)
    np.testing.assert_allclose(auto.filter(like="p_").to_numpy(), chosen.filter(like="p_").to_numpy())
    out = CliRunner().invoke(app, ["predict", "--run", str(fused.path), str(folder), "--test-align", "auto",
                                   "--cache", str(cache), "--out", str(tmp_path / "auto.csv")])
    assert out.exit_code == 0 and f"--test-align auto chose {choice['chosen']}" in " ".join(out.output.split())
    # a fused run finds its parts in its own cache after the cache has moved (it recorded where they were)
    moved = tmp_path / "moved"
    shutil.move(cache, moved)
    again = fc.Run(moved / fused.path.relative_to(cache)).predict(few, cache=moved)
    np.testing.assert_allclose(again.filter(like="p_").to_numpy(), plain.filter(like="p_").to_numpy())


# --- conformal prediction sets ------------------------------------------------------------------

def test_the_conformal_quantile_and_cross_conformal_coverage_keep_their_promise():
    from featcache.evaluation.conformal import cross_conformal, quantile

    assert quantile(np.arange(1.0, 10.0), 0.9) == 9.0 and quantile(np.arange(1.0, 5.0), 0.9) == np.inf
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    logits = rng.normal(size=(3000, 3)) + np.eye(3)[y] * 1.2
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    folds = np.arange(3000) % 5
    for mode in ("marginal", "class"):
        found = cross_conformal(proba, y, folds, 0.9, mode)
        assert 0.88 <= found["coverage"] <= 0.92 and 1.0 < found["mean_set_size"] < 3.0, (mode, found)


def test_fit_with_conformal_sets_reports_their_coverage_out_of_fold_and_on_the_test_set(tmp_path):
    train, test = _clinic(600, 0), _clinic(300, 1, scale=2.0, offset=3.0, ids="b")
    run = fit_head(train, FakeEntry(tmp_path), "logreg", "gap", Protocol(cv=5, conformal=0.9, test_align="moments"),
                   "toy", test=HeldOut(test))
    metrics = read_metrics(run)
    found = metrics["conformal"]
    assert found["level"] == 0.9 and 0.85 <= found["coverage"] <= 0.95 and len(found["thresholds"]) == 2
    assert 0.8 <= metrics["test"]["conformal"]["coverage"] <= 1.0  # aligned: the promise holds again
    assert metrics["test"]["unaligned"]["conformal"]["coverage"] < metrics["test"]["conformal"]["coverage"]
    assert metrics["config"]["protocol"]["conformal"] == 0.9


def test_sets_calibrated_by_group_keep_the_coverage_in_each_group(tmp_path):
    from featcache.evaluation.conformal import by_group, cross_conformal, group_limits

    rng = np.random.default_rng(1)
    n = 4000
    y = rng.integers(0, 3, n)
    site = np.where(np.arange(n) % 4 == 0, "dermoscope-b", "dermoscope-a")  # a quarter from a blurrier device
    sharpness = np.where(site == "dermoscope-a", 2.0, 0.6)
    logits = rng.normal(size=(n, 3)) + np.eye(3)[y] * sharpness[:, None]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    folds = np.arange(n) % 5
    marginal = cross_conformal(proba, y, folds, 0.9, "marginal")
    found, sets = by_group(proba, y, folds, 0.9, "marginal", site, "device")
    covered = sets[np.arange(n), y]
    b = site == "dermoscope-b"
    from featcache.evaluation.conformal import out_of_fold_sets

    plain = out_of_fold_sets(proba, y, folds, 0.9, "marginal")[np.arange(n), y]
    assert plain[b].mean() < 0.85  # one threshold for all under-covers the blurry device
    assert 0.87 <= covered[b].mean() <= 0.93 and 0.87 <= covered[~b].mean() <= 0.93
    assert found["by"]["groups"]["dermoscope-b"]["n"] == int(b.sum()) and found["thresholds"] == marginal["thresholds"]
    limits, unseen = group_limits(found, ["dermoscope-b", "dermoscope-a", "phone"])
    assert unseen == 1 and limits.shape == (3, 3)
    np.testing.assert_array_equal(limits[2], marginal["thresholds"])
    # through fit: the column's values calibrate the sets and name the run; the test set reports each group
    train, test = _clinic(600, 0), _clinic(300, 1, ids="b")
    train.strata = np.array(["x", "y", "z"] * 200, dtype=object)
    test.strata = np.array(["x", "y", "w"] * 100, dtype=object)
    protocol = Protocol(cv=5, conformal=0.9, conformal_by="device")
    run = fit_head(train, FakeEntry(tmp_path), "logreg", "gap", protocol, "toy", test=HeldOut(test))
    metrics = read_metrics(run)
    assert set(metrics["conformal"]["by"]["groups"]) == {"x", "y", "z"}
    assert metrics["test"]["conformal"]["by"]["overall_threshold_images"] == 100
    assert metrics["config"]["protocol"]["conformal_by"] == "device"
    assert "conformal_by" not in Protocol(conformal=0.9).config()


def test_fit_and_predict_calibrate_sets_by_a_column_of_the_csv(tmp_path, capfd):
    import featcache as fc

    from .conftest import DEMO

    rows = ["bild;befund;Gerät "]
    for label in ("melanoma", "nevus"):
        for k, src in enumerate(sorted((DEMO / "images" / label).glob("*.jpg"))[:30]):
            rows.append(f"{src};{label};{'A' if k % 3 else 'B'}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "clinic_b.csv").write_text("\n".join(r.rsplit(";", 1)[0] for r in rows[:1] + rows[1::4]) + "\n")
    cache = tmp_path / "c"
    fc.extract(tmp_path / "train.csv", image_col="bild", cache=cache, quiet=True)
    run = fc.fit(tmp_path / "train.csv", image_col="bild", label_col="befund", heads=["logreg"], cv=3, cache=cache,
                 no_groups=True, conformal=0.8, conformal_by="gerät", test_data=tmp_path / "clinic_b.csv")[0]
    assert "clinic_b.csv has no such column" in capfd.readouterr().err
    by = run.metrics["conformal"]["by"]
    assert by["column"] == "Gerät " and {g: v["n"] for g, v in by["groups"].items()} == {"A": 40, "B": 20}
    assert run.metrics["config"]["protocol"]["conformal_by"] == "Gerät "
    frame = run.predict([str(tmp_path / "train.csv")], image_col="bild", cache=cache)
    limits = {g: v["thresholds"][0] for g, v in by["groups"].items()}
    column = {r.split(";")[0]: r.split(";")[2] for r in rows[1:]}
    for image_id, row in frame.iterrows():  # each image's set at its own device's threshold
        expected = {c for c in ("melanoma", "nevus") if 1 - row[f"p_{c}"] <= limits[column[image_id]]}
        assert set(filter(None, row["set_80"].split("|"))) == expected
    assert "sets 0.8 marginal by Gerät" in fc.compare(cache=cache).rows[0].held_out


# --- --test-align auto --------------------------------------------------------------------------

def _copies(data: LabeledFeatures, keep: np.ndarray, offset: float = 0.0) -> LabeledFeatures:
    """Some of ``data``'s images again, as another clinic's camera would give them (``offset``: added to one
    feature, a device's shift of its statistics)."""
    X = data.X[keep].copy()
    X[:, 0] += offset
    return LabeledFeatures(X, data.y[keep], None, None, [f"copy{k}" for k in range(int(keep.sum()))], data.classes)


def test_auto_aligns_a_device_shift_and_leaves_a_change_of_class_mix_alone():
    from featcache.evaluation.shift import AUTO_MIN_CLOSER, choose_alignment, nearest_similarity

    train = _clinic(300, 0)
    everything = np.ones(300, dtype=bool)
    device = choose_alignment(train.X, _copies(train, everything, offset=40.0).X)
    assert device.method == "moments" and device.evidence["closer"] >= AUTO_MIN_CLOSER
    assert device.evidence["nearest_similarity"]["moments"] > 0.99  # aligned, they are the training images again
    # the same images, mostly of one class: aligning their statistics would move them away from themselves
    mostly_mel = everything & ((train.y == "mel") | (np.arange(300) % 10 == 1))
    label_shift = choose_alignment(train.X, _copies(train, mostly_mel).X)
    assert label_shift.method == "none" and label_shift.evidence["closer"] < 0
    assert "not what sets them apart" in label_shift.reason
    same = choose_alignment(train.X, train.X)
    assert same.method == "none" and same.evidence["closer"] == pytest.approx(0.0, abs=1e-9)
    # every number of the record can be recomputed from the features
    assert device.record()["nearest_similarity"]["none"] == nearest_similarity(train.X, _copies(train, everything,
                                                                                                   offset=40.0).X)
    few = choose_alignment(train.X, train.X[:10])
    assert few.method == "none" and "too few" in few.reason


def test_fit_with_auto_records_its_choice_and_scores_what_it_chose(tmp_path, capfd):
    train = _clinic(300, 0)
    everything = np.ones(300, dtype=bool)
    for name, test, expected in (("device", _copies(train, everything, offset=40.0), "moments"),
                                 ("mix", _copies(train, (train.y == "mel") | (np.arange(300) % 10 == 1)), "none")):
        run = fit_head(train, FakeEntry(tmp_path / f"{name}-auto"), "logreg", "gap", Protocol(cv=3, test_align="auto"),
                       "toy", test=HeldOut(test), reporter=Reporter())
        auto = read_metrics(run)
        said = " ".join(capfd.readouterr().err.split())
        choice = auto["test"]["test_align_choice"]
        assert choice["chosen"] == expected and f"--test-align auto chose {expected}" in said
        assert f"--test-align auto chose **{expected}**: {choice['reason']}" in read_model_card(run)
        assert auto["test"]["test_align"] == "auto" and auto["config"]["protocol"]["test_align"] == "auto"
        fixed = read_metrics(fit_head(train, FakeEntry(tmp_path / f"{name}-{expected}"), "logreg", "gap",
                                      Protocol(cv=3, test_align=expected), "toy", test=HeldOut(test)))
        # the test score is the chosen alignment's, and the unaligned one is kept beside it
        assert auto["test"]["balanced_accuracy"] == pytest.approx(fixed["test"]["balanced_accuracy"])
        assert auto["test"]["unaligned"]["balanced_accuracy"] == pytest.approx(
            (fixed["test"].get("unaligned") or fixed["test"])["balanced_accuracy"])
        assert auto["test"]["shift"]["prevalence_from"] == expected


def test_compare_and_the_report_say_what_auto_chose():
    from featcache.reporting.compare import alignment_note

    assert alignment_note({"test_align": "auto", "test_align_choice": {"chosen": "moments", "reason": "r"}}) == \
        "auto: moments"
    assert alignment_note({"test_align": "moments"}) == "moments"
    assert alignment_note({"balanced_accuracy": 0.5}) == "" and alignment_note(None) == ""


# --- --conformal-shift weighted ----------------------------------------------------------------------------------

def test_weighted_quantiles_with_equal_weights_are_the_conformal_quantile():
    from featcache.evaluation.conformal import quantile, weighted_quantiles

    rng = np.random.default_rng(0)
    for n in (1, 9, 10, 99, 100, 101):
        scores = rng.random(n)
        for level in (0.5, 0.8, 0.9, 0.95):
            found = weighted_quantiles(scores, np.ones(n), np.ones(3), level)
            assert np.all(found == quantile(scores, level)), (n, level)


def test_shift_weighted_sets_keep_the_coverage_on_a_clinic_with_harder_images():
    from featcache.evaluation.conformal import domain_weights, prediction_sets, summary, thresholds, weighted_limits

    def images(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features whose first dimension sets how hard an image is: the higher, the flatter its probabilities."""
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(n, 6))
        X[:, 0] += shift
        y = rng.integers(0, 3, n)
        sharpness = 3.0 / (1.0 + np.exp(1.5 * X[:, 0]))
        logits = rng.normal(size=(n, 3)) + np.eye(3)[y] * sharpness[:, None] * 2
        return X.astype(np.float32), y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    cal_X, cal_y, cal_p = images(4000, 0.0, 0)
    test_X, test_y, test_p = images(2000, 1.5, 1)
    plain = summary(prediction_sets(test_p, thresholds(cal_p, cal_y, 0.9, "marginal", 3)), test_y)
    weights = domain_weights(cal_X, test_X)
    weighted = summary(prediction_sets(test_p, weighted_limits(cal_p, cal_y, weights, 0.9, "marginal")), test_y)
    assert plain["coverage"] < 0.86  # one threshold, set where images are easier, under-covers the harder clinic
    assert 0.87 <= weighted["coverage"] <= 0.94, weighted
    assert weights.auroc > 0.8 and 50 < weights.effective_calibration_images < 4000
    by_class = summary(prediction_sets(test_p, weighted_limits(cal_p, cal_y, weights, 0.9, "class")), test_y)
    assert by_class["coverage"] >= 0.87
    # the same images on both sides: weights of about one, and the plain sets again
    same = domain_weights(cal_X, cal_X[:1000])
    assert same.auroc < 0.6 and same.effective_calibration_images > 3000


def test_fit_weighs_the_test_set_s_sets_and_records_what_recomputes_them(tmp_path, capfd):
    from featcache.evaluation.conformal import domain_weights, prediction_sets, weighted_limits
    from featcache.evaluation.shift import align

    train, test = _clinic(600, 0), _clinic(300, 1, scale=2.0, offset=3.0, ids="b")
    protocol = Protocol(cv=5, conformal=0.9, test_align="moments", conformal_shift="weighted")
    run = fit_head(train, FakeEntry(tmp_path), "logreg", "gap", protocol, "toy", test=HeldOut(test))
    metrics = read_metrics(run)
    held = metrics["test"]["conformal"]
    assert held["weights"]["calibration_images"] == 600 and held["weights"]["test_images"] == 300
    assert 0.8 <= held["coverage"] <= 1.0 and "coverage" in held["unweighted"]
    assert metrics["config"]["protocol"]["conformal_shift"] == "weighted"
    assert metrics["conformal"]["shift"] == "weighted"
    assert "conformal_shift" not in Protocol(conformal=0.9).config()  # runs made before it keep their names
    # every set written is recomputable from the files: out-of-fold scores, features, the recorded recipe
    oof, written = read_predictions(run), read_predictions(run, "test")
    order = [oof.ids.index(i) for i in train.ids]
    by_id, test_by_id = np.argsort(train.ids), np.argsort(test.ids)  # the domain classifier sees the ids in order
    found = domain_weights(train.X[by_id], align(test.X, train.X, "moments")[test_by_id])
    weights = type(found)(found.calibration[np.argsort(by_id)], found.test[np.argsort(test_by_id)], found.auroc)
    assert weights.effective_calibration_images == pytest.approx(held["weights"]["effective_calibration_images"])
    limits = weighted_limits(oof.proba[order], np.searchsorted(train.classes, train.y), weights, 0.9, "marginal")
    sets = prediction_sets(written.proba, limits)
    assert written.sets == ["|".join(c for c, k in zip(train.classes, row, strict=True) if k) for row in sets]
    # a test set that resembles few training images is said
    far = _clinic(300, 2, scale=1.0, offset=40.0, ids="c")
    fit_head(train, FakeEntry(tmp_path), "logreg", "gap", replace_align(protocol, "none"), "toy", test=HeldOut(far),
             reporter=Reporter())
    assert "--conformal-shift weighted: the test images resemble few training images" in capfd.readouterr().err


def replace_align(protocol: Protocol, method: str) -> Protocol:
    from dataclasses import replace

    return replace(protocol, test_align=method)


def test_fit_and_predict_weigh_sets_for_another_clinic_or_refuse_what_cannot_be_weighed(tmp_path, capfd):
    import featcache as fc
    from featcache.errors import FeatcacheError

    from .conftest import DEMO

    rows = {"train": ["bild,befund"], "clinic_b": ["bild,befund"]}
    for label in ("melanoma", "nevus"):
        for k, src in enumerate(sorted((DEMO / "images" / label).glob("*.jpg"))[:50]):
            rows["train" if k < 30 else "clinic_b"].append(f"{src},{label}")
    for name, lines in rows.items():
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "c"
    common = {"image_col": "bild", "label_col": "befund", "heads": ["logreg"], "cv": 3, "cache": cache,
              "no_groups": True, "quiet": True}
    fc.extract(tmp_path / "train.csv", image_col="bild", cache=cache, quiet=True)
    for wrong, said in (({"conformal_shift": "weighted", "test_data": tmp_path / "clinic_b.csv"}, "their coverage"),
                        ({"conformal": 0.8, "conformal_shift": "weighted"}, "no test_data is given"),
                        ({"conformal": 0.8, "conformal_shift": "weighted", "conformal_by": "befund",
                          "test_data": tmp_path / "clinic_b.csv"}, "give one"),
                        ({"conformal": 0.8, "conformal_shift": "weigthed"}, "weigthed")):
        with pytest.raises(FeatcacheError, match=said):
            fc.fit(tmp_path / "train.csv", **common, **wrong)
    run = fc.fit(tmp_path / "train.csv", **common, conformal=0.8, conformal_shift="weighted",
                 test_data=tmp_path / "clinic_b.csv")[0]
    assert run.metrics["test"]["conformal"]["weights"]["test_images"] == 40
    assert "shift-weighted" in fc.compare(cache=cache).rows[0].held_out
    frame = run.predict([str(tmp_path / "clinic_b.csv")], image_col="bild", cache=cache)
    record = frame.attrs["conformal_weights"]
    assert record["method"] == "weighted" and record["test_images"] == 40
    test = read_predictions(run.path, "test")  # the batch is the test set: the same weights, the same sets
    assert [frame.loc[i, "set_80"] for i in test.ids] == test.sets
    capfd.readouterr()
    few = run.predict(sorted((DEMO / "images" / "nevus").glob("*.jpg"))[40:50], cache=cache, quiet=False)
    assert "too few to weigh them" in capfd.readouterr().err and few.attrs["conformal_weights"]["method"] == "none"
    limit = run.metrics["conformal"]["thresholds"][0]
    assert all(set(filter(None, row["set_80"].split("|"))) == {c for c in ("melanoma", "nevus")
                                                              if 1 - row[f"p_{c}"] <= limit}
               for _, row in few.iterrows())
