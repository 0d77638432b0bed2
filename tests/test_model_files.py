"""Issue 24: run folders without pickles. A model is saved with skops (an explicit list of trusted types),
XGBoost's JSON and safetensors; a crafted model file is refused and nothing in it runs."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io as sio
from typer.testing import CliRunner

from featcache.cli import app
from featcache.errors import RunError
from featcache.evaluation.head_registry import make_pipeline
from featcache.evaluation.heads import ViewEnsemble
from featcache.options import OptionError
from featcache.progress import Reporter
from featcache.store.model_files import LEGACY_PICKLE, MODEL_SKOPS, load_model, save_model, types_in

PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _data(classes: str = "abc", n: int = 160, dim: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array(list(classes))[rng.integers(0, len(classes), n)]
    X = rng.normal(size=(n, dim)).astype(np.float32)
    X[:, 0] += (y == classes[0]) * 1.5
    return X, y


def assert_no_pickle(folder: Path) -> None:
    """No file of ``folder`` is a pickle, and no array inside a skops file holds Python objects."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        assert path.read_bytes()[:2] not in PICKLE_MAGIC, f"{path} is a pickle"
        if path.suffix == ".skops":
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    head = archive.read(member)[:200]
                    assert head[:2] not in PICKLE_MAGIC and b"'descr': '|O'" not in head, f"{path}:{member}"


CASES = [("logreg", {}), ("svm-linear", {}), ("svm-rbf", {}), ("knn", {}), ("xgboost", {}), ("mlp", {}),
         ("majority", {}), ("logreg", {"pca": 4}), ("mlp", {"calibrate": "temperature"}),
         ("xgboost", {"calibrate": "isotonic"}), ("logreg", {"calibrate": "sigmoid"})]


@pytest.mark.parametrize(("head", "options"), CASES, ids=[f"{h}-{'-'.join(map(str, o.values()))}" for h, o in CASES])
@pytest.mark.parametrize("classes", ["abc", "ab"])
def test_every_head_saves_without_pickles_and_loads_to_the_same_probabilities(tmp_path, head, options, classes):
    X, y = _data(classes)
    pipeline = make_pipeline(head, **options).fit(X, y)
    save_model(tmp_path, {"pipeline": pipeline, "classes": sorted(set(y))})
    assert_no_pickle(tmp_path)
    if head == "xgboost":
        assert list(tmp_path.glob("xgboost-*.json")) and json.loads(next(tmp_path.glob("xgboost-*.json")).read_text())
    if head == "mlp":
        assert list(tmp_path.glob("mlp-*.safetensors")) and "hidden" in next(tmp_path.glob("mlp-*.json")).read_text()
    loaded = load_model(tmp_path)
    assert loaded["classes"] == sorted(set(y))
    np.testing.assert_array_equal(loaded["pipeline"].predict_proba(X), pipeline.predict_proba(X))


def test_views_and_metadata_columns_save_and_load(tmp_path):
    X, y = _data(n=60)
    views = ViewEnsemble(make_pipeline("mlp")).fit(np.stack([X, X[:, ::-1]], axis=1), y)
    (tmp_path / "views").mkdir()
    save_model(tmp_path / "views", {"pipeline": views})
    assert np.allclose(load_model(tmp_path / "views")["pipeline"].predict_proba(np.stack([X, X], 1)),
                       views.predict_proba(np.stack([X, X], 1)))
    meta = np.c_[X, np.r_[np.nan, np.arange(59.0)], np.arange(60) % 3]
    pipeline = make_pipeline("logreg", image_dim=12, meta_numeric=1, meta_categorical=1).fit(meta, y)
    (tmp_path / "meta").mkdir()
    save_model(tmp_path / "meta", {"pipeline": pipeline})
    np.testing.assert_array_equal(load_model(tmp_path / "meta")["pipeline"].predict_proba(meta),
                                  pipeline.predict_proba(meta))


class _RunsCode:
    """What an attacker would put in a model file: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _finished_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"config": {"head": "logreg", "classes": ["a", "b"]}}))
    return folder


def test_a_crafted_pickle_is_refused_and_nothing_runs(tmp_path, small_folder):
    marker = tmp_path / "code-ran"
    run = _finished_run(tmp_path / "cache" / "data" / "entry" / "runs" / "logreg-gap-x")
    joblib.dump({"pipeline": _RunsCode(marker)}, run / LEGACY_PICKLE)
    with pytest.raises(RunError, match="pickle.*--trust-pickle"):
        load_model(run)
    out = CliRunner().invoke(app, ["predict", "--run", str(run), str(small_folder), "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 2 and "can run any code" in out.output
    assert not marker.exists() and not (tmp_path / "p.csv").exists()
    load_model(run, trust_pickle=True)  # what --trust-pickle does: this is the code running
    assert marker.exists()


def test_a_crafted_skops_file_naming_other_code_is_refused_before_anything_is_built(tmp_path):
    run = _finished_run(tmp_path / "run")
    sio.dump({"step": os.system}, run / MODEL_SKOPS)
    assert "posix.system" in types_in(run / MODEL_SKOPS) or "os.system" in types_in(run / MODEL_SKOPS)
    with pytest.raises(RunError, match=r"holds types featcache does not load: .*system"):
        load_model(run)
    with pytest.raises(RunError, match="does not load"):
        load_model(run, trust_pickle=True)  # --trust-pickle is about old pickles, not skops files
    # a scikit-learn class outside the list is refused as well, even though skops itself trusts it
    from sklearn.ensemble import RandomForestClassifier

    X, y = _data()
    sio.dump(RandomForestClassifier(n_estimators=2).fit(X, y), run / MODEL_SKOPS)
    with pytest.raises(RunError, match="RandomForestClassifier"):
        load_model(run)


def test_a_legacy_pickle_loads_only_with_trust_pickle_and_says_so(tmp_path, capsys):
    X, y = _data()
    pipeline = make_pipeline("logreg").fit(X, y)
    run = _finished_run(tmp_path / "run")
    joblib.dump({"pipeline": pipeline, "classes": ["a", "b", "c"]}, run / LEGACY_PICKLE)
    loaded = load_model(run, trust_pickle=True)
    np.testing.assert_array_equal(loaded["pipeline"].predict_proba(X), pipeline.predict_proba(X))
    assert "--trust-pickle" in capsys.readouterr().err


def test_a_missing_side_file_is_named(tmp_path):
    X, y = _data()
    save_model(tmp_path, {"pipeline": make_pipeline("xgboost").fit(X, y)})
    next(tmp_path.glob("xgboost-*.json")).unlink()
    with pytest.raises(RunError, match=r"xgboost-\d\.json is missing"):
        load_model(tmp_path)


@pytest.mark.slow
def test_fit_writes_no_pickle_and_refits_a_run_that_holds_one(small_folder, tmp_path):
    from featcache import api

    cache = tmp_path / "cache"
    api.extract(data=str(small_folder), cache=str(cache), quiet=True)
    (run,) = api.fit(data=str(small_folder), cache=str(cache), heads=("xgboost",), cv=3, quiet=True)
    assert_no_pickle(run.path)
    before = run.predict(str(small_folder / "nevus"))
    # the same run as featcache 0.2 left it: a pickle in place of the skops files
    model = load_model(run.path)
    for path in run.path.iterdir():
        if path.name.startswith(("model.", "xgboost-")):
            path.unlink()
    joblib.dump(model, run.path / LEGACY_PICKLE)
    with pytest.raises(RunError, match="pickle"):
        run.predict(str(small_folder / "nevus"))
    trusted = api.load_run(run.path, trust_pickle=True).predict(str(small_folder / "nevus"))  # one's own old run
    np.testing.assert_allclose(trusted.filter(like="p_").to_numpy(), before.filter(like="p_").to_numpy(), atol=1e-6)
    with pytest.raises(OptionError, match="trust_pickle='yes': expected true or false"):
        api.load_run(run.path, trust_pickle="yes")
    messages = []

    class Collect(Reporter):
        def info(self, message: str) -> None:
            messages.append(message)

    (again,) = api.fit(data=str(small_folder), cache=str(cache), heads=("xgboost",), cv=3, reporter=Collect(quiet=True))
    assert again.path == run.path and any("fitting it again, without pickles" in m for m in messages)
    assert not (run.path / LEGACY_PICKLE).exists()
    assert_no_pickle(run.path)
    after = again.predict(str(small_folder / "nevus"))
    np.testing.assert_allclose(after.filter(like="p_").to_numpy(), before.filter(like="p_").to_numpy(), atol=1e-6)
    shutil.rmtree(cache)
