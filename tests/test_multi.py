"""Issue 26: `extract --backbone a,b,c` decodes each image once for all backbones; each entry is the one
its single extraction makes, and a killed run resumes each entry where it stopped."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featcache import api
from featcache.cli import app
from featcache.data.images import Preprocess, load_for_each
from featcache.store.entries import CacheEntry

from .conftest import DEMO

BACKBONES = "efficientnet_lite0,squeezenet1_1"


def test_one_decode_gives_each_transform_what_its_own_load_gives(photo, tmp_path):
    photo.save(tmp_path / "a.jpg", quality=90)
    content = (tmp_path / "a.jpg").read_bytes()
    transforms = [Preprocess(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
                  Preprocess(240, 272, "bicubic", (0.5,) * 3, (0.5,) * 3),
                  Preprocess(224, 256, "bilinear", (0.4,) * 3, (0.2,) * 3, resize_mode="pad"),
                  Preprocess(224, 256, "bilinear", (0.4,) * 3, (0.2,) * 3, jpeg_draft=False),
                  Preprocess(224, 256, "bilinear", (0.4,) * 3, (0.2,) * 3, resampler="torch"),
                  Preprocess(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3, filters=("color-constancy",))]
    shared = load_for_each(content, transforms)
    for transform, tensor in zip(transforms, shared, strict=True):
        assert (tensor == transform.load(content)).all()


def _same_entries(a: Path, b: Path) -> None:
    first, second = CacheEntry(a), CacheEntry(b)
    assert first.fingerprint == second.fingerprint and first.ids == second.ids
    assert {i: (s.sha256, s.failed) for i, s in first.state().items()} == \
        {i: (s.sha256, s.failed) for i, s in second.state().items()}
    for pool in first.pools:
        ok = [i for i in first.ids if first.state()[i].failed is None]
        np.testing.assert_array_equal(first.read(pool, ok, dtype="float16"), second.read(pool, ok, dtype="float16"))


@pytest.mark.slow
def test_several_backbones_from_one_decode_make_the_entries_of_the_single_commands(small_folder, tmp_path):
    (small_folder / "nevus" / "broken.jpg").write_bytes(b"not a jpeg")  # failed in every entry alike
    singles, shared = tmp_path / "singles", tmp_path / "shared"
    for name in BACKBONES.split(","):
        api.extract(str(small_folder), backbone=name, cache=str(singles), quiet=True)
    entries = api.extract(str(small_folder), backbone=BACKBONES, cache=str(shared), quiet=True)
    assert [e.path.name.split("-")[0] for e in entries] == BACKBONES.split(",")
    for entry in entries:
        _same_entries(entry.path, singles / entry.path.relative_to(shared))
        assert "broken.jpg" in " ".join(entry.failed)
    # everything cached: answered from the recipes, the same entries, without importing PyTorch
    again = api.extract(str(small_folder), backbone=BACKBONES, cache=str(shared), quiet=True)
    assert [e.path for e in again] == [e.path for e in entries]
    probe = (f"import sys, featcache.api as a; a.extract({str(small_folder)!r}, backbone={BACKBONES!r}, "
             f"cache={str(shared)!r}, quiet=True); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "False", done.stderr


@pytest.mark.slow
def test_a_killed_shared_extraction_resumes_each_entry(tmp_path):
    folder = tmp_path / "photos" / "nevus"
    folder.mkdir(parents=True)
    for k, image in enumerate(sorted(DEMO.rglob("*.jpg"))[:48]):
        shutil.copy(image, folder / f"{k:02d}.jpg")
    data, cache = tmp_path / "photos", tmp_path / "cache"
    command = [sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--cache", str(cache),
               "--backbone", BACKBONES, "--shard-size", "4", "--batch-size", "4", "--workers", "1", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*/*/shard-*.h5"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    said = " ".join(process.stderr.read().decode().split())
    assert "Interrupted: new images committed per backbone: efficientnet_lite0" in said and "Traceback" not in said
    partial = {p.parent.name: len(list(p.parent.glob("shard-*.h5"))) for p in cache.glob("*/*/shard-*.h5")}
    assert partial, "the run was killed before any shard was committed"
    out = CliRunner().invoke(app, command[3:])  # the same command again: each entry resumes
    assert out.exit_code == 0, out.output
    singles = tmp_path / "singles"
    for name in BACKBONES.split(","):
        api.extract(str(data), backbone=name, cache=str(singles), quiet=True)
    entries = sorted(p.parent for p in cache.glob("*/*/manifest.json"))
    assert len(entries) == 2
    for entry in entries:
        assert len(CacheEntry(entry).ids) == 48
        _same_entries(entry, singles / entry.relative_to(cache))
