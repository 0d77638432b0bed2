"""Fault injection: damaged shards, full and read-only disks, Ctrl-C, a kill loop, foreign features.

After every fault the rule is the same: featcache says what happened, serves nothing stale, and a
rerun of the same command ends with features bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import featcache.store.entries as store
from featcache.data.sources import open_source
from featcache.errors import CacheError, EntryLocked, RunError
from featcache.evaluation.features import labeled_features
from featcache.evaluation.predict import predict_proba_from_entry
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.extraction.extract import extract
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.store.entries import CacheEntry, EntryLock
from featcache.store.model_files import load_model
from featcache.store.verify import verify_entry

from .conftest import shared


def _same_features(a: CacheEntry, b: CacheEntry) -> None:
    assert a.fingerprint == b.fingerprint and sorted(a.ids) == sorted(b.ids)
    np.testing.assert_array_equal(a.read("gap", b.ids), b.read("gap", b.ids))


def _extract(source, lite0, root, engine="torch", input_size=None):
    # the store's faults; an engine's export is one more file (tested below)
    return extract(source, lite0, FeatureRecipe(engine=engine, input_size=input_size),
                   ExecutionPlan(workers=0, batch_size=4, shard_size=4), root)


def test_verify_names_each_damage_and_repair_lets_extract_redo_only_that(small_folder, lite0, tmp_path):
    source = open_source(small_folder)
    reference = _extract(source, lite0, tmp_path / "reference").entry
    entry = _extract(source, lite0, tmp_path / "cache").entry
    shards = entry.shard_paths()
    assert len(shards) == 3 and verify_entry(entry.path).ok

    shards[0].write_bytes(shards[0].read_bytes()[:3000])  # a torn write from outside featcache
    with h5py.File(shards[1], "r+") as h5:  # a NaN row, as a bad GPU kernel or bit rot would leave
        h5["features/gap"][0, :5] = np.nan
    (entry.path / ".shard-00007.h5.tmp-4242").write_bytes(b"partial")
    changed = sorted((small_folder / "nevus").glob("*.jpg"))[-1]
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)

    with pytest.raises(CacheError, match="verify --repair"):
        CacheEntry(entry.path).state()
    report = verify_entry(entry.path)
    text = "\n".join(f.line() for f in report.findings)
    assert not report.ok
    assert "shard-00000.h5: cannot be opened" in text
    assert "shard-00001.h5: 1 rows of features/gap hold NaN/Inf" in text
    assert ".shard-00007.h5.tmp-4242: unfinished file" in text
    assert "image files not checked" in " ".join(report.notes)

    fixed = verify_entry(entry.path, repair=True)
    assert {"dropped shard-00000.h5", "dropped shard-00001.h5", "deleted .shard-00007.h5.tmp-4242"} \
        <= set(fixed.repaired)
    after = verify_entry(entry.path)
    text = "\n".join(f.line() for f in after.findings)
    assert "1 files changed since their features were extracted" in text and changed.name in text
    assert "8 images of the source are not in the entry yet" in text

    rerun = _extract(source, lite0, tmp_path / "cache")
    assert rerun.extracted == 8 + 1  # the two dropped shards, and the changed image
    assert verify_entry(rerun.entry.path).ok
    unchanged = [i for i in reference.ids if not i.endswith(changed.name)]
    np.testing.assert_array_equal(rerun.entry.read("gap", unchanged), reference.read("gap", unchanged))


def test_shard_from_another_entry_is_flagged(small_folder, lite0, tmp_path):
    entry = _extract(open_source(small_folder), lite0, tmp_path).entry
    with h5py.File(entry.shard_paths()[-1], "r+") as h5:
        h5.attrs["fingerprint"] = "0123456789abcdef"
    report = verify_entry(entry.path, check_files=False)
    assert not report.ok and "belongs to another entry (fingerprint 0123456789abcdef" in report.findings[0].what


def test_disk_full_while_writing_a_shard(small_folder, lite0, tmp_path, monkeypatch):
    source = open_source(small_folder)
    reference = _extract(source, lite0, tmp_path / "reference").entry
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync_until_full(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the second shard's data: delayed allocation reports ENOSPC here
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync_until_full)
    with pytest.raises(CacheError, match="No space left on device.*rerun the same command to resume"):
        _extract(source, lite0, tmp_path / "cache")
    monkeypatch.undo()
    (entry_dir,) = (tmp_path / "cache").glob("*/*/")
    assert [p.name for p in entry_dir.glob("*.h5*")] == ["shard-00000.h5"]
    assert not list(entry_dir.glob(".*tmp-*")) and verify_entry(entry_dir, check_files=False).ok
    rerun = _extract(source, lite0, tmp_path / "cache")
    assert (rerun.extracted, rerun.skipped) == (8, 4)
    _same_features(rerun.entry, reference)


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(small_folder, lite0, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    source = open_source(small_folder)
    reference = _extract(source, lite0, tmp_path / "reference").entry
    small = tmp_path / "small"
    small.mkdir()
    if not _mount(["-t", "tmpfs", "-o", "size=40k", "tmpfs", str(small)]):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        with pytest.raises(CacheError, match="rerun the same command to resume"):
            _extract(source, lite0, small)
        (entry_dir,) = small.glob("*/*/")
        assert not list(entry_dir.glob(".*tmp-*")), "a failed write leaves no temporary"
        assert verify_entry(entry_dir, check_files=False).ok
        with pytest.raises(CacheError, match="ONNX export of efficientnet_lite0 .* failed .*free space"):
            _extract(source, lite0, small, engine="openvino")  # the 18 MB export does not fit either
        assert not list((small / ".engines").iterdir()), "a failed export leaves no temporary"
        shutil.copytree(small, tmp_path / "bigger")  # the user moves the cache to a larger disk
    finally:
        subprocess.run(["umount", str(small)], check=True)
    rerun = _extract(source, lite0, tmp_path / "bigger")
    assert rerun.extracted < 12
    _same_features(rerun.entry, reference)


def test_read_only_cache(small_folder, lite0, tmp_path):
    source = open_source(small_folder)
    root = tmp_path / "cache"
    full = _extract(source, lite0, root).entry
    if os.geteuid() == 0:
        if not (_mount(["--bind", str(root), str(root)]) and _mount(["-o", "remount,ro,bind", str(root)])):
            pytest.skip("cannot make a read-only bind mount here")
    else:
        subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    try:
        again = _extract(source, lite0, root)  # everything is there: usable read-only
        assert again.extracted == 0 and "read-only" in again.notes[-1]
        assert verify_entry(full.path).ok
        data = labeled_features(source, full, "gap")  # features are readable; a run cannot be saved
        with pytest.raises(RunError, match="cannot write the run to .*copy the cache to a writable folder"):
            fit_head(data, full, "majority", "gap", Protocol(cv=2), source.name)
        Image.open(next(small_folder.rglob("*.jpg"))).save(small_folder / "nevus" / "new.jpg")
        with pytest.raises(CacheError, match=r"read-only and 1 of 13 images still need extracting.*--cache"):
            _extract(open_source(small_folder), lite0, root)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(root)], check=True)
        else:
            subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)


def test_fallback_lock_on_a_file_system_without_posix_locks(tmp_path, monkeypatch):
    def no_posix_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store.fcntl, "lockf", no_posix_locks)
    entry = tmp_path / "entry"
    with EntryLock(entry):
        held = (entry / ".lock.held").read_text()
        assert held.startswith(f"pid {os.getpid()} on ")
        with pytest.raises(EntryLocked, match=f"pid {os.getpid()}"):  # a live holder refuses
            with EntryLock(entry):
                pass
    assert not (entry / ".lock.held").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (entry / ".lock.held").write_text(held.replace(f"pid {os.getpid()}", f"pid {dead.pid}"))
    with EntryLock(entry):  # the holder died on this host: cleared without asking
        pass
    (entry / ".lock.held").write_text("pid 12 on some-other-host since 2026-01-01T00:00:00 (featcache)")
    with pytest.raises(EntryLocked, match="some-other-host.*--break-lock"):
        with EntryLock(entry):
            pass
    with EntryLock(entry, break_lock=True):
        pass


def test_saved_head_refuses_features_made_differently(small_folder, lite0, tmp_path):
    source = open_source(small_folder)
    entry = _extract(source, lite0, tmp_path).entry
    data = labeled_features(source, entry, "gap")
    run = fit_head(data, entry, "logreg", "gap", Protocol(cv=2), source.name)
    saved = load_model(run)
    assert predict_proba_from_entry(saved, entry, entry.ids).shape == (12, 2)
    other = _extract(source, lite0, tmp_path, input_size=192).entry
    with pytest.raises(RunError, match=f"fingerprint {other.fingerprint} but this head was trained on "
                                       f"{entry.fingerprint}"):
        predict_proba_from_entry(saved, other, other.ids)


def _extract_cmd(data: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--cache", str(cache),
            "--backbone", "efficientnet_lite0", "--shard-size", "8", "--batch-size", "4", "--workers", "1", "-q"]


@pytest.fixture(scope="module")
def ham70_reference(tmp_path_factory):
    data = shared("ham70")
    root = tmp_path_factory.mktemp("reference")
    started = time.perf_counter()
    subprocess.run(_extract_cmd(data, root), check=True, timeout=600, capture_output=True)
    return data, CacheEntry(next(root.glob("*/*/"))), time.perf_counter() - started


@pytest.mark.slow
@pytest.mark.parametrize("path", ["full", "lean"])
def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(ham70_reference, tmp_path, tmp_path_factory, path):
    data, reference, _ = ham70_reference
    if path == "lean":  # an entry begun before on the exported engine: the rest runs without PyTorch
        seed = tmp_path_factory.mktemp("seed") / data.name
        first = sorted(data.rglob("*.jpg"))[0]
        (seed / first.parent.name).mkdir(parents=True)
        shutil.copy2(first, seed / first.parent.name / first.name)
        subprocess.run(_extract_cmd(seed, tmp_path), check=True, timeout=600, capture_output=True)
    # A shell running the tests in the background ignores SIGINT for its children; a user's Ctrl-C
    # reaches a process with the default handler, which is what this test is about.
    command = _extract_cmd(data, tmp_path)[:-1] if path == "lean" else _extract_cmd(data, tmp_path)  # says its path
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and len(list(tmp_path.glob("*/*/shard-*.h5"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert ("without PyTorch" in err) == (path == "lean"), err
    rerun = subprocess.run(_extract_cmd(data, tmp_path), check=True, capture_output=True, text=True, timeout=600)
    cached = int(re.search(r"(\d+) already cached", rerun.stdout).group(1))
    seeded = 1 if path == "lean" else 0
    assert 16 <= cached - seeded < 70 and (cached - seeded) % 8 == 0, rerun.stdout  # whole shards before Ctrl-C
    _same_features(CacheEntry(next(tmp_path.glob("*/*/"))), reference)


@pytest.mark.slow
def test_twenty_random_sigkills_never_leave_wrong_or_unfinished_work(ham70_reference, tmp_path):
    data, reference, full_seconds = ham70_reference
    expected = {i: row for i, row in zip(reference.ids, reference.read("gap"), strict=True)}
    rng = random.Random(20261123)
    kills, completed = [], 0
    while len(kills) < 20:
        proc = subprocess.Popen(_extract_cmd(data, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.2, full_seconds)
        try:
            proc.wait(timeout=delay)
            completed += 1
            shutil.rmtree(tmp_path / reference.manifest["dataset"])  # start over to keep killing mid-way
            continue
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills.append(round(delay, 2))
        entries = list(tmp_path.glob("*/*/manifest.json"))
        if not entries:
            continue  # killed before the entry existed
        entry_dir = entries[0].parent
        report = verify_entry(entry_dir, check_files=False)
        assert report.ok, (kills, [f.line() for f in report.findings])
        stray = [p.name for p in entry_dir.iterdir() if not (
            p.name.startswith(("shard-", "manifest.json", ".lock")) or store.TEMP_MARK in p.name)]
        assert not stray, (kills, stray)
        committed = CacheEntry(entry_dir)
        for image_id, row in zip(committed.ids, committed.read("gap"), strict=True):
            np.testing.assert_array_equal(row, expected[image_id], err_msg=f"after kills at {kills}")
    subprocess.run(_extract_cmd(data, tmp_path), check=True, capture_output=True, timeout=600)
    final = CacheEntry(next(tmp_path.glob("*/*/")))
    assert not list(final.path.glob(".*tmp-*"))
    _same_features(final, reference)
    assert len(kills) == 20


def test_after_an_interrupt_only_the_dying_workers_connection_errors_are_silenced(monkeypatch, capsys):
    """multiprocessing's fd-sharing thread reports through sys.excepthook; after Ctrl-C its
    ConnectionResetError (workers killed mid-handshake) must not print a traceback, anything else must."""
    import sys

    from featcache.extraction.loader import _quiet_worker_teardown

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    _quiet_worker_teardown()
    for error in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(), EOFError()):
        sys.excepthook(type(error), error, None)
    assert capsys.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("a real bug"), None)
    assert "a real bug" in capsys.readouterr().err
