"""Issue 7's building blocks: cached views, resize policies, layer poolings, metadata, ensembles."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from featcache.backbones.models import load_backbone
from featcache.data.images import VIEWS, Preprocess, apply_view
from featcache.data.sources import ImageRecord, open_source
from featcache.evaluation.features import LabeledFeatures, encode_meta
from featcache.evaluation.head_registry import make_pipeline
from featcache.evaluation.heads import SVMHead, ViewEnsemble, _validation_split
from featcache.evaluation.metrics import compute_metrics
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.evaluation.splits import random_712_split
from featcache.extraction.extract import extract
from featcache.recipes import FeatureRecipe
from featcache.reporting.compare import collect_runs, ensemble_rows

from .fakes import FakeEntry


def test_the_eight_views_are_distinct_pixel_permutations():
    x = torch.randn(2, 3, 6, 6)
    outs = [apply_view(x, v) for v in VIEWS]
    for out in outs:
        assert out.shape == x.shape
        assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.equal(outs[i], outs[j]), (VIEWS[i], VIEWS[j])
    assert torch.equal(apply_view(apply_view(x, "rot90"), "rot270"), x)


@pytest.mark.slow
def test_views_are_an_axis_of_the_store_and_view_0_is_the_plain_extraction(small_folder, tmp_path):
    source = open_source(small_folder)
    backbone = load_backbone("efficientnet_lite0", weights="random")
    single = extract(source, backbone, cache_root=tmp_path / "cache")
    four = extract(source, backbone, cache_root=tmp_path / "cache", recipe=FeatureRecipe(views=4))
    assert single.entry.fingerprint != four.entry.fingerprint
    plain, views = single.entry.read("gap"), four.entry.read("gap")
    assert plain.shape == (12, 1280) and views.shape == (12, 4, 1280)
    np.testing.assert_array_equal(views[:, 0], plain)
    assert np.abs(views[:, 1] - views[:, 0]).mean() > 1e-3  # a mirror is another input
    assert four.entry.views == 4 and four.entry.manifest["views"] == list(VIEWS[:4])
    assert extract(source, backbone, cache_root=tmp_path / "cache",
                   recipe=FeatureRecipe(views=4)).extracted == 0  # resumable as ever
    with pytest.raises(Exception, match="--views 3"):
        extract(source, backbone, cache_root=tmp_path / "cache", recipe=FeatureRecipe(views=3))


def test_resize_policies_keep_the_whole_image(photo):
    wide = photo.resize((200, 100))
    base = Preprocess(224, 256, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert "resize_mode" not in base.to_dict()  # the default keeps the fingerprints of older entries
    full = Preprocess(**{**base.to_dict(), "resize_mode": "full"}).to_uint8(wide)
    pad = Preprocess(**{**base.to_dict(), "resize_mode": "pad"}).to_uint8(wide)
    crop = base.to_uint8(wide)
    assert full.shape == pad.shape == crop.shape == (3, 224, 224)
    assert pad[:, :40].max() == 0 and pad[:, -40:].max() == 0  # black bands above and below
    assert pad[:, 100:120].float().mean() > 20 and full[:, :40].float().mean() > 20
    with pytest.raises(ValueError, match="--resize"):
        Preprocess(**{**base.to_dict(), "resize_mode": "stretch"})


@pytest.mark.parametrize("name", ["efficientnet_lite0", "squeezenet1_1", "resnet18"])
def test_layer_poolings(name):
    backbone = load_backbone(name, weights="random", pools=("gap", "penult", "multi"))
    plain = load_backbone(name, weights="random")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out, ref = backbone.model(x), plain.model(x)
    torch.testing.assert_close(out["gap"], ref["gap"])
    gap, penult = out["gap"].shape[1], out["penult"].shape[1]
    torch.testing.assert_close(out["multi"][:, -gap:], out["gap"])  # multi = earlier stages ‖ gap
    torch.testing.assert_close(out["multi"][:, -gap - penult:-gap], out["penult"])
    assert backbone.dims == backbone.spec.dims


def test_views_of_one_image_stay_on_one_side_of_the_inner_splits():
    y = np.repeat(np.arange(40) % 2, 4)
    groups = np.repeat(np.arange(40), 4)
    train, val = _validation_split(y, groups, 0.25, seed=0, stratified=True)
    assert not set(groups[train]) & set(groups[val]) and len(val) == 40
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 5)) + y[:, None]
    svm = SVMHead("linear").fit(X, y, groups=groups)
    assert svm.predict_proba(X).shape == (160, 2)


def test_view_ensemble_trains_on_every_view_and_averages_them():
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * 30)
    X = rng.normal(size=(60, 3, 4))
    X[:, :, 0] += (y == "b")[:, None] * 3
    model = ViewEnsemble(make_pipeline("mlp"), "all", "all").fit(X, y)
    inner = model.estimator_
    expected = np.mean([inner.predict_proba(X[:, v]) for v in range(3)], axis=0)
    np.testing.assert_allclose(model.predict_proba(X), expected)
    first = ViewEnsemble(make_pipeline("logreg"), "first", "first").fit(X, y)
    np.testing.assert_allclose(first.predict_proba(X), first.estimator_.predict_proba(X[:, 0]))


@pytest.mark.slow
def test_a_multi_view_run_scores_images_not_views(tmp_path):
    rng = np.random.default_rng(1)
    y = np.array(["a", "b", "c"])[np.arange(90) % 3]
    X = rng.normal(size=(90, 4, 6)).astype(np.float32)
    X[:, :, 0] += (np.arange(90) % 3)[:, None] * 2
    data = LabeledFeatures(X, y, None, None, [f"i{k}" for k in range(90)], ["a", "b", "c"])
    run = fit_head(data, FakeEntry(tmp_path), "logreg", "gap", Protocol(cv=3), "views")
    lines = (run / "oof_predictions.csv").read_text().splitlines()
    assert len(lines) == 91  # one prediction per image, not per view


def test_metadata_is_coded_imputed_and_used():
    records = [ImageRecord(f"i{k}", None, meta={"age": "" if k % 10 == 0 else str(20 + k % 50),
                                                "site": ["back", "face", "hand"][k % 3]}) for k in range(90)]
    meta, spec = encode_meta(records, ["site", "age"])
    assert [c["name"] for c in spec] == ["age", "site"]  # numeric first
    assert np.isnan(meta[0, 0]) and meta[1, 0] == 21 and spec[1]["categories"] == ["back", "face", "hand"]
    unseen = [ImageRecord("x", None, meta={"age": "40", "site": "scalp"})]
    assert np.isnan(encode_meta(unseen, ["age", "site"], spec)[0][0, 1])  # unknown category -> missing
    with pytest.raises(Exception, match="no column 'sex'"):
        encode_meta(records, ["sex"], source_name="here.csv")
    # a column found as --label-col finds one: any case, past a spreadsheet's stray spaces
    spaced = [ImageRecord(r.id, None, meta={"Age ": r.meta["age"], "SITE": r.meta["site"]}) for r in records]
    np.testing.assert_array_equal(encode_meta(spaced, ["site", "age"])[0], meta)


@pytest.mark.slow
def test_metadata_features_carry_signal_the_image_features_lack(tmp_path):
    rng = np.random.default_rng(0)
    n = 150
    site = np.array(["back", "face", "hand"])[rng.integers(0, 3, n)]
    y = np.where(site == "face", "mel", "nv")  # the label lives only in the metadata
    records = [ImageRecord(f"i{k}", None, meta={"site": site[k], "age": str(rng.integers(20, 80))})
               for k in range(n)]
    meta, spec = encode_meta(records, ["site", "age"])
    X = rng.normal(size=(n, 8)).astype(np.float32)
    scores = {}
    for use_meta in (False, True):
        data = LabeledFeatures(X, y, None, None, [r.id for r in records], ["mel", "nv"],
                               meta=meta if use_meta else None, meta_spec=spec if use_meta else [])
        run = fit_head(data, FakeEntry(tmp_path / str(use_meta)), "logreg", "gap",
                       Protocol(cv=3, meta="site,age" if use_meta else ""), "meta")
        import json

        scores[use_meta] = json.loads((run / "metrics.json").read_text())["pooled"]["balanced_accuracy"]
    assert scores[True] > 0.95 and scores[False] < 0.7


def test_random_712_split_is_image_level_and_stratified():
    y = np.array(["a"] * 700 + ["b"] * 300)
    [(train, test)], counts = random_712_split(y, seed=0)
    assert len(train) == 700 and len(test) == 200 and not set(train) & set(test)
    assert counts == {"train": 700, "val": 100, "test": 200}
    assert (y[test] == "b").mean() == pytest.approx(0.3, abs=0.01)


def test_ensemble_averages_the_out_of_fold_probabilities(tmp_path):
    rng = np.random.default_rng(2)
    y = np.array(["a", "b", "c"])[np.arange(120) % 3]
    X = rng.normal(size=(120, 6)) + (np.arange(120) % 3)[:, None] * 0.8
    data = LabeledFeatures(X, y, None, None, [f"i{k}" for k in range(120)], ["a", "b", "c"])
    cache = tmp_path / "cache"
    entry_dir = cache / "toy" / "bb-0"
    entry_dir.mkdir(parents=True)
    runs = [fit_head(data, FakeEntry(entry_dir), head, "gap", Protocol(cv=3), "toy") for head in ("logreg", "knn")]
    rows = collect_runs(cache)
    [row] = ensemble_rows(rows, "top2")
    probas = []
    for run in runs:
        with open(run / "oof_predictions.csv", newline="") as handle:
            lines = list(csv.DictReader(handle))
        probas.append(np.array([[float(line[f"p_{c}"]) for c in "abc"] for line in lines]))
        labels = np.array([line["label"] for line in lines])
    expected = compute_metrics(labels, np.mean(probas, axis=0), ["a", "b", "c"])
    assert row.metrics["balanced_accuracy"]["pooled"] == pytest.approx(expected["balanced_accuracy"])
    assert row.backbone == "ensemble" and "logreg" in row.head and "knn" in row.head
    with pytest.raises(ValueError, match="topN"):
        ensemble_rows(rows, "best")


@pytest.mark.slow
def test_cli_views_resize_ensemble_and_predict_with_views(small_folder, tmp_path):
    from typer.testing import CliRunner

    from featcache.cli import app

    runner = CliRunner()
    cache = str(tmp_path / "cache")
    extract_args = ["extract", "--data", str(small_folder), "--cache", cache, "--views", "2",
                    "--resize", "pad", "--weights", "random", "-q"]
    out = runner.invoke(app, extract_args)
    assert out.exit_code == 0, out.output
    fit = ["fit", "--data", str(small_folder), "--cache", cache, "--views", "2", "--resize", "pad",
           "--head", "logreg,knn", "--cv", "3", "-q"]
    out = runner.invoke(app, fit)
    assert out.exit_code == 0, out.output
    assert not (tmp_path / "cache" / "compare.md").exists()  # fit writes no cache-wide comparison
    assert runner.invoke(app, ["compare", "--cache", cache, "-q"]).exit_code == 0
    assert "2 views + TTA" in (tmp_path / "cache" / "compare.md").read_text()
    out = runner.invoke(app, ["fit", "--data", str(small_folder), "--cache", cache, "--views", "2", "--resize", "pad",
                              "--head", "logreg", "--cv", "3", "--calibrate", "temperature", "-q"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["compare", "--cache", cache, "--ensemble", "top2"])
    assert out.exit_code == 0, out.output
    table = (tmp_path / "cache" / "compare.md").read_text()
    assert "ensemble" in table and "resize pad" in table and "temperature calibration" in table
    out = runner.invoke(app, ["fit", "--data", str(small_folder), "--cache", cache, "--views", "8", "-q"])
    assert out.exit_code != 0 and "--views 8" in out.output + str(out.exception)  # says what to extract
    runs = sorted((tmp_path / "cache").glob("*/*/runs/logreg-*"))
    assert len(runs) == 2  # plain and temperature-calibrated
    for run in runs:
        preds = tmp_path / f"p-{run.name}.csv"  # predict refuses to write over an earlier file
        out = runner.invoke(app, ["predict", "--run", str(run), str(small_folder / "nevus"), "--out", str(preds),
                                  "--cache", cache, "--weights", "random", "-q"])
        assert out.exit_code == 0, out.output
        assert len(preds.read_text().splitlines()) == 7


@pytest.mark.slow
def test_vit_poolings_are_the_tokens_they_name():
    """cls / mean / cls+mean / last4 against a hand-run of the blocks (random weights: values, not accuracy)."""
    backbone = load_backbone("dinov2_vits14", weights="random", pools=("cls", "mean", "cls+mean", "last4"))
    net = backbone.model.net
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = backbone.model(x)
        tokens = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))
        normed = []
        for block in net.blocks:
            tokens = block(tokens)
            normed.append(net.norm(tokens))
    prefix = net.num_prefix_tokens
    torch.testing.assert_close(out["cls"], normed[-1][:, 0])
    torch.testing.assert_close(out["mean"], normed[-1][:, prefix:].mean(dim=1))  # patches only
    torch.testing.assert_close(out["cls+mean"], torch.cat([out["cls"], out["mean"]], dim=1))
    torch.testing.assert_close(out["last4"], torch.cat([t[:, 0] for t in normed[-4:]], dim=1))
    assert out["last4"].shape == (2, 4 * 384) and backbone.dims["last4"] == 4 * 384
