"""--ray: extraction and head fitting on a Ray cluster (a local one, started by these tests, 2 CPUs)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from featcache.backbones.models import load_backbone
from featcache.cli import app
from featcache.data.sources import open_source
from featcache.errors import FeatcacheError
from featcache.evaluation.fitting import fit_many
from featcache.evaluation.protocol import Protocol, RunRecipe
from featcache.extraction.extract import extract
from featcache.recipes import ExecutionPlan, FitPlan
from featcache.store.entries import TEMP_MARK
from featcache.store.runs import read_metrics

from .conftest import DEMO

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'featcache[ray]'")


pytestmark = pytest.mark.slow  # Ray clusters and kill loops: outside the fast tier


@pytest.fixture(scope="module")
def cluster():
    from featcache.extraction.ray import RayCluster

    started = RayCluster("local")
    yield started
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The local path with one torch thread, as each CPU actor runs: same kernels, same bytes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _demo_folder(root: Path, per_class: int) -> Path:
    for label in ("melanoma", "nevus"):
        (root / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[:per_class]:
            shutil.copy(src, root / label / src.name)
    return root


def test_extract_and_fit_on_ray_equal_the_local_path(cluster, small_folder, tmp_path, one_thread):
    source = open_source(small_folder)
    local = extract(source, load_backbone("squeezenet1_1"), cache_root=tmp_path / "local",
                    plan=ExecutionPlan(workers=0)).entry
    on_ray = extract(source, load_backbone("squeezenet1_1"), cache_root=tmp_path / "ray",
                     plan=ExecutionPlan(cluster=cluster)).entry
    assert on_ray.fingerprint == local.fingerprint
    assert sorted(on_ray.ids) == sorted(local.ids)
    assert np.array_equal(on_ray.read("gap", local.ids), local.read("gap"))
    assert on_ray.manifest["provenance"]["cluster"].startswith("Ray ")
    cluster.actors = 2  # as many actors as cores: they must still leave room for the decode tasks
    try:
        two = extract(source, load_backbone("squeezenet1_1"), cache_root=tmp_path / "ray2",
                      plan=ExecutionPlan(cluster=cluster)).entry
    finally:
        cluster.actors = None
    assert np.array_equal(two.read("gap", local.ids), local.read("gap"))
    protocol = Protocol(cv=3, groups="none")
    heads = ["logreg", "mlp"]
    local_runs = fit_many(source, local, RunRecipe(tuple(heads), protocol, "gap"))
    ray_runs = fit_many(source, on_ray, RunRecipe(tuple(heads), protocol, "gap"), plan=FitPlan(cluster=cluster))
    for a, b in zip(local_runs, ray_runs, strict=True):
        assert a.name == b.name  # the same run identity
        assert read_metrics(a)["pooled"] == read_metrics(b)["pooled"]
        assert read_metrics(a)["per_fold"] == read_metrics(b)["per_fold"]


def _actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"BackboneActor" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_a_killed_ray_worker_is_restarted_and_nothing_is_lost_or_stored_twice(cluster, tmp_path, one_thread):
    source = open_source(_demo_folder(tmp_path / "images", 20))
    entry_dir: list[Path] = []
    killed: list[int] = []

    def kill_the_actor_after_the_first_shard() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            shards = list((tmp_path / "cache").glob("*/*/shard-*.h5"))
            pids = _actor_pids()
            if shards and pids:
                entry_dir.append(shards[0].parent)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_actor_after_the_first_shard, daemon=True)
    killer.start()
    result = extract(source, load_backbone("squeezenet1_1"), cache_root=tmp_path / "cache",
                     plan=ExecutionPlan(cluster=cluster, shard_size=8, batch_size=4))
    killer.join(5)
    assert killed, "the backbone actor was never seen, so never killed"
    entry = result.entry
    assert not entry.failed and sorted(entry.ids) == sorted(r.id for r in source.records)
    assert len(entry.ids) == len(set(entry.ids)) == 40  # none lost, none twice
    local = extract(source, load_backbone("squeezenet1_1"), cache_root=tmp_path / "local",
                    plan=ExecutionPlan(workers=0, batch_size=4)).entry
    assert np.array_equal(entry.read("gap", local.ids), local.read("gap"))


def test_a_killed_driver_leaves_whole_shards_and_a_rerun_resumes(cluster, tmp_path):
    """`featcache extract --ray auto` joins this test's cluster; SIGKILL it after its first shard."""
    import subprocess

    images = _demo_folder(tmp_path / "images", 20)
    command = [sys.executable, "-m", "featcache.cli", "extract", "--backbone", "squeezenet1_1", "--data", str(images),
               "--ray", "auto", "--shard-size", "8", "--batch-size", "4", "--cache", str(tmp_path / "cache"), "-q"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not list(tmp_path.glob("cache/*/*/shard-*.h5")):
        time.sleep(0.05)
    assert driver.poll() is None, driver.stdout.read().decode()[-2000:]
    driver.kill()
    driver.wait(30)
    entry_dir = next(tmp_path.glob("cache/*/*/shard-*.h5")).parent
    committed = sorted(p.name for p in entry_dir.glob("shard-*.h5"))
    assert 1 <= len(committed) < 5  # killed part-way: 40 images make 5 shards of 8
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    from featcache.store.entries import CacheEntry

    entry = CacheEntry(entry_dir)
    assert len(entry.ids) == len(set(entry.ids)) == 40 and not entry.failed
    assert not [p for p in entry_dir.iterdir() if TEMP_MARK in p.name]  # no half-written shard left


def test_a_node_that_cannot_see_the_images_is_named(cluster, small_folder, tmp_path):
    source = open_source(small_folder)
    moved = small_folder.with_name("elsewhere")
    small_folder.rename(moved)  # as on a node without the shared file system
    with pytest.raises(FeatcacheError, match="cannot see .*shared file system"):
        extract(source, load_backbone("squeezenet1_1"), cache_root=tmp_path / "cache",
                plan=ExecutionPlan(cluster=cluster))


def test_gpu_actors_only_where_the_cluster_has_gpus(cluster):
    assert cluster.device("auto").type == ("cuda" if cluster.info["gpus"] else "cpu")
    assert cluster.precision("auto", torch.device("cuda")) == "bf16"
    assert cluster.precision("bf16", torch.device("cpu")) == "fp32"
    with pytest.raises(FeatcacheError, match="--device cuda:1: on a Ray cluster each backbone actor gets its own"):
        cluster.device("cuda:1")
    if not cluster.info["gpus"]:
        with pytest.raises(FeatcacheError, match="--device cuda: the Ray cluster .* has no GPUs"):
            cluster.device("cuda")


def test_ray_options_are_checked_where_they_enter(small_folder, tmp_path, monkeypatch):
    runner = CliRunner()
    out = runner.invoke(app, ["extract", "--data", str(small_folder), "--ray-actors", "2", "--cache", str(tmp_path)])
    assert out.exit_code == 2 and "--ray-actors needs --ray" in out.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the extra installed
    from featcache.extraction.ray import RayCluster

    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[ray\]'"):
        RayCluster("local")
