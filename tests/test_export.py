"""Issue 24: one ONNX file from images to probabilities (`featcache export`), `predict --onnx` with ONNX
Runtime only, and docs/deploy.md's stand-alone script."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from featcache.cli import app
from featcache.data.images import VIEWS, apply_view
from featcache.deploy.export import _view_nodes
from featcache.deploy.head_graph import NotExportable, head_graph
from featcache.evaluation.head_registry import make_pipeline
from tests.conftest import REPO, shared


def _run_graph(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("view", VIEWS)
def test_each_view_in_the_graph_moves_the_pixels_as_the_extraction_does(view):
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    graph = helper.make_graph(_view_nodes("x", view, "y"), "view",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)])
    (moved,) = _run_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": images.numpy()})
    np.testing.assert_array_equal(moved, apply_view(images, view).numpy())


def _features(classes: str, n: int = 240, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(classes))
    y = np.array(list(classes))[rng.integers(0, len(classes), n)]
    X = rng.normal(size=(n, dim)).astype(np.float32) * 3 + 1
    X[:, 0] += (y == classes[0]) * 2.0
    return X, y


# (XGBoost after PCA is left out: the projection's float32 sums come in another order in ONNX Runtime, and a
# tree can turn at a split value; export warns about it)
HEADS = [("logreg", {}), ("svm-linear", {}), ("svm-rbf", {}), ("mlp", {}), ("xgboost", {}), ("logreg", {"pca": 6}),
         ("svm-rbf", {"pca": 6}), ("mlp", {"pca": 6})]


@pytest.mark.parametrize(("head", "options"), HEADS, ids=[f"{h}{'-pca' if o else ''}" for h, o in HEADS])
@pytest.mark.parametrize("classes", ["abc", "ab"])
def test_every_exportable_head_gives_its_probabilities_in_onnx(head, options, classes):
    X, y = _features(classes)
    pipeline = make_pipeline(head, **options).fit(X, y)
    (proba,) = _run_graph(head_graph(pipeline, X.shape[1]), {"features": X})
    np.testing.assert_allclose(proba, pipeline.predict_proba(X), atol=2e-6)


def test_metadata_columns_go_through_the_graph_as_through_the_pipeline():
    X, y = _features("abc")
    X[:, 20] = np.where(np.arange(len(X)) % 7 == 0, np.nan, X[:, 20])  # a missing age
    X[:, 21:] = np.where(np.arange(len(X))[:, None] % 5 == 0, np.nan, np.abs(np.round(X[:, 21:])) % 3)  # categories
    pipeline = make_pipeline("mlp", image_dim=20, meta_numeric=1, meta_categorical=3).fit(X, y)
    (proba,) = _run_graph(head_graph(pipeline, X.shape[1]), {"features": X})
    np.testing.assert_allclose(proba, pipeline.predict_proba(X), atol=2e-6)


@pytest.mark.parametrize(("head", "options", "reason"), [
    ("knn", {}, "cosine"), ("majority", {}, "baseline"), ("mlp", {"calibrate": "sigmoid"}, "--calibrate"),
    ("svm-rbf-exact", {}, "svm-rbf-exact")])
def test_a_head_without_an_onnx_form_is_refused_with_its_name_and_why(head, options, reason):
    X, y = _features("ab")
    pipeline = make_pipeline(head, **options).fit(X, y)
    with pytest.raises(NotExportable, match=re.escape(reason)):
        head_graph(pipeline, X.shape[1])


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def _max_difference(a: dict[str, dict], b: dict[str, dict]) -> float:
    assert a.keys() == b.keys()
    columns = [c for c in next(iter(a.values())) if c.startswith("p_")]
    return max(abs(float(a[i][c]) - float(b[i][c])) for i in a for c in columns)


@pytest.fixture(scope="module")
def ham70_onnx_entry(tmp_path_factory):
    """ham70 extracted with the backbone's ONNX export run by ONNX Runtime, and five heads fit on it."""
    data = shared("ham70")
    cache = tmp_path_factory.mktemp("export") / "cache"
    runner = CliRunner()
    out = runner.invoke(app, ["extract", "--data", str(data), "--cache", str(cache), "--engine", "onnxruntime", "-q"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["fit", "--data", str(data), "--cache", str(cache), "--engine", "onnxruntime", "--head",
                              "logreg,svm-rbf,svm-linear,mlp,xgboost", "--cv", "3", "-q"])
    assert out.exit_code == 0, out.output
    return data, cache


@pytest.mark.slow
@pytest.mark.parametrize("head", ["logreg", "svm-rbf", "svm-linear", "mlp", "xgboost"])
def test_predict_onnx_equals_predict_run_on_every_ham70_image(ham70_onnx_entry, head, tmp_path):
    data, cache = ham70_onnx_entry
    (run,) = cache.glob(f"*/*/runs/{head}-gap-*")
    runner = CliRunner()
    model = tmp_path / f"{head}.onnx"
    out = runner.invoke(app, ["export", str(run), "--out", str(model)])
    assert out.exit_code == 0 and model.is_file(), out.output
    out = runner.invoke(app, ["predict", "--run", str(run), str(data), "--out", str(tmp_path / "run.csv"),
                              "--cache", str(cache), "-q"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["predict", "--onnx", str(model), str(data), "--out", str(tmp_path / "onnx.csv"), "-q"])
    assert out.exit_code == 0, out.output
    by_run, by_onnx = _rows(tmp_path / "run.csv"), _rows(tmp_path / "onnx.csv")
    assert len(by_onnx) == 70 and _max_difference(by_run, by_onnx) < 1e-4
    assert all(by_run[i]["predicted"] == by_onnx[i]["predicted"] for i in by_run)
    if head == "logreg":  # the metadata says what a user of the file needs
        import json

        meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        info = json.loads(meta["featcache"])
        assert info["classes"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert info["input_size"] == 224 and info["preprocess"]["interpolation"] == "bicubic"
        assert info["feature_fingerprint"] in str(run) and 0 < info["metrics"]["balanced_accuracy"]["value"] < 1
        assert "lesion" in info["protocol"] or "group" in info["protocol"]
        _stand_alone_script_matches(model, data, by_onnx, tmp_path)


def _stand_alone_script_matches(model: Path, data: Path, by_onnx: dict, tmp_path: Path) -> None:
    """docs/deploy.md's script, run where featcache, torch, scikit-learn and XGBoost cannot be imported,
    gives predict --onnx's probabilities on three images."""
    text = (REPO / "docs" / "deploy.md").read_text()
    script = tmp_path / "predict_onnx.py"
    script.write_text(re.findall(r"```python\n(.*?)```", text, flags=re.S)[-1])
    blocked = tmp_path / "blocked"
    for name in ("featcache", "torch", "sklearn", "xgboost", "torchvision", "timm"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} must not be needed')\n")
    images = sorted(data.rglob("*.jpg"))[:3]
    done = subprocess.run([sys.executable, str(script), str(model), *map(str, images)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(blocked), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = list(csv.DictReader(done.stdout.splitlines()))
    assert len(lines) == 3
    for line, image in zip(lines, images, strict=True):
        row = by_onnx[next(i for i in by_onnx if Path(i).name == image.name or i.endswith(image.stem))]
        for column in (c for c in line if c.startswith("p_")):
            assert abs(float(line[column]) - float(row[column])) < 1e-4


@pytest.mark.slow
def test_a_four_view_run_exports_on_the_default_engine(tmp_path):
    """Four views averaged inside the graph; the entry made by the default engine (OpenVINO for Lite0)."""
    import featcache as fc

    data, cache = shared("ham70"), tmp_path / "cache"
    fc.extract(data=str(data), cache=str(cache), views=4, quiet=True)
    (run,) = fc.fit(data=str(data), cache=str(cache), views=4, heads=("logreg",), cv=3, quiet=True)
    model = fc.export(run, out=tmp_path / "four.onnx")
    info = fc.predict_onnx(model, str(data))
    by_run = run.predict(str(data))
    columns = [c for c in by_run.columns if c.startswith("p_")]
    assert np.abs(by_run.loc[info.index, columns].to_numpy() - info[columns].to_numpy()).max() < 1e-4


@pytest.mark.slow
def test_fused_and_metadata_runs_export_from_a_strangers_csv(tmp_path):
    """A semicolon CSV with German headers, a label with a trailing space and missing ages; a run with
    metadata columns (a second input) and a fused run of two backbones that prepare images otherwise (two
    image inputs) export, and predict --onnx gives predict --run's probabilities."""
    data = shared("ham70")
    lesions = {}
    with open(data / "HAM10000_metadata.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            lesions[row["image_id"]] = row
    table = tmp_path / "bilder.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(["Bild Pfad", "Diagnose ", "Läsion", "Alter", "geschlecht"])
        for k, image in enumerate(sorted(data.rglob("*.jpg"))):
            row = lesions[image.stem]
            writer.writerow([image, row["dx"] + (" " if k % 9 == 0 else ""), row["lesion_id"],
                             row["age"] if k % 11 else "", row["sex"]])
    cache = str(tmp_path / "cache")
    columns = ["--data", str(table), "--image-col", "Bild Pfad", "--label-col", "Diagnose ", "--group-col", "Läsion",
               "--cache", cache, "-q"]
    runner = CliRunner()
    for backbone in ("efficientnet_lite0", "squeezenet1_1"):
        out = runner.invoke(app, ["extract", *columns, "--backbone", backbone, "--engine", "onnxruntime"])
        assert out.exit_code == 0, out.output
    fits = [["--backbone", "efficientnet_lite0", "--meta", "Alter,geschlecht"],
            ["--backbone", "efficientnet_lite0+squeezenet1_1"]]
    for extra in fits:
        out = runner.invoke(app, ["fit", *columns, *extra, "--head", "logreg", "--cv", "3"])
        assert out.exit_code == 0, out.output
    runs = sorted(Path(cache).glob("*/*/runs/logreg-*"))
    assert len(runs) == 2
    for run in runs:
        model = tmp_path / f"{run.name}.onnx"
        out = runner.invoke(app, ["export", str(run), "--out", str(model)])
        assert out.exit_code == 0, out.output
        inputs = [i.name for i in ort.InferenceSession(str(model)).get_inputs()]
        assert inputs == (["image", "image_1"] if "gap_gap" in run.name else ["image", "metadata"])
        for way, flag in (("run", ["--run", str(run), "--cache", cache]), ("onnx", ["--onnx", str(model)])):
            out = runner.invoke(app, ["predict", *flag, str(table), "--image-col", "Bild Pfad",
                                      "--out", str(tmp_path / f"{way}-{run.name}.csv"), "-q"])
            assert out.exit_code == 0, out.output
        by_run, by_onnx = _rows(tmp_path / f"run-{run.name}.csv"), _rows(tmp_path / f"onnx-{run.name}.csv")
        assert len(by_onnx) == 70 and _max_difference(by_run, by_onnx) < 1e-4


@pytest.mark.slow
def test_an_exported_shift_weighted_run_says_its_sets_are_unweighted(ham70_onnx_entry, tmp_path, monkeypatch, capfd):
    from featcache.deploy import onnx_predict
    from featcache.progress import Reporter

    data, cache = ham70_onnx_entry
    (run,) = cache.glob("*/*/runs/logreg-gap-*")
    model = tmp_path / "logreg.onnx"
    assert CliRunner().invoke(app, ["export", str(run), "--out", str(model)]).exit_code == 0
    read = onnx_predict.graph_info
    thresholds = [0.5] * 7
    monkeypatch.setattr(onnx_predict, "graph_info", lambda session: read(session) | {
        "conformal": {"level": 0.9, "mode": "marginal", "thresholds": thresholds, "shift": "weighted"}})
    frame = onnx_predict.predict_onnx_frame(model, [str(data / "mel")], Reporter())
    assert "needs the run's training features" in capfd.readouterr().err and "set_90" in frame.columns


@pytest.mark.slow
def test_an_exported_run_calibrated_by_group_gives_each_image_its_groups_set(ham70_onnx_entry, tmp_path, monkeypatch,
                                                                             capfd):
    """The ONNX path takes the one evidence path's sets: each image its --conformal-by group's thresholds."""
    from featcache.deploy import onnx_predict
    from featcache.progress import Reporter

    data, cache = ham70_onnx_entry
    (run,) = cache.glob("*/*/runs/logreg-gap-*")
    model = tmp_path / "logreg.onnx"
    assert CliRunner().invoke(app, ["export", str(run), "--out", str(model)]).exit_code == 0
    read = onnx_predict.graph_info
    classes = read(onnx_predict.onnx_session(model))["classes"]
    every, none = [1.0] * len(classes), [-1.0] * len(classes)  # a set of every class; an empty set
    monkeypatch.setattr(onnx_predict, "graph_info", lambda session: read(session) | {"conformal": {
        "level": 0.9, "mode": "marginal", "thresholds": none,
        "by": {"column": "Klinik", "groups": {"A": {"thresholds": every}}}}})
    photos = sorted((data / "mel").glob("*.jpg"))[:4]
    table = tmp_path / "batch.csv"
    table.write_text("image,Klinik\n" + "".join(f"{p},{'A' if k % 2 else 'Z'}\n" for k, p in enumerate(photos)))
    frame = onnx_predict.predict_onnx_frame(model, [str(table)], Reporter())
    sets = frame["set_90"].tolist()  # in the CSV's order
    assert [len(s.split("|")) if s else 0 for s in sets] == [0, len(classes), 0, len(classes)]
    assert "2 of 4 images belong to no Klinik group" in " ".join(capfd.readouterr().err.split())
