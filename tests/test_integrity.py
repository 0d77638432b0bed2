"""Integrity end to end: every stored byte checked where it is used, nothing dropped silently, nothing hangs.

Each test reproduces one way the hostile probe got wrong numbers with exit code 0, and checks that it now
ends in correct features or a one-line refusal.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featcache as fc
from featcache.cli import app
from featcache.data.sources import open_source
from featcache.errors import CacheError, FeatcacheError, RunError
from featcache.extraction.extract import extract
from featcache.net import check_tracking_uri
from featcache.progress import Reporter
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.store import verify as verify_module
from featcache.store.entries import MANIFEST, CacheEntry
from featcache.store.verify import verify_entry
from featcache.study import StudyError, load_study, parse_study

from .conftest import DEMO, flip_one_feature_bit

runner = CliRunner()


def _copy(folder: Path, target: Path) -> Path:
    """The same image files under another dataset name (what reuse copies features between)."""
    shutil.copytree(folder, target)
    return target


# --- 1. a damaged engine export -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("damage", ["zeroed block", "truncated"])
def test_a_damaged_onnx_export_is_rebuilt_and_gives_the_clean_features(small_folder, tmp_path, lite0, capfd, damage):
    cache = tmp_path / "cache"
    first = extract(open_source(small_folder), lite0, cache_root=cache, recipe=FeatureRecipe(engine="onnxruntime"),
                    plan=ExecutionPlan(workers=0)).entry
    [export] = (cache / ".engines").glob("*.onnx")
    raw = bytearray(export.read_bytes())
    if damage == "zeroed block":
        raw[len(raw) // 2:len(raw) // 2 + 65536] = bytes(65536)
    else:
        raw = raw[:len(raw) // 3]
    export.write_bytes(bytes(raw))
    other = tmp_path / "other_clinic"  # images the first extraction did not see: the engine must run
    for label in ("melanoma", "nevus"):
        (other / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[6:10]:
            shutil.copy(src, other / label / src.name)
    capfd.readouterr()
    again = extract(open_source(other), lite0, cache_root=cache, recipe=FeatureRecipe(engine="onnxruntime"),
                    plan=ExecutionPlan(workers=0))
    assert "does not match the checksum recorded at export" in capfd.readouterr().err
    assert again.extracted == 8 and again.reused == 0
    clean = extract(open_source(other), lite0, cache_root=tmp_path / "clean",
                    recipe=FeatureRecipe(engine="onnxruntime"), plan=ExecutionPlan(workers=0)).entry
    assert clean.fingerprint == again.entry.fingerprint
    np.testing.assert_array_equal(again.entry.read("gap"), clean.read("gap", again.entry.ids))
    assert first.fingerprint == again.entry.fingerprint  # the same name, now with the right features


# --- 2. a bit-rotted shard ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_bit_rotted_shard_is_refused_by_fit_and_never_copied_into_a_new_entry(small_folder, tmp_path, lite0, capfd):
    cache = tmp_path / "cache"
    source = open_source(small_folder)
    entry = extract(source, lite0, cache_root=cache, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0, shard_size=6)).entry
    clean = entry.read("gap")
    flip_one_feature_bit(entry)
    with pytest.raises(CacheError, match=r"no longer match the checksum .* verify --repair"):
        fc.fit(small_folder, heads=["logreg"], cv=3, cache=cache, engine="torch", quiet=True)
    other = extract(open_source(_copy(small_folder, tmp_path / "other_clinic")), lite0, cache_root=cache,
                    reporter=Reporter(), recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0, shard_size=6))
    assert "not reusing features from" in capfd.readouterr().err
    assert other.reused == 0 and other.extracted == 12  # nothing is copied from a damaged entry: all redone
    np.testing.assert_allclose(other.entry.read("gap", entry.ids), clean, atol=1e-3)
    assert verify_entry(other.entry.path, check_files=False).ok


# --- 3. test classes the training set lacks -----------------------------------------------------

@pytest.mark.slow
def test_test_images_of_a_class_the_model_never_saw_are_refused_with_the_way_out(small_folder, tmp_path, lite0):
    cache = tmp_path / "cache"
    test = _copy(small_folder, tmp_path / "hospital_b")
    (test / "nevus").rename(test / "carcinoma")  # 6 nevus images now of a class the training set lacks
    extract(open_source(small_folder), lite0, cache_root=cache, recipe=FeatureRecipe(engine="torch"),
            plan=ExecutionPlan(workers=0))
    with pytest.raises(RunError, match=r"6 of 12 test images .*carcinoma \(6\).*classes=melanoma"):
        fc.fit(small_folder, heads=["logreg"], cv=3, cache=cache, engine="torch", test_data=test, quiet=True)
    study = {"data": {"train": str(small_folder), "test": str(test)}, "extract": {"backbones": ["efficientnet_lite0"]},
             "fit": {"heads": ["logreg"], "cv": 3}}
    with pytest.raises(RunError, match="carcinoma"):
        fc.run_study(study, cache=cache, dry_run=True, quiet=True)
    (test / "melanoma").rename(test / "benign")  # no class shared at all: the same one line, not a traceback
    out = runner.invoke(app, ["fit", "--data", str(small_folder), "--test-data", str(test), "--cache", str(cache),
                              "--engine", "torch", "--head", "logreg", "--cv", "3"])
    assert out.exit_code == 2 and "no class is shared" in out.output and "Traceback" not in out.output


# --- 4. repair never destroys what it cannot judge ----------------------------------------------

@pytest.mark.slow
def test_repair_leaves_a_shard_it_cannot_read_alone(small_folder, tmp_path, lite0, monkeypatch):
    entry = extract(open_source(small_folder), lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0, shard_size=6)).entry
    locked = entry.shard_paths()[1]
    real_open = open

    def no_permission(path, *args, **kwargs):  # root reads any file: refuse this one as the OS would
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(verify_module, "open", no_permission, raising=False)
    report = verify_entry(entry.path, repair=True, check_files=False)
    assert locked.exists() and not any("dropped" in line for line in report.repaired)
    assert not report.ok and any("Permission denied" in f.what and "leaves it alone" in f.what
                                 for f in report.findings)


# --- 5. a damaged manifest ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_truncated_manifest_is_one_line_everywhere_and_repair_rebuilds_it_keeping_the_runs(small_folder, tmp_path,
                                                                                             lite0):
    cache = tmp_path / "cache"
    entry = extract(open_source(small_folder), lite0, cache_root=cache, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0)).entry
    [run] = fc.fit(small_folder, heads=["logreg"], cv=3, cache=cache, engine="torch", quiet=True)
    original = (entry.path / MANIFEST).read_text()
    (entry.path / MANIFEST).write_text(original[:len(original) // 2])
    for args in (["extract", "--data", str(small_folder), "--engine", "torch"],
                 ["fit", "--data", str(small_folder), "--engine", "torch", "--head", "logreg", "--cv", "3"]):
        out = runner.invoke(app, [*args, "--cache", str(cache)])
        assert out.exit_code == 2 and "verify --repair" in out.output and "Traceback" not in out.output, out.output
    out = runner.invoke(app, ["predict", "--run", str(run.path), str(next(small_folder.rglob("*.jpg"))),
                              "--cache", str(cache), "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 2 and "verify --repair" in out.output, out.output
    assert runner.invoke(app, ["verify", str(entry.path)]).exit_code == 1
    out = runner.invoke(app, ["verify", str(entry.path), "--repair", "--quick"])
    assert out.exit_code == 0 and "rebuilt manifest.json from the shards (it was damaged" in out.output, out.output
    assert run.path.is_dir()  # runs are never removed
    rebuilt = CacheEntry(entry.path)
    assert rebuilt.fingerprint == entry.fingerprint and rebuilt.ids == entry.ids


# --- 6. outside services fail fast --------------------------------------------------------------

@pytest.mark.parametrize("uri, message", [
    ("sqlite:///", "in-memory SQLite store vanishes"),
    ("sqlite://", "in-memory SQLite store vanishes"),
    ("sqlite:////no/such/folder/runs.db", "does not exist or cannot be written"),
    ("http://127.0.0.1:9/", "nothing answers at 127.0.0.1:9"),
])
def test_a_tracking_store_that_would_lose_or_hang_is_refused_at_once(tmp_path, uri, message):
    started = time.perf_counter()
    with pytest.raises(FeatcacheError, match=message):
        check_tracking_uri(uri, tmp_path)
    assert time.perf_counter() - started < 10
    check_tracking_uri(f"sqlite:///{tmp_path / 'runs.db'}", tmp_path)  # a file in a writable folder is fine


@pytest.mark.slow
def test_fit_refuses_an_unusable_tracking_store_before_fitting(small_folder, tmp_path, lite0):
    extract(open_source(small_folder), lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
            plan=ExecutionPlan(workers=0))
    out = runner.invoke(app, ["fit", "--data", str(small_folder), "--cache", str(tmp_path), "--engine", "torch",
                              "--head", "logreg", "--cv", "3", "--mlflow-uri", "sqlite:///"])
    assert out.exit_code == 2 and "vanishes" in out.output
    assert not list(tmp_path.glob("*/*/runs/*"))  # refused before any work


@pytest.mark.slow
def test_a_ray_address_nothing_answers_at_is_one_line_within_seconds(small_folder, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'featcache[ray]'")
    started = time.perf_counter()
    out = runner.invoke(app, ["extract", "--data", str(small_folder), "--cache", str(tmp_path),
                              "--ray", "127.0.0.1:1"])
    assert out.exit_code == 2 and "nothing answers at 127.0.0.1:1" in out.output, out.output
    assert time.perf_counter() - started < 30


# --- 7. the smaller ones ------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ({"data": {"classes": [1, 2]}}, r"\[data\] classes = \[1, 2\]: expected a list of names"),
    ({"extract": {"weights": {"efficientnet_lite0": 5}}}, r"\[extract\] weights.efficientnet_lite0 = 5: expected"),
    ({"compare": {"metric": "auroc:nosuchclass"}}, None),
])
def test_study_values_of_the_wrong_inner_type_are_one_error(small_folder, tmp_path, extra, message):
    study = {"data": {"train": str(small_folder)}, "extract": {"backbones": ["efficientnet_lite0"]},
             "fit": {"heads": ["logreg"], "cv": 3}}
    for table, values in extra.items():
        study[table] = {**study.get(table, {}), **values}
    if message:
        with pytest.raises(StudyError, match=message):
            parse_study(study)
    else:  # which classes exist is known from the data: checked by the plan, before any work
        with pytest.raises(StudyError, match="no class 'nosuchclass'; its classes are melanoma, nevus"):
            fc.run_study(study, cache=tmp_path, dry_run=True, quiet=True)


def test_a_utf16_study_file_is_one_error(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[data]\ntrain = "."\n', encoding="utf-16")
    with pytest.raises(StudyError, match="not UTF-8 text"):
        load_study(path)


@pytest.mark.slow
def test_predict_on_images_that_all_fail_is_one_line(small_folder, tmp_path, lite0):
    extract(open_source(small_folder), lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
            plan=ExecutionPlan(workers=0))
    [run] = fc.fit(small_folder, heads=["logreg"], cv=3, cache=tmp_path, engine="torch", quiet=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    for k in range(2):
        (broken / f"scan{k}.jpg").write_bytes(b"not a jpeg at all")
    out = runner.invoke(app, ["predict", "--run", str(run.path), str(broken), "--cache", str(tmp_path),
                              "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 2 and "none of the 2 images could be read" in out.output, out.output


def test_a_backbone_named_twice_is_refused(small_folder, tmp_path):
    out = runner.invoke(app, ["fit", "--data", str(small_folder), "--cache", str(tmp_path),
                              "--backbone", "efficientnet_lite0+efficientnet_lite0"])
    assert out.exit_code == 2 and "named twice" in out.output
    with pytest.raises(StudyError, match="names a backbone twice"):
        parse_study({"data": {"train": str(small_folder)}, "fit": {"heads": ["logreg"]},
                     "extract": {"backbones": ["squeezenet1_1", "squeezenet1_1"]}})


@pytest.mark.slow
def test_verify_fails_when_a_listed_shard_is_missing(small_folder, tmp_path, lite0):
    entry = extract(open_source(small_folder), lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0, shard_size=6)).entry
    entry.shard_paths()[0].unlink()
    out = runner.invoke(app, ["verify", str(entry.path), "--quick"])
    assert out.exit_code == 1 and "missing: shard-00000.h5" in out.output, out.output


@pytest.mark.slow
def test_a_file_rewritten_with_the_same_size_and_time_is_found_and_rehash_redoes_it(small_folder, tmp_path, lite0):
    source = open_source(small_folder)
    entry = extract(source, lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0)).entry
    victim = sorted(small_folder.rglob("*.jpg"))[0]
    other = sorted(small_folder.rglob("*.jpg"))[-1]
    stat = victim.stat()
    data = other.read_bytes()[:stat.st_size].ljust(stat.st_size, b"\0")  # same size, other picture
    victim.write_bytes(data)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same modification time
    report = verify_entry(entry.path, source)
    assert any("--rehash" in f.fix for f in report.findings), [f.line() for f in report.findings]
    assert extract(source, lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
                   plan=ExecutionPlan(workers=0)).extracted == 0
    again = extract(source, lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0, rehash=True))
    assert again.extracted == 1
    assert verify_entry(entry.path, source).ok


@pytest.mark.slow
def test_verify_exits_non_zero_whenever_it_reports_anything(small_folder, tmp_path, lite0):
    entry = extract(open_source(small_folder), lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0)).entry
    assert runner.invoke(app, ["verify", str(entry.path)]).exit_code == 0
    (entry.path / ".shard-00009.h5.tmp-999").write_bytes(b"half a shard")  # a dead writer's leftover: a warning
    out = runner.invoke(app, ["verify", str(entry.path)])
    assert out.exit_code == 1 and "WARNINGS" in out.output, out.output
