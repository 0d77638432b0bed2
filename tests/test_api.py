"""featcache as a library: the public API, one declaration per option, the same numbers (the layers and the import
cycles: test_architecture.py)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

import featcache as fc
from featcache.cli import app
from featcache.options import BY_NAME, OPTIONS, OptionError, options_for
from featcache.study import StudyError, parse_study, study_keys

from .conftest import REPO

COMMAND = typer.main.get_command(app)


def _cli_params(command: str) -> dict[str, object]:
    return {p.name: p for p in COMMAND.commands[command].params}


@pytest.mark.parametrize("command", ["extract", "fit"])
def test_every_cli_option_of_extract_and_fit_has_its_study_key_and_api_keyword(command):
    api = inspect.signature(getattr(fc, command)).parameters
    keys = study_keys()
    run_api = inspect.signature(fc.run_study).parameters
    run_cli = _cli_params("run")
    for name in _cli_params(command):
        flag = "--" + name.replace("_", "-")
        option = BY_NAME.get(name) or next(o for o in OPTIONS if o.alias and o.alias[0] == flag)
        assert option.name in api, f"--{name}: no keyword featcache.{command}({option.name}=...)"
        assert api[option.name].default == (inspect.Parameter.empty if option.required
                                             else option.default_for(command)), option.name
        if option.table is None:  # where and how a command runs: featcache run / run_study take it
            assert option.name in run_api or option.name in ("cache", "quiet") or command in option.commands
            assert option.name in run_cli or option.name == "ray_actors", option.name
        else:
            assert keys[option.table][option.study_key] is option, f"--{name}: no [{option.table}] key"
    # and the other way round: every keyword of the API is a flag of the CLI
    for name in api:
        if name not in ("reporter",):
            assert name in _cli_params(command) or name in ("data",) and "data" in _cli_params(command), name


def test_an_option_checks_its_values_the_same_way_in_every_door(tmp_path):
    with pytest.raises(OptionError, match=r"dtype='float64': not a valid value; choose one of float16, float32"):
        fc.extract(tmp_path, dtype="float64")
    with pytest.raises(OptionError, match=r"unexpected keyword argument 'hedas'"):
        fc.fit(tmp_path, hedas=["logreg"])
    with pytest.raises(StudyError, match=r"\[extract\] dtype 'float64': not a valid value"):
        parse_study({"data": {"train": str(tmp_path)}, "extract": {"backbones": ["efficientnet_lite0"],
                                                                   "dtype": "float64"}, "fit": {"heads": ["logreg"]}})
    out = CliRunner().invoke(app, ["extract", "--data", str(tmp_path), "--dtype", "float64"])
    assert out.exit_code == 2 and "float64" in out.output


def test_a_study_says_what_extract_and_fit_take(tmp_path):
    study = parse_study({"data": {"train": str(tmp_path)},
                         "extract": {"backbones": ["efficientnet_lite0"], "preprocess": ["color-constancy"],
                                     "input_size": 192, "precision": "fp32"},
                         "fit": {"heads": ["logreg"], "pca": 8, "near_dup_threshold": 0.9}})
    assert study.extract["preprocess"] == ("color-constancy",) and study.extract["input_size"] == 192
    assert study.fit["pca"] == 8 and study.fit["near_dup_threshold"] == 0.9
    with pytest.raises(StudyError, match=r"\[extract\] preprocess: .*'colour-constancy'"):
        parse_study({"data": {"train": str(tmp_path)}, "extract": {"backbones": ["efficientnet_lite0"],
                                                                   "preprocess": ["colour-constancy"]},
                     "fit": {"heads": ["logreg"]}})
    with pytest.raises(StudyError, match="names a backbone twice"):
        parse_study({"data": {"train": str(tmp_path)}, "fit": {"heads": ["logreg"]},
                     "extract": {"backbones": ["efficientnet_lite0", "efficientnet_lite0"]}})


def test_the_api_has_numpydoc_parameters_made_from_the_declarations():
    for function, command in ((fc.extract, "extract"), (fc.fit, "fit")):
        doc = inspect.getdoc(function)
        for option in options_for(command):
            assert f"\n{option.name} : " in doc, (command, option.name)
        assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   for p in inspect.signature(function).parameters.values())
    fit = inspect.signature(fc.fit).parameters
    assert fit["heads"].kind is inspect.Parameter.KEYWORD_ONLY and fit["cv"].default == 5


@pytest.mark.slow
def test_extract_fit_compare_and_predict_from_python(small_folder, tmp_path):
    cache = tmp_path / "c"
    entry = fc.extract(small_folder, cache=cache, quiet=True)
    assert isinstance(entry, fc.Entry) and len(entry.ids) == 12
    runs = fc.fit(small_folder, heads=["logreg", "svm-linear"], cv=3, cache=cache, quiet=True)
    assert [r.head for r in runs] == ["logreg", "svm-linear"]
    assert 0.0 <= runs[0].metrics["pooled"]["balanced_accuracy"] <= 1.0
    assert list(runs[0].oof.columns) == ["seed", "fold", "id", "group", "label", "p_melanoma", "p_nevus"]
    table = fc.compare(cache=cache).to_pandas()
    assert set(table["head"]) == {"logreg", "svm-linear"}
    assert table["balanced_accuracy"].is_monotonic_decreasing  # ranked by the pooled score
    assert "<table" in fc.compare(cache=cache)._repr_html_()
    image = next((small_folder / "nevus").glob("*.jpg"))
    predictions = fc.load_run(runs[0].path).predict([image])
    assert list(predictions.columns[:3]) == ["predicted", "p_melanoma", "p_nevus"]
    assert np.isclose(predictions[["p_melanoma", "p_nevus"]].to_numpy().sum(), 1.0)
    assert predictions["near_duplicate_of"].iloc[0]  # it is a training image
    assert not (cache / "compare.csv").exists()  # fitting writes no cache-wide comparison


@pytest.mark.slow
def test_a_study_with_color_constancy_runs_as_its_dry_run_planned(small_folder, tmp_path):
    study = {"data": {"train": str(small_folder)},
             "extract": {"backbones": ["efficientnet_lite0"], "preprocess": ["color-constancy"], "pools": ["gap"]},
             "fit": {"heads": ["logreg"], "cv": 3}}
    cache = tmp_path / "c"
    plan = fc.run_study(study, cache=cache, dry_run=True, quiet=True)
    planned_entry = plan.steps[0].detail.split(": ", 1)[1]
    result = fc.run_study(study, cache=cache, quiet=True)
    [run] = result.runs
    assert str(run.parents[1]) == planned_entry
    manifest = json.loads((run.parents[1] / "manifest.json").read_text())
    assert manifest["fingerprint_inputs"]["preprocess"]["filters"] == ["color-constancy"]
    again = fc.run_study(study, cache=cache, dry_run=True, quiet=True)
    assert all(step.done for step in again.steps) and again.steps[1].detail == f"finished: {run}"


@pytest.mark.slow
def test_a_fused_study_s_dry_run_knows_its_finished_fused_fits(small_folder, tmp_path):
    study = {"data": {"train": str(small_folder)},
             "extract": {"backbones": ["efficientnet_lite0", "squeezenet1_1"], "pools": ["gap"], "engine": "torch"},
             "fit": {"heads": ["logreg"], "cv": 3, "fuse": True}}
    cache = tmp_path / "c"
    before = fc.run_study(study, cache=cache, dry_run=True, quiet=True)
    assert [step.done for step in before.steps if "+" in step.label] == [None]  # features not there yet
    result = fc.run_study(study, cache=cache, quiet=True)
    fused_run = result.runs[-1]  # the fused fits come after each backbone's own
    assert fused_run.name.startswith("logreg-gap_gap-")
    again = fc.run_study(study, cache=cache, dry_run=True, quiet=True)
    assert all(step.done for step in again.steps), [(s.label, s.detail) for s in again.steps if not s.done]
    [fused_step] = [step for step in again.steps if "+" in step.label]
    assert fused_step.label == "fit efficientnet_lite0+squeezenet1_1/gap+gap/logreg"
    assert fused_step.detail == f"finished: {fused_run}"
    # a finished study only reads its entries: another process writing one of them does not stop it
    code = ("import sys, time; from pathlib import Path; from featcache.store.entries import EntryLock\n"
            "with EntryLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(fused_run.parents[1])], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert fc.run_study(study, cache=cache, quiet=True).runs == result.runs
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_the_demo_gives_the_numbers_and_names_it_gave_before_the_library_refactor(tmp_path):
    """The demo's entry name, run names and scores, against those saved before the refactor."""
    before = json.loads((REPO / "tests" / "golden" / "demo_before_refactor.json").read_text())
    runs = fc.demo(cache=tmp_path / "c", quiet=True)
    assert runs[0].path.parents[1].name == before["entry"]
    assert {r.path.name for r in runs} == set(before["runs"])
    for run in runs:
        saved = before["runs"][run.path.name]
        for metric, value in saved["pooled"].items():
            assert run.metrics["pooled"][metric] == pytest.approx(value, abs=1e-9), (run.head, metric)
        assert run.metrics["protocol"] == saved["protocol"]


def test_the_entry_fit_reads_is_selected_by_exactly_the_options_declared_to_select():
    from dataclasses import fields

    from featcache.evaluation.fitting import SELECTING, EntrySelection

    # an extract option declared with selects=True and no field here (or a field no option declares) fails
    assert {f.name for f in fields(EntrySelection)} == {*SELECTING, "backbone", "pool", "preprocess"}
    asked = EntrySelection.from_options({"views": 4, "engine": None, "preprocess": ("hair-removal",)}, pool="gap")
    assert (asked.views, asked.engine, asked.pool, asked.preprocess) == (4, None, "gap", ("hair-removal",))
