"""Issue 14: a whole study from one file, and a report a person reads (checked in a real browser)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featcache as fc
from featcache.cli import app
from featcache.options import OptionError
from featcache.store.runs import read_metrics
from featcache.study import StudyError, load_study, parse_study

from .conftest import DEMO

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """30 real images, 15 melanoma and 15 nevus, with a labels.csv that has no group column."""
    root = tmp_path / "study_data"
    lines = ["path,label,patient_ref"]
    for label in ("melanoma", "nevus"):
        (root / label).mkdir(parents=True)
        for k, src in enumerate(sorted((DEMO / "images" / label).glob("*.jpg"))[:15]):
            shutil.copy(src, root / label / src.name)
            lines.append(f"{label}/{src.name},{label},{label[0]}{k // 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _study(tmp_path: Path, folder: Path, extra: str = "") -> Path:
    text = f"""
[data]
train = "{folder / 'labels.csv'}"
[extract]
backbones = ["efficientnet_lite0"]
pools = ["gap"]
[fit]
heads = ["logreg", "knn", "majority"]
cv = 3
[compare]
ensemble = 2
{extra}"""
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("content, message", [
    ({"data": {"train": "x"}, "extract": {"backbones": ["efficientnet_lite0"]}, "fit": {"heds": ["logreg"]}},
     r"\[fit\] heds: unknown key; did you mean heads\? \[fit\] takes heads"),
    ({"data": {"train": "."}, "extract": {"backbones": ["efficientnet_lite0"]}, "fit": {"heads": ["logreg"],
                                                                                      "split": "offical"}},
     r"\[fit\] split 'offical'.*official"),
    ({"data": {"train": "."}, "extract": {"backbones": ["efficientnet_lite9"]}, "fit": {"heads": ["logreg"]}},
     r"\[extract\] backbones: .*efficientnet_lite9: unknown"),
    ({"data": {"train": "."}, "extract": {"backbones": ["efficientnet_lite0"], "pools": ["cls"]},
      "fit": {"heads": ["logreg"]}}, r"efficientnet_lite0 has no pooling 'cls'"),
    ({"data": {"train": "."}, "extract": {"backbones": ["efficientnet_lite0"], "views": 3},
      "fit": {"heads": ["logreg"]}}, r"\[extract\] views 3: not a valid value; choose one of 1, 2, 4, 8"),
    ({"data": {"train": "."}, "extract": {"backbones": ["efficientnet_lite0"]}, "fit": {"heads": ["logreg"],
                                                                                      "cv": "5"}},
     r"\[fit\] cv = '5': expected a whole number"),
    ({"data": {"train": "nowhere.csv"}, "extract": {"backbones": ["efficientnet_lite0"]}, "fit": {"heads": ["mlp"]}},
     r"\[data\] train = 'nowhere.csv': no such file"),
    ({"data": {"train": "."}, "extract": {"backbones": ["efficientnet_lite0"]}, "fit": {"heads": ["lgoreg"]}},
     r"\[fit\] heads: .*lgoreg"),
    ({"data": {"train": "."}, "fitt": {}}, r"unknown table \[fitt\]"),
])
def test_a_bad_study_is_one_error_naming_the_key_before_any_work(tmp_path, content, message):
    with pytest.raises(StudyError, match=message):
        parse_study(content, tmp_path)


@pytest.mark.slow
def test_a_study_runs_reuses_resumes_and_ends_with_the_report(tmp_path, folder):
    study = _study(tmp_path, folder)
    cache = tmp_path / "cache"
    out = _cli("run", str(study), "--cache", str(cache), "--dry-run")
    assert out.exit_code == 0 and "0 of 4 steps already done" in out.output, out.output
    assert not cache.exists() or not any(cache.rglob("*.h5"))  # a dry run does nothing
    out = _cli("run", str(study), "--cache", str(cache))
    assert out.exit_code == 0, out.output
    runs = sorted(cache.glob("*/*/runs/*"))
    assert len(runs) == 3 and (cache / "report-study.html").is_file()
    assert all("UNGROUPED" in read_metrics(r)["protocol"] for r in runs)
    # one run lost (as if the study had been killed before it): the plan says so, a rerun redoes only it
    shutil.rmtree([r for r in runs if r.name.startswith("knn")][0])
    out = _cli("run", str(study), "--cache", str(cache), "--dry-run")
    assert "3 of 4 steps already done" in out.output, out.output
    result = fc.run_study(load_study(study), cache=cache)
    assert len(result.runs) == 3 and sum(1 for s in result.steps if s.done) == 3
    # the Python API takes the same content as a dict
    grouped = fc.run_study({"data": {"train": str(folder / "labels.csv"), "group_col": "patient_ref"},
                         "extract": {"backbones": ["efficientnet_lite0"]}, "fit": {"heads": ["logreg"], "cv": 3}},
                           cache=cache)
    assert "grouped stratified CV" in read_metrics(grouped.runs[0])["protocol"]


@pytest.mark.slow
def test_show_prints_the_confusion_matrix_and_per_class_table(tmp_path, folder):
    cache = tmp_path / "cache"
    result = fc.run_study(parse_study({"data": {"train": str(folder)}, "extract": {"backbones": ["efficientnet_lite0"]},
                                    "fit": {"heads": ["logreg"], "cv": 3}}), cache=cache)
    out = _cli("show", str(result.runs[0]))
    assert out.exit_code == 0, out.output
    assert "confusion matrix" in out.output and "melanoma" in out.output and "AUROC (one-vs-rest)" in out.output
    metrics = read_metrics(result.runs[0])["pooled"]
    assert str(metrics["confusion_matrix"][0][0]) in out.output


@pytest.mark.slow
def test_compare_shows_identical_runs_and_baselines_once_with_their_folders(tmp_path, folder):
    cache = tmp_path / "cache"
    study = {"data": {"train": str(folder)}, "fit": {"heads": ["logreg", "majority"], "cv": 3},
             "extract": {"backbones": ["efficientnet_lite0"], "pools": ["gap", "multi"]}}
    result = fc.run_study(study, cache=cache)
    copy = result.runs[0].parents[2] / "efficientnet_lite0-copy"  # the same entry kept twice
    shutil.copytree(result.runs[0].parents[1], copy)
    out = _cli("compare", "--cache", str(cache), "--paths")
    assert out.exit_code == 0 and "run folder" in out.output, out.output
    with open(cache / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    heads = sorted(r["head"] for r in rows)
    # logreg on gap and on multi once each (not again from the copied entry); majority once in all
    assert heads == ["logreg", "logreg", "majority (baseline)"], heads
    assert all(Path(r["run folder"]).is_dir() for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI", "").lower() != "true",
                    reason="no chromium here (apt-get install chromium); CI installs it and must not skip")
def test_the_report_renders_in_a_real_browser_without_errors_or_requests(tmp_path, folder):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI=true but chromium is not installed: .ci/run installs it"
    cache = tmp_path / "cache"
    fc.run_study(parse_study({"data": {"train": str(folder)}, "extract": {"backbones": ["efficientnet_lite0"]},
                           "fit": {"heads": ["logreg", "knn", "stratified"], "cv": 3}, "compare": {"ensemble": 2}}),
                 cache=cache)
    out = _cli("report", "--cache", str(cache), "--top", "3", "--best", "2")
    assert out.exit_code == 0, out.output
    page_file = cache / "report.html"
    text = page_file.read_text()
    assert "http://" not in text and "https://" not in text
    errors, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        figures = page.eval_on_selector_all("img.figure", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
        headings = page.eval_on_selector_all("h2, h3", "els => els.map(e => e.textContent)")
        commands = page.eval_on_selector_all("code", "els => els.map(e => e.textContent)")
        browser.close()
    assert errors == []
    assert [url for url in requests if not url.startswith(("file://", "data:"))] == []
    # leaderboard + 2 best runs x (confusion, ROC, reliability)
    assert len(figures) == 7 and all(complete and width > 100 for _, complete, width in figures), figures
    assert any("UNGROUPED" in h for h in headings) and "Provenance of the features" in headings
    assert any(c.startswith("featcache predict --run ") for c in commands)


@pytest.mark.slow
def test_fit_logs_each_run_to_a_real_local_mlflow_store_once(tmp_path, folder):
    from mlflow.tracking import MlflowClient

    from featcache.reporting.tracking import EXPERIMENT, TAG, default_uri

    cache = tmp_path / "cache"
    fc.run_study({"data": {"train": str(folder)}, "extract": {"backbones": ["efficientnet_lite0"]},
                  "fit": {"heads": ["logreg"], "cv": 3}}, cache=cache)
    args = ("fit", "--data", str(folder), "--cache", str(cache), "--head", "logreg,majority", "--cv", "3", "--mlflow")
    out = _cli(*args)
    assert out.exit_code == 0 and "logged 2 run(s) to MLflow" in out.output, out.output
    assert _cli(*args).exit_code == 0  # again: the runs are reused and not logged twice
    client = MlflowClient(default_uri(cache))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    logged = client.search_runs([experiment.experiment_id])
    assert len(logged) == 2
    mlflow_run = next(r for r in logged if r.data.params["head"] == "logreg")
    folder_of_run = next(cache.glob(f"*/*/runs/{mlflow_run.data.tags[TAG]}"))
    pooled = read_metrics(folder_of_run)["pooled"]
    assert mlflow_run.data.metrics["balanced_accuracy"] == pytest.approx(pooled["balanced_accuracy"])
    assert mlflow_run.data.params["protocol.cv"] == "3"
    artefacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"metrics.json", "oof_predictions.csv", "model.skops", "model.json", "confusion_matrix.png"} <= artefacts


def test_backbones_lists_the_usable_ones_first_without_importing_torch():
    import subprocess
    import sys

    probe = ("import sys, featcache.cli, featcache.backbones.catalog as r; "
             "[r.weights_available(s) for s in r.REGISTRY.values()]; "
             "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", probe], check=True)
    out = _cli("backbones", "-q")
    assert out.exit_code == 0
    assert set(out.output.split()) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                       "squeezenet1_1", "scattering"}  # scattering: no weights needed


def test_help_shows_flags_without_a_type_and_every_command_has_quiet():
    out = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "160"})
    assert "<bool>" not in out.output and "--tune" in out.output and "--no-tune" not in out.output
    for command in ("extract", "fit", "compare", "predict", "demo", "run", "show", "backbones", "verify"):
        assert "--quiet" in runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"}).output, command


@pytest.mark.slow
def test_a_study_can_fuse_its_backbones(tmp_path, folder):
    study = {"data": {"train": str(folder)}, "fit": {"heads": ["logreg"], "cv": 3, "fuse": True},
             "extract": {"backbones": ["efficientnet_lite0", "squeezenet1_1"], "pools": ["gap"]}}
    result = fc.run_study(study, cache=tmp_path / "cache")
    backbones = sorted(read_metrics(run)["config"]["backbone"] for run in result.runs)
    assert backbones == ["efficientnet_lite0", "efficientnet_lite0+squeezenet1_1", "squeezenet1_1"]
    assert len(result.steps) == 2 + 2 + 1
    with pytest.raises(StudyError, match="fuse = true needs two or more"):
        parse_study({**study, "extract": {"backbones": ["efficientnet_lite0"], "pools": ["gap"]}})


@pytest.mark.slow
def test_a_study_fuses_each_backbones_own_pooling_and_stacks_the_runs(tmp_path, folder):
    study = {"data": {"train": str(folder)}, "fit": {"heads": ["logreg", "knn"], "cv": 3, "fuse": True,
                                                     "pool": "penult+gap"},
             "extract": {"backbones": ["efficientnet_lite0", "squeezenet1_1"], "pools": ["gap", "penult"]},
             "compare": {"ensemble": "stack"}}
    result = fc.run_study(study, cache=tmp_path / "cache")
    made = sorted((read_metrics(r)["config"]["backbone"], read_metrics(r)["config"]["pool"]) for r in result.runs)
    assert made == [("efficientnet_lite0", "penult")] * 2 + [("efficientnet_lite0+squeezenet1_1", "penult+gap")] * 2 \
        + [("squeezenet1_1", "gap")] * 2
    assert "stack of 6" in result.report.read_text()
    best = fc.best_model(study, cache=tmp_path / "cache")
    assert isinstance(best, fc.Ensemble | fc.Run)
    # an ensemble predicts new images as compare scored it: the members' mean, or the meta-learner on them
    from featcache.evaluation.stacking import final_meta_learner, stacked_proba
    from featcache.store.runs import read_predictions

    members = tuple(fc.load_run(r) for r in result.runs[:3])
    images = sorted(Path(folder).rglob("*.jpg"))[:4]
    alone = [m.predict(images, quiet=True) for m in members]
    columns = [c for c in alone[0].columns if c.startswith("p_")]
    voted = fc.Ensemble(members, "top3").predict(images)
    assert np.allclose(voted[columns].to_numpy(float), np.mean([a[columns].to_numpy(float) for a in alone], axis=0))
    oof = [read_predictions(m.path) for m in members]
    meta = final_meta_learner([o.proba for o in oof], oof[0].labels, oof[0].classes, oof[0].seeds,
                              oof[0].group_array(np.ones(len(oof[0].ids), dtype=bool)))
    stacked = fc.Ensemble(members, "stack").predict(images)
    expected = stacked_proba(meta, [a[columns].to_numpy(float) for a in alone], len(columns))
    assert np.allclose(stacked[columns].to_numpy(float), expected)
    assert list(stacked["predicted"]) == [columns[k][2:] for k in expected.argmax(axis=1)]
    runs = [arg for m in members[:2] for arg in ("--run", str(m.path))]
    out = _cli("predict", *runs, *map(str, images), "--out", str(tmp_path / "p.csv"), "-q")
    assert out.exit_code != 0 and "--ensemble" in out.output
    out = _cli("predict", *runs, "--ensemble", "stack", *map(str, images), "--out", str(tmp_path / "p.csv"), "-q")
    assert out.exit_code == 0, out.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + len(images)
    # the same fused run from Python: found, not fitted again
    again = fc.fit(data=str(folder), backbone="efficientnet_lite0+squeezenet1_1", pool="penult+gap", heads="logreg",
                   cv=3, cache=tmp_path / "cache", quiet=True)
    assert again[0].path in result.runs
    with pytest.raises(OptionError, match="one per backbone"):
        fc.fit(data=str(folder), backbone="efficientnet_lite0+squeezenet1_1", pool="penult+gap+gap",
               cache=tmp_path / "cache", quiet=True)
    for fit, message in (({"pool": "penult+gap"}, "needs fuse = true"),
                         ({"pool": "penult+gap+gap", "fuse": True}, "one pooling for each"),
                         ({"pool": "penult+multi", "fuse": True}, "'multi' is not among")):
        with pytest.raises(StudyError, match=message):
            parse_study({**study, "fit": {"heads": ["logreg"], **fit}})
