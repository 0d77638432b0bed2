"""A cache written by featcache at commit 0fb023b (before a run was named by what trained it alone) is served:
no entry made again, no run without held-out data made again, every old run still listed and readable; and a
held-out setting changed on a trained run scores its saved model without cross-validating again.

The fixture (tests/fixtures/cache_0fb023b.tar.gz) was made at 0fb023b from 30 + 32 of the shipped demo images:
``extract`` of both CSVs; ``fit --head logreg,mlp,knn --cv 3``; ``fit --head logreg --cv 3 --test-data
clinic.csv --test-align moments --conformal 0.9``. Its CSVs point at ``images/<file>``, which the test fills
with the same demo images.
"""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from featcache.store.naming import HELDOUT, find_runs, trained_run

FIXTURE = Path(__file__).parent / "fixtures" / "cache_0fb023b.tar.gz"
DEMO = Path(__file__).resolve().parents[1] / "featcache" / "data" / "isic_cc0_demo200" / "images"
OLD_RUNS = {"knn-gap-5faa9c813a1b", "logreg-gap-002feef7aa8c", "logreg-gap-b69ff731c5ae", "mlp-gap-06b1bfa66618"}
OLD_TEST_RUN = "logreg-gap-b69ff731c5ae"


@pytest.fixture
def old_cache(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path / "data", filter="data")
    (tmp_path / "data" / "images").mkdir()
    for name in ("train.csv", "clinic.csv"):
        for row in csv.DictReader(open(tmp_path / "data" / name)):
            shutil.copy(DEMO / row["label"] / Path(row["path"]).name, tmp_path / "data" / row["path"])
    return tmp_path / "data"


def _runs(cache: Path) -> set[str]:
    return {p.name for p in (cache / "data-train").glob("*/runs/*") if not p.name.startswith(".")}


def _entries(cache: Path) -> set[Path]:
    return {p for p in cache.glob("data-*/*") if p.is_dir()}


def test_a_cache_of_0fb023b_is_served_without_extracting_or_fitting_again(old_cache: Path) -> None:
    import featcache as fc

    cache = old_cache / "cache"
    entries = _entries(cache)
    assert _runs(cache) == OLD_RUNS
    result = fc.extract(old_cache / "train.csv", cache=cache)
    assert result.path in entries
    assert _entries(cache) == entries  # no entry made again
    before = {p: p.stat().st_mtime_ns for p in (cache / "data-train").rglob("metrics.json")}
    runs = fc.fit(old_cache / "train.csv", cache=cache, heads=["logreg", "mlp", "knn"], cv=3)
    assert {r.path.name for r in runs} == OLD_RUNS - {OLD_TEST_RUN}  # each reused, by its old name
    assert {p: p.stat().st_mtime_ns for p in (cache / "data-train").rglob("metrics.json")} == before
    listed = fc.compare(cache=cache).to_pandas()
    assert len(listed) == 4  # every old run, the one with its held-out set too
    old = next(r for r in find_runs(cache) if r.name == OLD_TEST_RUN)
    assert fc.load_run(old).metrics["test"]["test_align"] == "moments"
    frame = fc.load_run(old).predict([DEMO / "nevus" / next(iter(sorted(p.name for p in (DEMO / "nevus").iterdir())))])
    assert len(frame) == 1


def test_held_out_settings_score_the_trained_run_without_cross_validating_again(old_cache: Path) -> None:
    import featcache as fc

    cache = old_cache / "cache"
    common = {"cache": cache, "heads": ["logreg"], "cv": 3, "test_data": old_cache / "clinic.csv", "conformal": 0.9}
    moments = fc.fit(old_cache / "train.csv", test_align="moments", **common)[0].path
    run = trained_run(moments)
    assert moments.parent == run / HELDOUT and run.name not in OLD_RUNS  # the old test run is named otherwise
    cv_written = (run / "metrics.json").stat().st_mtime_ns
    plain = fc.fit(old_cache / "train.csv", test_align="none", **common)[0].path
    assert trained_run(plain) == run and plain != moments  # one run, two held-out evaluations
    assert (run / "metrics.json").stat().st_mtime_ns == cv_written  # cross-validated once
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (moments, plain))
    assert a["pooled"] == b["pooled"] and a["test"]["test_align"] == "moments" and "test_align" not in b["test"]
    # the same scores as the run of 0fb023b made by cross-validating with the held-out set inside the run
    old = json.loads((run.parent / OLD_TEST_RUN / "metrics.json").read_text())
    assert a["pooled"] == old["pooled"] and a["conformal"] == old["conformal"]
    for key in ("balanced_accuracy", "auroc", "ci95", "unaligned", "conformal", "shift", "neighbours"):
        assert a["test"][key] == old["test"][key], key
    # the evaluation's files are what its scores are recomputed from, its model is the run's
    run_view = fc.load_run(moments)
    assert run_view.test is not None and len(run_view.test) == 32
    assert len(run_view.oof) == 30
    # run without held-out data: the run folder itself, named as before the change
    assert fc.fit(old_cache / "train.csv", cache=cache, heads=["logreg"], cv=3, conformal=0.9)[0].path == run


def test_a_run_or_evaluation_being_written_is_not_listed(tmp_path: Path) -> None:
    run = tmp_path / "ds" / "e-1" / "runs" / "logreg-gap-1"
    for folder in (run, run / HELDOUT / "t-1", run.parent / ".logreg-gap-2.tmp-9", run / HELDOUT / ".t-2.tmp-9"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text("{}")  # a hidden folder holds it before it is renamed into place
    assert find_runs(tmp_path) == [run / HELDOUT / "t-1"]
    assert trained_run(find_runs(tmp_path)[0]) == run
