"""The lean extraction (no PyTorch): the same features as the full path, and it steps aside when it must."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import featcache as fc
from featcache.data.images import VIEWS, Preprocess, apply_view
from featcache.store.entries import CacheEntry

OPTIONS = {"backbone": "efficientnet_lite0", "pools": "gap,penult", "views": 2, "shard_size": 4, "quiet": True}


def _extract_in_fresh_process(data: Path, cache: Path) -> tuple[dict, str]:
    """``fc.extract`` on ``data`` in a new interpreter: what it did, and whether it imported PyTorch."""
    script = textwrap.dedent(f"""
        import json, sys
        import featcache as fc
        entry = fc.extract(data={str(data)!r}, cache={str(cache)!r}, **{{**{OPTIONS!r}, "quiet": False}})
        print(json.dumps({{"torch": "torch" in sys.modules, "ids": len(entry.ids)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_new_images_of_an_exported_entry_are_extracted_without_torch_and_equal_the_full_path(small_folder,
                                                                                               tmp_path):
    (small_folder / "nevus" / "notes.jpg").write_text("not an image")
    reference = fc.extract(data=small_folder, cache=tmp_path / "reference", **OPTIONS)  # the full path, all images
    partial = tmp_path / "partial"
    shutil.copytree(small_folder, partial)
    for path in sorted(partial.rglob("*.jpg"))[::2]:
        path.unlink()
    fc.extract(data=partial, cache=tmp_path / "cache", **OPTIONS)  # the full path begins the entry
    shutil.copytree(small_folder, partial, dirs_exist_ok=True, copy_function=shutil.copy2)

    done, said = _extract_in_fresh_process(partial, tmp_path / "cache")
    assert done["torch"] is False and "without PyTorch" in said, said
    assert "skipped nevus/notes.jpg: not a decodable image" in said
    lean = CacheEntry(next((tmp_path / "cache" / "partial").iterdir()))
    assert lean.fingerprint == reference.fingerprint and sorted(lean.ids) == sorted(reference.ids)
    assert lean.manifest["complete"] and set(lean.failed) == {"nevus/notes.jpg"}
    for pool in ("gap", "penult"):  # bit for bit, both views
        np.testing.assert_array_equal(lean.read(pool, reference.ids), reference.read(pool, reference.ids))

    # another dataset: the lean path begins its entry from the recipe of the engine
    shutil.copytree(small_folder, tmp_path / "another")
    done, said = _extract_in_fresh_process(tmp_path / "another", tmp_path / "cache")
    assert done["torch"] is False and "already in the cache" not in said, said
    other = CacheEntry(next((tmp_path / "cache" / "another").iterdir()))
    assert other.manifest["dataset"] == "another" and other.manifest["complete"]
    np.testing.assert_array_equal(other.read("penult", reference.ids), reference.read("penult", reference.ids))

    # a damaged export is never run: the full path exports it again, and says so
    export = next((tmp_path / "cache" / ".engines").glob("*.onnx"))
    export.write_bytes(export.read_bytes()[:-10] + b"0123456789")
    mirrored = Image.open(next((small_folder / "nevus").glob("*.jpg"))).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mirrored.save(partial / "melanoma" / "mirrored.jpg")  # a new file: it must be extracted
    done, said = _extract_in_fresh_process(partial, tmp_path / "cache")
    assert done["torch"] is True and "without PyTorch" not in said
    assert "does not match the checksum recorded at export" in said and done["ids"] == 13


def test_pil_resize_and_crop_equal_torchvision_and_views_equal_on_arrays_and_tensors():
    rng = np.random.default_rng(0)
    for interpolation in ("bilinear", "bicubic", "nearest", "lanczos"):
        for mode in ("crop", "full", "pad"):
            preprocess = Preprocess(crop_size=224, resize_size=256, interpolation=interpolation, mean=(0.5,) * 3,
                                    std=(0.5,) * 3, resize_mode=mode)
            for width, height in [(600, 450), (450, 600), (224, 224), (256, 256), (100, 37), (255, 257), (1, 1)]:
                image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                expected = _torchvision(preprocess, image)
                assert np.array_equal(preprocess.to_array(image), expected.numpy()), (interpolation, mode, width)
                assert torch.equal(preprocess.to_uint8(image), expected)
    batch = rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    for view in VIEWS:
        assert np.array_equal(apply_view(batch, view), apply_view(torch.from_numpy(batch), view).numpy()), view


def _torchvision(preprocess: Preprocess, image: Image.Image) -> torch.Tensor:
    """The resize and crop as torchvision's functional API makes them (what the PIL path always was)."""
    interpolation = InterpolationMode(preprocess.interpolation)
    if preprocess.resize_mode == "pad":
        side = max(image.size)
        square = Image.new("RGB", (side, side))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    if preprocess.resize_mode in ("full", "pad"):
        size = [preprocess.crop_size, preprocess.crop_size]
        return TF.pil_to_tensor(TF.resize(image, size, interpolation=interpolation))
    image = TF.resize(image, preprocess.resize_size, interpolation=interpolation)
    return TF.pil_to_tensor(TF.center_crop(image, [preprocess.crop_size, preprocess.crop_size]))
