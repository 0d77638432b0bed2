"""Issue 34: evidence a person can check — similar cases from the cache, and a model card."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

import featcache as fc
from featcache.evaluation.neighbours import nearest, run_space
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import HeldOut, fit_head
from featcache.recipes import FitPlan
from featcache.store.model_files import load_model
from featcache.store.runs import read_metrics, read_neighbours

from .conftest import DEMO
from .fakes import FakeEntry
from .test_seen import _clinic


def test_nearest_is_the_exact_cosine_search():
    rng = np.random.default_rng(0)
    train, query = rng.normal(size=(500, 16)), rng.normal(size=(30, 16))
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    index, similarity = nearest(train.astype(np.float32), query.astype(np.float32), 5)
    brute = query @ train.T
    np.testing.assert_array_equal(index, np.argsort(-brute, axis=1)[:, :5])
    np.testing.assert_allclose(similarity, np.sort(brute, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    assert nearest(train[:3].astype(np.float32), query.astype(np.float32), 5)[0].shape == (30, 3)


def test_fit_writes_each_test_image_s_similar_training_cases_in_the_run_s_space(tmp_path):
    data, test = _clinic(120, 0), _clinic(40, 1, ids="b")
    data.groups = np.array([f"p{k // 2}" for k in range(120)])
    run = fit_head(data, FakeEntry(tmp_path / "cache" / "a" / "test-ffffffffffffffff"), "logreg", "gap",
                   Protocol(cv=3, pca=4), "a", test=HeldOut(test, "b"), plan=FitPlan(jobs=1))
    rows = read_neighbours(run)
    assert len(rows) == 40 * 5 and [int(r["rank"]) for r in rows[:5]] == [1, 2, 3, 4, 5]
    # recomputable: cosine after the run's own scaler and PCA
    pipeline = load_model(run)["pipeline"]
    prefix = pipeline[:-1]
    Z = prefix.transform(data.X.astype(np.float64))
    q = prefix.transform(test.X[:1].astype(np.float64))[0]
    cosine = Z @ q / np.linalg.norm(Z, axis=1) / np.linalg.norm(q)
    first = [r for r in rows if r["id"] == "b0"]
    assert [r["neighbour"] for r in first] == [data.ids[i] for i in np.argsort(-cosine)[:5]]
    assert float(first[0]["similarity"]) == pytest.approx(cosine.max(), abs=1e-5)
    by_id = dict(zip(data.ids, zip(data.y, data.groups, strict=True), strict=True))
    assert all((r["label"], r["group"]) == by_id[r["neighbour"]] for r in rows)
    predicted = dict(zip(test.ids, np.array(pipeline.classes_)[pipeline.predict_proba(test.X).argmax(1)], strict=True))
    assert all((r["agrees"] == "True") == (r["label"] == predicted[r["id"]]) for r in rows)
    summary = read_metrics(run)["test"]["neighbours"]
    assert summary["k"] == 5 and "PCA" in summary["space"]
    assert summary["mean_agreement"] == pytest.approx(np.mean([r["agrees"] == "True" for r in rows]))


def test_run_space_averages_views_and_leaves_metadata_out_on_purpose():
    from sklearn.preprocessing import StandardScaler

    from featcache.evaluation.head_registry import make_pipeline
    from featcache.evaluation.heads import ViewEnsemble

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 2, 6)), np.array(["a", "b"] * 30)
    model = ViewEnsemble(make_pipeline("logreg"), "all", "all").fit(X, y)
    scaler = model.estimator_.named_steps["scale"]
    expected = np.mean([scaler.transform(X[:, v]) for v in range(2)], axis=0)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(run_space(model).transform(X), expected, rtol=1e-5)
    meta = make_pipeline("logreg", image_dim=6, meta_numeric=1).fit(np.c_[X[:, 0], rng.normal(size=60)], y)
    space = run_space(meta, meta=True)
    assert "--meta columns" in space.description
    image = StandardScaler().fit(X[:, 0]).transform(X[:, 0])
    np.testing.assert_allclose(space.transform(X[:, 0]), image / np.linalg.norm(image, axis=1, keepdims=True),
                               rtol=1e-5)


@pytest.mark.slow
def test_predict_gives_similar_cases_from_the_api_and_the_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from featcache.cli import app

    folder = tmp_path / "imgs"
    for label in ("melanoma", "nevus"):
        (folder / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[:12]:
            shutil.copy(src, folder / label / src.name)
    fc.extract(folder, cache=tmp_path / "cache", quiet=True)
    run = fc.fit(folder, heads=["logreg"], cv=3, cache=tmp_path / "cache", quiet=True, no_groups=True)[0]
    new = sorted((DEMO / "images" / "nevus").glob("*.jpg"))[20:23]
    frame = run.predict([str(p) for p in new], neighbours=3)
    cases = frame.attrs["neighbours"]
    assert len(cases) == 9 and list(cases["rank"][:3]) == [1, 2, 3]
    assert set(cases["label"]) <= {"melanoma", "nevus"}
    assert all(group["similarity"].is_monotonic_decreasing for _, group in cases.groupby("id"))
    share = cases.groupby("id")["agrees"].mean()
    assert np.allclose(frame.loc[share.index, "neighbours_agree"], share)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["predict", "--run", str(run.path), str(new[0])])
    assert out.exit_code == 0 and "predictions-neighbours.csv" in out.output, out.output
    with open(tmp_path / "predictions-neighbours.csv", newline="") as handle:
        assert [int(r["rank"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4, 5]
    # the run's model card goes with its export: beside the file and in its metadata, the same text
    import onnx

    out = CliRunner().invoke(app, ["export", str(run.path), "--out", str(tmp_path / "m.onnx")])
    assert out.exit_code == 0 and "m-MODEL_CARD.md" in out.output, out.output
    card = (run.path / "MODEL_CARD.md").read_text()
    assert (tmp_path / "m-MODEL_CARD.md").read_text() == card
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).metadata_props}
    assert props["featcache.model_card"] == card


def test_every_run_has_a_model_card_whose_numbers_are_its_metrics(tmp_path):
    data, test = _clinic(120, 0), _clinic(60, 1, scale=2.0, ids="b")
    data.groups = np.array([f"p{k // 2}" for k in range(120)])
    run = fit_head(data, FakeEntry(tmp_path / "cache" / "a" / "test-ffffffffffffffff"), "logreg", "gap",
                   Protocol(cv=3, conformal=0.9), "a", test=HeldOut(test, "clinic_b"), plan=FitPlan(jobs=1))
    card, metrics = (run / "MODEL_CARD.md").read_text(), read_metrics(run)
    assert card.startswith("---\nlibrary_name: \"featcache\"") and "## Intended use" in card
    pooled, tested = metrics["pooled"], metrics["test"]
    ci = pooled["ci95"]["balanced_accuracy"]
    assert f"| balanced_accuracy | {pooled['balanced_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |" in card
    assert "### External test set: clinic_b (60 images)" in card
    assert f"| auroc | {tested['auroc']:.3f}" in card and "### Shift audit" in card
    assert "120 labelled images in 60 groups" in card and "mel 60, nv 60" in card
    assert f"coverage {metrics['conformal']['coverage']:.3f}" in card
    assert "Not assessed across skin types" in card and "## Known limitations" in card


def _source(data, name: str, meta: dict[str, list[str]]):
    from pathlib import Path

    from featcache.data.sources import ImageRecord, ImageSource

    records = [ImageRecord(i, Path(f"/nowhere/{i}.jpg"), str(y), meta={k: v[n] for k, v in meta.items()})
               for n, (i, y) in enumerate(zip(data.ids, data.y, strict=True))]
    return ImageSource(name=name, location=Path(f"/nowhere/{name}.csv"), kind="csv", records=records)


def test_subgroups_are_scored_like_the_run_and_the_worst_one_is_flagged(tmp_path):
    from featcache.data.sources import in_reading_order
    from featcache.evaluation.metrics import score_with_ci
    from featcache.evaluation.subgroups import add_subgroups
    from featcache.progress import Reporter
    from featcache.reporting.compare import select_rows, table_rows
    from featcache.store.runs import read_predictions

    data, test = _clinic(240, 0), _clinic(80, 1, ids="b")
    site = np.array(["head", "trunk", "leg"] * 80)
    data.X[site == "leg"] = np.random.default_rng(5).normal(size=(80, 8))  # the model cannot see legs' lesions
    ages = [str(5 + (k * 7) % 90) for k in range(240)]
    source = _source(data, "a", {"site": site.tolist(), "Age": ages})
    tested = _source(test, "b", {"site": ["head", "leg"] * 40, "Age": [str(30 + k % 40) for k in range(80)]})
    run = fit_head(data, FakeEntry(tmp_path / "cache" / "a" / "test-ffffffffffffffff"), "logreg", "gap", Protocol(cv=3),
                   "a", test=HeldOut(test, "b"), plan=FitPlan(jobs=1))
    said = []
    reporter = Reporter(quiet=True)
    reporter.warn = said.append
    add_subgroups(run, source, tested, ("SITE", "age"), reporter)
    metrics = read_metrics(run)
    groups = metrics["subgroups"]
    assert set(groups) == {"site", "Age"} and set(groups["site"]) == {"head", "leg", "trunk"}
    oof = read_predictions(run)
    legs = np.isin(oof.ids, [i for i, s in zip(data.ids, site, strict=True) if s == "leg"])
    expected = score_with_ci(oof.labels[legs], oof.proba[legs], oof.classes)
    leg = groups["site"]["leg"]
    assert leg["n"] == 80 and leg["balanced_accuracy"]["pooled"] == expected["balanced_accuracy"]
    assert leg["balanced_accuracy"]["ci"] == expected["ci95"]["balanced_accuracy"]
    assert leg["sensitivity"] == {c: v["recall"] for c, v in expected["per_class"].items()}
    assert leg["worst"] and leg["below_overall"] and any("site = leg" in w for w in said)
    bands = metrics["subgroup_bands"]["Age"]
    assert len(bands) == 5 and all(v.startswith("[") for v in groups["Age"])
    lows = [float(v[1:].split(",")[0]) for v, _ in in_reading_order(groups["Age"])]
    assert lows == sorted(lows)  # bands in the order of their ages, not of their spelling ([26.75, …) before [5, …))
    assert sum(e["n"] for e in groups["Age"].values()) == 240
    assert set(metrics["test"]["subgroups"]["site"]) == {"head", "leg"}
    header, body = table_rows(select_rows(tmp_path / "cache", "balanced_accuracy"), "balanced_accuracy")
    assert body[0][header.index("worst group (balanced_accuracy [95% CI])")].startswith("site=leg (80): ")
    card = (run / "MODEL_CARD.md").read_text()
    assert "### site" in card and f"| leg | 80 | {leg['balanced_accuracy']['pooled']:.3f}" in card
    assert card.index("| [5, ") < card.index("| [26.75, ")  # the card lists age bands in the order of their ages
    with pytest.raises(Exception, match="no column 'skin'"):
        add_subgroups(run, source, None, ("skin",), reporter)


@pytest.mark.slow
def test_fit_subgroups_from_python_on_ham_metadata_and_the_report_shows_them(tmp_path):
    from .conftest import shared

    csv_path = shared("ham70") / "HAM10000_metadata.csv"
    fc.extract(csv_path, images=shared("ham70"), cache=tmp_path / "c", quiet=True)
    run = fc.fit(csv_path, images=shared("ham70"), heads=["logreg"], cv=3, cache=tmp_path / "c", quiet=True,
                 subgroups=["sex", "age"])[0]
    sex = run.metrics["subgroups"]["sex"]
    assert set(sex) >= {"male", "female"} and isinstance(sex["male"]["n"], int)
    assert 0 <= sex["male"]["balanced_accuracy"]["pooled"] <= 1 and len(sex["male"]["balanced_accuracy"]["ci"]) == 2
    page = fc.report(cache=tmp_path / "c", out=tmp_path / "r.html").read_text()
    assert "By subgroup (out of fold)" in page and 'alt="subgroups sex"' in page
    with pytest.raises(Exception, match="no column 'sexx'"):
        fc.fit(csv_path, images=shared("ham70"), heads=["logreg"], cache=tmp_path / "c", subgroups=["sexx"])


def test_the_class_activation_map_averages_to_the_head_s_decision(lite0, photo):
    import torch

    from featcache.evaluation.explain import cam, class_probability, method_for, to_photo
    from featcache.evaluation.head_registry import make_pipeline

    x = lite0.preprocess.normalize(lite0.preprocess.to_uint8(photo)[None])
    with torch.inference_mode():
        gap = lite0.model(x)["gap"].double().numpy()
        fmap = lite0.model.feature_map(x)
    np.testing.assert_allclose(fmap.mean(dim=(2, 3)).double().numpy(), gap, rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(0)
    X = gap + rng.normal(scale=0.5, size=(90, gap.shape[1]))
    for head, classes in [(h, c) for h in ("logreg", "svm-linear") for c in (["mel", "nv"], ["bcc", "mel", "nv"])]:
        pipeline = make_pipeline(head).fit(X, np.array(classes * (90 // len(classes))))
        saved = {"pipeline": pipeline, "pool": "gap"}
        assert method_for(saved) == "cam"
        if head == "logreg":
            decision, tolerance = pipeline.decision_function(gap)[0], 1e-6
        else:  # the linear SVM decides by the mean of its calibration folds' linear SVMs (fit in float32)
            scaled = pipeline[:-1].transform(gap).astype(np.float32)
            members = pipeline[-1].model_.calibrated_classifiers_
            decision, tolerance = np.mean([m.estimator.decision_function(scaled)[0] for m in members], axis=0), 1e-4
        for k, name in enumerate(classes):
            heat, value = cam(lite0, x, saved, name)
            expected = (decision if k == 1 else -decision) if len(classes) == 2 else decision[k]
            assert heat.mean() == pytest.approx(expected, abs=tolerance)
            assert value == pytest.approx(expected, abs=tolerance)
        assert class_probability(lite0, saved, x, classes[0])[0] == pytest.approx(pipeline.predict_proba(gap)[0, 0])
    assert method_for({"pipeline": make_pipeline("knn").fit(X, np.array(["a", "b"] * 45)), "pool": "gap"}) == \
        "occlusion"
    # on the photo: its own height x width, NaN outside the centre crop the backbone saw
    width, height = photo.size
    placed = to_photo(heat, lite0.preprocess, width, height)
    assert placed.shape == (height, width) and np.isnan(placed).any() and not np.isnan(placed).all()
    assert not np.isnan(placed[height // 2, width // 2])


@pytest.mark.slow
def test_explain_maps_evidence_and_names_similar_cases_from_the_api_and_the_cli(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from featcache.cli import app

    folder = tmp_path / "imgs"
    for label in ("melanoma", "nevus"):
        (folder / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[:12]:
            shutil.copy(src, folder / label / src.name)
    fc.extract(folder, cache=tmp_path / "cache", quiet=True)
    logreg, knn = fc.fit(folder, heads=["logreg", "knn"], cv=3, cache=tmp_path / "cache", quiet=True, no_groups=True)
    new = [str(p) for p in sorted((DEMO / "images" / "melanoma").glob("*.jpg"))[30:32]]
    ex = logreg.explain(new, k=4)
    predicted = logreg.predict(new, neighbours=0)
    assert [e.predicted for e in ex] == list(predicted.loc[new, "predicted"])
    with Image.open(new[0]) as photo:
        assert ex[0].heatmap.shape == (photo.height, photo.width) and ex[0].method == "cam"
    assert list(ex[0].neighbours.columns[:4]) == ["id", "label", "group", "similarity"] and len(ex[0].neighbours) == 4
    assert ex[0].neighbours["similarity"].is_monotonic_decreasing
    other = next(c for c in logreg.classes if c != ex[0].predicted)
    flipped = logreg.explain(new[:1], k=0, cls=other)[0]
    assert flipped.cls == other and np.allclose(flipped.heatmap, -ex[0].heatmap, equal_nan=True)  # two classes
    occluded = knn.explain(new[:1], k=1)[0]
    assert occluded.method == "occlusion" and np.nanmax(occluded.heatmap) > 0
    out = CliRunner().invoke(app, ["explain", str(logreg.path), *new, "--out", str(tmp_path / "ex")])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == sorted(
        [f"{Path(p).stem}-heatmap.png" for p in new] + ["explanations.csv", "neighbours.csv"])
    again = CliRunner().invoke(app, ["explain", str(logreg.path), *new, "--out", str(tmp_path / "ex")])
    assert again.exit_code == 2 and "exists" in again.output


@pytest.mark.slow
def test_the_report_shows_a_gallery_of_errors_with_heatmaps_and_similar_cases_within_its_size(tmp_path, monkeypatch):
    def folder(name: str, start: int, count: int) -> Path:
        root = tmp_path / name
        for label in ("melanoma", "nevus"):
            (root / label).mkdir(parents=True)
            for src in sorted((DEMO / "images" / label).glob("*.jpg"))[start:start + count]:
                shutil.copy(src, root / label / src.name)
        return root

    train, test = folder("train", 0, 15), folder("clinic_b", 40, 16)
    fc.extract(train, cache=tmp_path / "c", quiet=True)
    fc.fit(train, heads=["logreg"], cv=3, cache=tmp_path / "c", quiet=True, no_groups=True, test_data=test)
    page = fc.report(cache=tmp_path / "c", out=tmp_path / "r.html").read_text()
    gallery = page[page.index("<h4>Gallery</h4>"):]
    assert "<h4>Out of fold</h4>" in gallery and "<h4>Test set (clinic_b)</h4>" in gallery
    assert gallery.count("class='case'") >= 8 and "evidence for" in gallery and "(cam)" in gallery
    assert len(page.encode()) <= 5_000_000
    # the page renders the evidence the report workflow wrote into the run's folder: no backbone is loaded again
    import featcache.extraction.extract as extraction

    monkeypatch.setattr(extraction, "backbone_of", lambda *a, **k: pytest.fail("the report loaded a backbone"))
    (evaluation,) = (tmp_path / "c").glob("train/*/runs/logreg-*/heldout/*/")
    assert (evaluation / "gallery" / "gallery.json").is_file()
    small = fc.report(cache=tmp_path / "c", out=tmp_path / "small.html", max_mb=0.5).read_text()
    assert "The gallery stops here" in small and len(small.encode()) < len(page.encode())
    none = fc.report(cache=tmp_path / "c", out=tmp_path / "none.html", gallery=0).read_text()
    assert "<h4>Gallery</h4>" not in none
