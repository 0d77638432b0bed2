"""JPEG decode + resize on real 600x450 dermoscopy photos: full decode vs PIL draft (DCT-domain) decode.

Measures images/s of decode + resize + centre crop (one core, no model) both ways on
../shared/data/ham70 (original HAM10000 size), how far the draft path's 224-px input is from the full
decode's (mean/max absolute difference in 8-bit levels), and how far the EfficientNet-Lite0 ImageNet
features move (cosine similarity), so "exact enough" is a number, not a claim.

Run: python benchmarks/decode_draft.py
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from PIL import Image

from featcache.backbones.models import load_backbone
from featcache.data.images import decode_rgb

REPO = Path(__file__).resolve().parents[1]
HAM70 = REPO.parent / "shared" / "data" / "ham70"


def upscaled(blob: bytes, factor: int) -> bytes:
    """The photo re-encoded at ``factor`` times the size, like the multi-megapixel ISIC originals."""
    image = Image.open(io.BytesIO(blob))
    out = io.BytesIO()
    image.resize((image.width * factor, image.height * factor), Image.Resampling.BICUBIC).save(out, "JPEG",
                                                                                                quality=90)
    return out.getvalue()


def main() -> None:
    files = sorted(HAM70.rglob("*.jpg"))
    backbone = load_backbone("efficientnet_lite0")
    originals = [f.read_bytes() for f in files]
    print(f"{len(files)} HAM10000 JPEGs -> resize {backbone.preprocess.resize_size}, "
          f"crop {backbone.preprocess.crop_size} (EfficientNet-Lite0)")
    print("| photos | decode | images/s (1 core) | speed-up | input diff. mean / max (8-bit) | feature cosine min |")
    print("|---|---|---|---|---|---|")
    measure("600x450 (original)", originals, backbone)
    measure("2400x1800 (re-encoded 4x)", [upscaled(b, 4) for b in originals], backbone)


def measure(label: str, blobs: list[bytes], backbone) -> None:
    pre = backbone.preprocess
    inputs, rates = {}, {}
    for draft in (False, True):
        min_side = pre.resize_size if draft else None
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            batch = [pre.to_uint8(decode_rgb(b, min_side)) for b in blobs]
            best = max(best, len(blobs) / (time.perf_counter() - started))
        rates[draft], inputs[draft] = best, torch.stack(batch)
    diff = (inputs[True].int() - inputs[False].int()).abs().float()
    with torch.inference_mode():
        feats = {d: backbone.model(pre.normalize(inputs[d]))["gap"] for d in (False, True)}
    cosine = torch.nn.functional.cosine_similarity(feats[False], feats[True], dim=1)
    print(f"| {label} | full | {rates[False]:.0f} | 1.00x | – | – |")
    print(f"| {label} | draft | {rates[True]:.0f} | **{rates[True] / rates[False]:.2f}x** | "
          f"{diff.mean():.2f} / {diff.max():.0f} | {cosine.min():.4f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
