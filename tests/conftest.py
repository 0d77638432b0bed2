"""Shared fixtures: real image files written by the tests, and the shared/ data when present."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEMO = REPO / "featcache" / "data" / "isic_cc0_demo200"


def shared(name: str) -> Path:
    """A data set of ../shared; absent, the test skips, except in CI (CI=true), where it fails: CI
    must not pass by quietly testing less."""
    path = SHARED / name
    if not path.exists():
        message = f"{path} is absent (the ../shared data set is not beside this checkout)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true, so this fails instead of skipping")
        pytest.skip(message)
    return path


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """An ImageFolder of 12 real dermoscopy JPEGs (6 melanoma, 6 nevus) from the shipped sample."""
    root = tmp_path / "folder"
    for label in ("melanoma", "nevus"):
        (root / label).mkdir(parents=True)
        for src in sorted((DEMO / "images" / label).glob("*.jpg"))[:6]:
            shutil.copy(src, root / label / src.name)
    return root


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0 with its ImageNet weights (offline), loaded once per test module."""
    from featcache.backbones.models import load_backbone

    return load_backbone("efficientnet_lite0")


@pytest.fixture
def photo() -> Image.Image:
    return Image.open(next((DEMO / "images" / "nevus").glob("*.jpg"))).convert("RGB")


def flip_one_feature_bit(entry) -> Path:  # noqa: ANN001 - a featcache CacheEntry
    """Bit rot: the first float16 of the first shard's gap features loses its lowest high-byte bit (still
    finite, so only the checksum can tell)."""
    import h5py

    shard = entry.shard_paths()[0]
    with h5py.File(shard, "r") as h5:
        offset = h5["features/gap"].id.get_offset()
    raw = bytearray(shard.read_bytes())
    raw[offset + 1] ^= 0x01
    shard.write_bytes(bytes(raw))
    return shard
