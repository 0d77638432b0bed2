"""Issue 33: what people see is what was measured (compare, files, messages, the notebook, the docs)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from typer.testing import CliRunner

import featcache as fc
from featcache.cli import app
from featcache.errors import RunError
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.metrics import compute_metrics
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import HeldOut, fit_head
from featcache.options import OptionError
from featcache.progress import Reporter
from featcache.recipes import FitPlan
from featcache.reporting.compare import select_rows, table_rows
from featcache.store.naming import entry_of_run, trained_run
from featcache.store.runs import read_metrics, read_predictions

from .conftest import DEMO
from .fakes import FakeEntry

runner = CliRunner()


def _clinic(n: int, seed: int, scale: float = 1.0, offset: float = 0.0, ids: str = "a",
            classes: tuple[str, ...] = ("mel", "nv")) -> LabeledFeatures:
    rng = np.random.default_rng(seed)
    y = np.array(classes)[np.arange(n) % len(classes)]
    X = rng.normal(size=(n, 8)) + (y == classes[0])[:, None] * 1.2
    return LabeledFeatures((X * scale + offset).astype(np.float32), y, None, None,
                           [f"{ids}{k}" for k in range(n)], list(classes))


def _fit(cache: Path, head: str = "logreg", test: LabeledFeatures | None = None, data: LabeledFeatures | None = None,
         **protocol) -> Path:
    entry = FakeEntry(cache / "clinic_a" / "test-ffffffffffffffff")
    return fit_head(data or _clinic(120, 0), entry, head, "gap", Protocol(cv=3, **protocol), "clinic_a",
                    test=HeldOut.of(test, "clinic_b"), plan=FitPlan(jobs=1))


def test_compare_shows_every_run_that_differs_only_on_the_held_out_side(tmp_path):
    cache = tmp_path / "cache"
    other = _clinic(80, 1, scale=2.0, offset=1.0, ids="b")
    runs = {_fit(cache, test=other, test_align=a) for a in ("none", "moments", "coral")}
    runs.add(_fit(cache, test=other, conformal=0.9))
    runs.add(_fit(cache, test=other, conformal=0.9, conformal_mode="class"))
    plain = _fit(cache)
    assert len(runs) == 5 and plain not in runs
    # three trained runs (the sets' coverage is trained on the folds), five held-out evaluations of them
    assert {trained_run(r) for r in runs} == {plain, trained_run(_fit(cache, conformal=0.9)),
                                              trained_run(_fit(cache, conformal=0.9, conformal_mode="class"))}
    # the same CV scores for all: before, compare kept one per score and hid the best test run
    assert len({read_metrics(r)["pooled"]["balanced_accuracy"] for r in runs}) == 1
    rows = select_rows(cache, "balanced_accuracy")
    # a trained run with held-out evaluations is listed once per evaluation; one without, once (plain)
    assert {r.run for r in rows} == runs
    header, body = table_rows(rows, "balanced_accuracy")
    settings = {line[header.index("held-out settings")] for line in body}
    assert settings == {"test clinic_b (align coral)", "test clinic_b (align moments)",
                        "test clinic_b (align none)", "test clinic_b (align none), sets 0.9 class",
                        "test clinic_b (align none), sets 0.9 marginal"}
    # the same run kept in two entries (a copied entry) is the only thing that collapses
    one = next(iter(runs))
    shutil.copytree(entry_of_run(one), cache / "clinic_a" / "test-copy")
    assert len(select_rows(cache, "balanced_accuracy")) == 5
    page = fc.report(cache=cache, out=tmp_path / "report.html").read_text()
    assert "5 runs &middot;" in page and page.count("<code>featcache predict --run") == 5


def test_held_out_warnings_name_the_run_that_gave_them_also_when_it_is_reused(tmp_path):
    said: list[str] = []

    class Collect(Reporter):
        def warn(self, message: str) -> None:
            said.append(message)

    other, entry = _clinic(80, 1, scale=2.0, offset=1.0, ids="b"), FakeEntry(tmp_path / "c" / "a" / ("t-" + "f" * 16))
    for _ in range(2):  # made, then reused
        for head in ("logreg", "knn"):
            fit_head(_clinic(120, 0), entry, head, "gap", Protocol(cv=3), "clinic_a",
                     test=HeldOut(other, "clinic_b"), plan=FitPlan(jobs=1), reporter=Collect(quiet=True))
    shifts = [m for m in said if "domain shift:" in m]
    assert [m.split(":")[0] for m in shifts] == ["logreg", "knn", "logreg", "knn"]


def test_per_class_auroc_has_its_pooled_value_and_interval(tmp_path):
    cache = tmp_path / "cache"
    _fit(cache, data=_clinic(150, 0, classes=("mel", "nv", "bcc")))
    rows = select_rows(cache, "auroc:nv")
    header, body = table_rows(rows, "auroc:nv")
    cell = body[0][header.index("auroc:nv pooled [95% CI]")]
    pooled = read_metrics(rows[0].run)["pooled"]
    assert cell == (f"{pooled['auroc:nv']:.3f} [{pooled['ci95']['auroc:nv'][0]:.3f}, "
                    f"{pooled['ci95']['auroc:nv'][1]:.3f}]")
    low, high = pooled["ci95"]["auroc:nv"]
    assert low < pooled["auroc:nv"] < high


def test_every_score_is_recomputable_from_the_files_written(tmp_path):
    cache = tmp_path / "cache"
    other = _clinic(80, 1, scale=2.0, offset=1.0, ids="b")
    # equal to the last bit: six decimals (as written before) changed log-loss and Brier, and tied a saturated
    # head's probabilities at 0.000000, which changed its AUROC
    run = _fit(cache, test=other, test_align="moments", conformal=0.9)
    metrics = read_metrics(run)
    oof, test = read_predictions(run, "oof"), read_predictions(run, "test")
    scored = compute_metrics(oof.labels, oof.proba, oof.classes)
    for name in ("balanced_accuracy", "auroc", "auroc:mel", "log_loss", "brier", "ece"):
        assert scored[name] == metrics["pooled"][name], name
    mel = test.classes.index("mel")
    assert roc_auc_score(test.labels == "mel", test.proba[:, mel]) == metrics["test"]["auroc"]
    assert balanced_accuracy_score(test.labels, np.array(test.classes)[test.proba.argmax(1)]) == \
        metrics["test"]["balanced_accuracy"]
    # the prediction sets are in the files, and their coverage and size are metrics.json's
    for which, record in ((oof, metrics["conformal"]), (test, metrics["test"]["conformal"]),
                          (read_predictions(run, "test_unaligned"), metrics["test"]["unaligned"]["conformal"])):
        sets = [s.split("|") if s else [] for s in which.sets]
        assert np.mean([label in s for label, s in zip(which.labels, sets, strict=True)]) == record["coverage"]
        assert np.mean([len(s) for s in sets]) == record["mean_set_size"]
    with open(run / "test_predictions.csv", newline="") as handle:
        assert next(csv.reader(handle))[-1] == "set_90"


def test_prediction_sets_are_shown_and_uninformative_ones_said(tmp_path):
    cache = tmp_path / "cache"
    noise = _clinic(120, 0)
    noise.X[:] = np.random.default_rng(3).normal(size=noise.X.shape)  # nothing to learn: sets of both classes
    reporter = Reporter(quiet=True)
    said = []
    reporter.warn = said.append
    run = fit_head(noise, FakeEntry(cache / "clinic_a" / "test-ffffffffffffffff"), "logreg", "gap",
                   Protocol(cv=3, conformal=0.95), "clinic_a", plan=FitPlan(jobs=1), reporter=reporter)
    assert any("prediction sets hold" in w and "say little" in w for w in said), said
    header, body = table_rows(select_rows(cache, "balanced_accuracy"), "balanced_accuracy")
    saved = read_metrics(run)["conformal"]
    assert body[0][header.index("prediction sets: coverage, mean size")] == \
        f"{saved['coverage']:.3f} at 0.95, {saved['mean_set_size']:.2f} classes"


def test_a_single_split_shows_the_images_it_scored_and_scores_without_training_copies(tmp_path):
    from featcache.evaluation.leakage import DuplicatePairs

    data = _clinic(120, 0)
    data.splits = np.array(["test" if k % 4 < 2 else "train" for k in range(120)])
    # test image 0 is a copy of training image 2, test image 4 of training image 6
    data.duplicates = DuplicatePairs(np.array([0, 4]), np.array([2, 6]), np.array([1.0, 0.99], np.float32),
                                     np.array([True, False]), 0.95, True)
    run = _fit(tmp_path / "cache", data=data, split="official")
    rows = select_rows(tmp_path / "cache", "balanced_accuracy")
    assert rows[0].n_images == 60  # scored, not the 120 rows
    without = read_metrics(run)["without_training_copies"]
    assert without["n_images"] == 58 and without["n_left_out"] == 2
    oof = read_predictions(run)
    keep = ~np.isin(oof.ids, ["a0", "a4"])
    assert without["balanced_accuracy"] == balanced_accuracy_score(
        oof.labels[keep], np.array(oof.classes)[oof.proba[keep].argmax(1)])
    header, body = table_rows(rows, "balanced_accuracy")
    assert "(n 58)" in body[0][header.index("balanced_accuracy without held-out images copied in training [95% CI]")]


def test_test_align_without_test_data_is_refused_before_any_work(tmp_path):
    with pytest.raises(OptionError, match="test_align='moments' aligns .* and no test_data is given"):
        fc.fit(tmp_path / "nowhere", test_align="moments", cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    out = runner.invoke(app, ["fit", "--data", str(tmp_path), "--test-align", "coral", "--cache", str(tmp_path)])
    assert out.exit_code == 2 and "--test-data" in out.output


def test_a_rule_between_options_is_checked_at_every_door_and_spelled_as_each_door_writes_it(tmp_path):
    from featcache.study import StudyError, parse_study

    said = "calibrates prediction sets by group: give the coverage with"
    with pytest.raises(OptionError, match=f"^conformal_by='site' {said} conformal "):
        fc.fit(tmp_path / "nowhere", conformal_by="site", cache=tmp_path / "cache")
    out = runner.invoke(app, ["fit", "--data", str(tmp_path), "--conformal-by", "site", "--cache", str(tmp_path)])
    assert out.exit_code == 2 and f"--conformal-by site {said} --conformal " in " ".join(out.output.split())
    study = {"data": {"train": "train.csv"}, "extract": {"backbones": ["efficientnet_lite0"]},
             "fit": {"heads": ["logreg"], "conformal_by": "site"}}
    (tmp_path / "train.csv").write_text("path,label\n")
    with pytest.raises(StudyError, match=rf"^study: \[fit\] conformal_by = 'site' {said} \[fit\] conformal "):
        parse_study(study, tmp_path)
    assert not (tmp_path / "cache").exists()


def test_a_class_too_small_is_named_with_what_to_do():
    from featcache.evaluation.splits import make_folds

    y = np.array(["mel"] * 20 + ["nv"] * 20 + ["bcc"] * 10 + ["mell"])
    with pytest.raises(RunError, match="'mell' has 1 image; a label typo\\? fix it .* --classes bcc,mel,nv"):
        make_folds(y, None, 5, 0)
    with pytest.raises(RunError, match="'bcc' has 3 images; use --cv 3, or leave it out with --classes mel,nv"):
        make_folds(y[:43], None, 5, 0)


def test_a_warning_is_said_once_and_a_checksum_column_is_no_group_hint(tmp_path, capsys):
    from featcache.data.sources import open_source

    reporter = Reporter()
    for _ in range(3):
        reporter.warn("domain shift: the same for every head")
    assert capsys.readouterr().err.count("domain shift") == 1
    for _ in range(2):  # what a source is, met by the audit and by the fit it runs
        reporter.info("groups: column 'lesion' (3 groups of 9 images)", once=True)
    assert capsys.readouterr().err.count("groups: column") == 1
    image = next((DEMO / "images" / "nevus").glob("*.jpg"))
    lines = ["path,label,md5"] + [f"{image},nv,{'ab' if k % 2 else 'cd'}{k // 4}" for k in range(40)]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    assert open_source(tmp_path / "x.csv").suspect_group_columns == []


def test_columns_are_found_past_stray_spaces_and_a_test_csv_shares_the_training_column_names(tmp_path):
    from featcache.data.sources import open_source, open_test_source

    images = sorted((DEMO / "images" / "nevus").glob("*.jpg"))[:4]
    image = images[0]
    header = "Bild Pfad;Befund ;Läsion-Nr\n"
    (tmp_path / "train.csv").write_text(header + "".join(f"{p};Nävus;L{k}\n" for k, p in enumerate(images)))
    (tmp_path / "test.csv").write_text("Bild Pfad;Befund \n" + f"{image};Nävus\n")
    (tmp_path / "other.csv").write_text("path,label\n" + f"{image},Nävus\n")
    train = open_source(tmp_path / "train.csv", image_col="bild pfad", label_col="befund", group_col="läsion-nr")
    assert [r.label for r in train.records] == ["Nävus"] * 4 and train.group_column == "Läsion-Nr"
    test = open_test_source(tmp_path / "test.csv", image_col="bild pfad", label_col="befund")
    assert [r.label for r in test.records] == ["Nävus"]
    other = open_test_source(tmp_path / "other.csv", image_col="bild pfad", label_col="befund")
    assert [r.label for r in other.records] == ["Nävus"]  # its own columns, recognised as for any CSV
    with pytest.raises(Exception, match="no column 'bild pfad'"):
        open_source(tmp_path / "other.csv", image_col="bild pfad")


def test_the_version_and_output_that_is_not_a_terminal_does_not_wrap(tmp_path):
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"featcache {fc.__version__}"
    cache = tmp_path / "cache"
    run = _fit(cache)
    out = runner.invoke(app, ["compare", "--cache", str(cache), "--paths"])
    assert out.exit_code == 0 and str(run) in out.output, out.output  # the whole path on one line


def test_the_cache_line_counts_failed_images_apart(tmp_path):
    from featcache.data.sources import open_source
    from featcache.extraction.resume import cached_line, images_to_extract

    folder = tmp_path / "f" / "nevus"
    folder.mkdir(parents=True)
    for src in sorted((DEMO / "images" / "nevus").glob("*.jpg"))[:3]:
        shutil.copy(src, folder / src.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    fc.extract(tmp_path / "f", cache=tmp_path / "cache", quiet=True, engine="torch")
    source = open_source(tmp_path / "f")
    entry_dir = next((tmp_path / "cache").glob("f/*"))
    todo = images_to_extract(source, entry_dir)[0]
    assert cached_line(source, entry_dir, todo) == ("3 of 4 images cached, 1 failed at extraction (unreadable or "
                                                    "not an image; `featcache verify` lists them)")


@pytest.fixture
def demo_run(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "imgs"
    for label in ("melanoma", "nevus"):
        (folder / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[:12]:
            shutil.copy(src, folder / label / src.name)
    runs = fc.fit(folder, heads=["logreg", "knn"], cv=2, cache=tmp_path / "cache", quiet=True) \
        if fc.extract(folder, cache=tmp_path / "cache", quiet=True) else None
    return folder, runs


@pytest.mark.slow
def test_predict_never_overwrites_and_refusals_come_before_the_work(tmp_path, demo_run, monkeypatch):
    folder, runs = demo_run
    monkeypatch.chdir(tmp_path)
    logreg, knn = (r.path for r in runs)
    first = runner.invoke(app, ["predict", "--run", str(logreg), str(folder / "nevus")])
    second = runner.invoke(app, ["predict", "--run", str(logreg), str(folder / "melanoma")])
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    assert "predictions.csv" in first.output and "predictions-2.csv" in second.output
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 13  # the first file is kept
    again = runner.invoke(app, ["predict", "--run", str(logreg), "--out", "predictions.csv", str(folder)])
    assert again.exit_code == 2 and "predictions.csv exists" in again.output
    # a head without an ONNX form is refused before anything says it is exporting
    out = runner.invoke(app, ["export", str(knn), "--out", str(tmp_path / "m.onnx")])
    assert out.exit_code == 2 and "knn head does not export" in out.output and "exporting" not in out.output
    assert not (tmp_path / "m.onnx").exists()
    # too few test images to align: refused before the CV (no new run folder)
    before = set((tmp_path / "cache").rglob("metrics.json"))
    with pytest.raises(OptionError, match="24 images to score, too few"):
        fc.fit(folder, heads=["mlp"], cv=2, cache=tmp_path / "cache", test_data=folder, test_align="moments",
               quiet=True)
    assert set((tmp_path / "cache").rglob("metrics.json")) == before


@pytest.mark.slow
def test_audit_lists_a_lone_class_and_label_conflicts_first(tmp_path):
    folder = tmp_path / "imgs"
    lines = ["path,label"]
    for label in ("melanoma", "nevus"):
        (folder / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[:12]:
            shutil.copy(src, folder / label / src.name)
            lines.append(f"{label}/{src.name},{label}")
    # a typo (one image of 'nevsu') and a label conflict (a copy of a melanoma labelled nevus)
    lines[5] = lines[5].replace(",melanoma", ",nevsu")
    copied = lines[2].split(",")[0]
    shutil.copy(folder / copied, folder / "nevus" / "copy.jpg")
    lines.append("nevus/copy.jpg,nevus")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    fc.extract(folder, cache=tmp_path / "cache", quiet=True)
    out = fc.audit(folder, heads=["logreg"], cv=3, cache=tmp_path / "cache", quiet=True, out=tmp_path / "audit")
    with open(out / "label_issues.csv", newline="") as handle:
        issues = list(csv.DictReader(handle))
    assert [i["reason"].split(":")[0] for i in issues[:3]] == ["label conflict", "label conflict",
                                                              "class 'nevsu' has only 1 image (fewer than the 3 folds)"]
    assert {issues[0]["id"], issues[1]["id"]} == {copied, "nevus/copy.jpg"}
    assert issues[2]["suggested"] == "nevus" and "a typo of 'nevus'?" in issues[2]["reason"]
    with open(out / "outliers.csv", newline="") as handle:
        assert 0 <= float(next(csv.DictReader(handle))["percentile"]) <= 100


def test_python_keywords_equal_the_flags_and_errors_name_the_keyword(tmp_path):
    import inspect

    assert "no_groups" in inspect.signature(fc.fit).parameters and "no_groups : bool" in fc.fit.__doc__
    with pytest.raises(OptionError, match="no_groups=True contradicts group_col; give one"):
        fc.fit(tmp_path, no_groups=True, group_col="patient")
    with pytest.raises(OptionError, match="^heads=knnn: unknown"):
        fc.fit(tmp_path, heads="knnn")
    with pytest.raises(OptionError, match="^cv=1: must be at least 2"):
        fc.fit(tmp_path, cv=1)
    # the command line still names its flags
    out = runner.invoke(app, ["fit", "--data", str(tmp_path), "--head", "knnn"])
    assert out.exit_code == 2 and "--head knnn" in out.output


def test_entry_run_and_comparison_show_themselves_as_people_read_them(tmp_path):
    cache = tmp_path / "cache"
    run = fc.load_run(_fit(cache))
    comparison = fc.compare(cache=cache)
    page = comparison._repr_html_()
    score = read_metrics(run.path)["pooled"]
    shown = f"{score['balanced_accuracy']:.3f} [{score['ci95']['balanced_accuracy'][0]:.3f}, " \
            f"{score['ci95']['balanced_accuracy'][1]:.3f}]"
    assert shown in page and "ci_low" not in page and "<caption>" in page and "protocol: 3-fold" in page
    assert shown in repr(comparison) and "Row(" not in repr(comparison)
    assert shown in run._repr_html_() and shown in repr(run)


@pytest.mark.slow
def test_the_readme_python_quick_start_in_a_notebook_shows_progress_and_no_warnings(tmp_path):
    import re

    import nbformat
    from nbclient import NotebookClient

    from .conftest import REPO, SHARED, shared

    shared("ham70")
    block = re.search(r"## Quick start: Python\n\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    code = block.group(1).replace("../shared/data", str(SHARED)).replace('cache="c"', f'cache="{tmp_path / "c"}"')
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(line) for line in re.split(r"\n(?=\S)", code.strip())]
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    outputs = [o for cell in notebook.cells for o in cell.outputs]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)  # progress
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    # no third-party noise (Python warnings, rich's "install ipywidgets"); featcache's own findings, once each
    assert not re.search(r"\w+Warning\b|warnings\.warn|ipywidgets", text), text
    own = re.findall(r"warning:\S* (.{40})", text)
    assert len(own) == len(set(own)), own
    shown = [o["data"]["text/html"] for o in outputs if "featcache compare" in str(o.get("data", {}).get("text/html"))]
    assert shown and re.search(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", shown[0]) and "ci_low" not in shown[0]


def test_predict_onnx_with_test_align_is_refused_before_the_heavy_imports(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom featcache.cli import app\ntry:\n    app(['predict', '--onnx', 'm.onnx', '--test-align', "
            "'moments', '.'])\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "exit 2 False" in done.stdout and "--test-align" in done.stderr, done.stdout + done.stderr


def test_the_mlp_fits_a_set_too_small_for_a_stratified_early_stopping_split():
    from featcache.evaluation.heads import TorchMLPClassifier

    X = np.random.default_rng(0).normal(size=(17, 20))
    y = np.array(list("abcdefg") * 3)[:17]  # 7 classes, 17 rows: a 10 % split holds 2 (it raised from sklearn)
    assert TorchMLPClassifier().fit(X, y).predict_proba(X).shape == (17, 7)
