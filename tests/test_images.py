"""Decoding every odd image users have: each converts to RGB or fails with a plain reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from featcache.images import decode_rgb


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
