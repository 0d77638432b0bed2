"""Decoding every odd image users have: each converts to RGB or fails with a plain reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.data.images import Preprocess, decode_jpeg_tensor, decode_rgb
from tests.conftest import DEMO, shared


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_bad_files_fail_with_reason(photo):
    jpeg = encode(photo, "JPEG")
    with pytest.raises(ValueError, match="empty file"):
        decode_rgb(b"")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_rgb(b"lesion_id,dx\nHAM_1,mel\n")  # a text file named .jpg
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_rgb(jpeg[: len(jpeg) // 2])  # truncated JPEG


def test_modes_convert_to_rgb(photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: flattened onto white
    assert np.asarray(decode_rgb(encode(rgba, "PNG"))).min() == 255
    gray = decode_rgb(encode(photo.convert("L"), "PNG"))
    assert gray.mode == "RGB" and np.ptp(np.asarray(gray)[..., 0].astype(int) - np.asarray(gray)[..., 2]) == 0
    cmyk = decode_rgb(encode(photo.convert("CMYK"), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.size == photo.size
    tiny = decode_rgb(encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    assert tiny.size == (1, 1) and tiny.getpixel((0, 0)) == (200, 10, 10)


def test_16bit_png_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    decoded = np.asarray(decode_rgb(encode(Image.fromarray(values), "PNG")))[..., 0]
    assert decoded.tolist() == [[0, 128, 255]]


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(photo, "JPEG", exif=exif.tobytes())
    assert decode_rgb(data).size == (photo.height, photo.width)


def test_huge_jpeg_decodes_small_with_draft():
    big = Image.new("RGB", (10000, 10000), (120, 60, 30))
    data = encode(big, "JPEG", quality=50)
    image = decode_rgb(data, min_side=256)
    assert min(image.size) >= 256 and max(image.size) <= 1250  # DCT-scaled by 1/8, not 300 MB


def _jpegs() -> list[bytes]:
    """Real dermoscopy JPEGs: the shipped 600x450 sample and HAM10000 at 200x150 and full size."""
    files = sorted((DEMO / "images").rglob("*.jpg"))[:8]
    files += sorted(shared("ham70").rglob("*.jpg"))[:8] + sorted(shared("ham10000_200x150").rglob("*.jpg"))[:8]
    return [f.read_bytes() for f in files]


def test_fast_jpeg_decode_gives_pils_pixels():
    from torchvision.transforms.functional import pil_to_tensor

    for data in _jpegs():
        for min_side in (None, 256):
            tensor = decode_jpeg_tensor(data, min_side)
            assert tensor is not None and torch.equal(tensor, pil_to_tensor(decode_rgb(data, min_side)))


def test_fast_jpeg_decode_leaves_oversized_images_to_pils_checks(photo, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_jpeg_tensor(encode(photo, "JPEG")) is None  # PIL warns or refuses, as without --resampler


def test_fast_jpeg_decode_leaves_odd_files_to_pil(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    assert decode_jpeg_tensor(encode(photo, "JPEG", exif=exif.tobytes())) is None  # rotated: PIL applies EXIF
    upright = Image.Exif()
    upright[0x0112] = 1  # EXIF that says "as stored": the fast path
    assert decode_jpeg_tensor(encode(photo, "JPEG", exif=upright.tobytes())) is not None
    assert decode_jpeg_tensor(encode(photo.convert("CMYK"), "JPEG")) is None
    assert decode_jpeg_tensor(encode(photo, "PNG")) is None
    jpeg = encode(photo, "JPEG")
    assert decode_jpeg_tensor(jpeg[: len(jpeg) // 2]) is None
    big = encode(Image.new("RGB", (4000, 3000), (120, 60, 30)), "JPEG", quality=50)
    drafted = decode_jpeg_tensor(big, 256)  # DCT-scaled by 1/8, as PIL's draft
    assert drafted is not None and tuple(drafted.shape) == (3, 375, 500)
    assert torch.equal(drafted, torch.from_numpy(np.asarray(decode_rgb(big, 256))).permute(2, 0, 1))


@pytest.mark.parametrize("resize_mode", ["crop", "full", "pad"])
def test_torch_resampler_is_within_three_levels_of_pil_and_named_apart(photo, resize_mode):
    pil = Preprocess(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3, resize_mode=resize_mode)
    fast = Preprocess(**{**pil.to_dict(), "resampler": "torch", "resize_mode": resize_mode})
    assert "resampler" not in pil.to_dict() and fast.to_dict()["resampler"] == "torch"  # old names kept
    rotated = Image.Exif()
    rotated[0x0112] = 6
    for data in _jpegs()[:4] + _jpegs()[-4:] + [encode(photo, "PNG"), encode(photo, "JPEG", exif=rotated.tobytes())]:
        a, b = pil.load(data), fast.load(data)
        assert a.shape == b.shape == (3, 224, 224) and b.dtype == torch.uint8
        difference = (a.int() - b.int()).abs()
        # measured: max 2-3 levels; mean ~0.005 on landscape photos, ~0.2 on portrait ones (another pass order)
        assert difference.max() <= 3 and difference.float().mean() < 0.5
    with pytest.raises(ValueError, match="not a decodable image"):
        fast.load(encode(photo, "JPEG")[:500])
    with pytest.raises(ValueError, match="--resampler lanczos: choose one of pil, torch"):
        Preprocess(**{**pil.to_dict(), "resampler": "lanczos"})
