"""Issue 34: evidence a person can check — similar cases from the cache, and a model card."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

import featcache as fc
from featcache.evaluation.neighbours import nearest, run_space
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
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
                   Protocol(cv=3, pca=4), "a", test=test, jobs=1, test_name="b")
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

    from featcache.evaluation.heads import ViewEnsemble, make_pipeline

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
                   Protocol(cv=3, conformal=0.9), "a", test=test, jobs=1, test_name="clinic_b")
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
