"""Cheaper decodes of 600x450 JPEGs for EfficientNet-Lite0, against today's (PIL decode, PIL bicubic resize
of the whole image, centre crop), all in one run.

For each path: milliseconds per image on one core (read from memory, decode, resize, crop; the three
repeats interleaved, the best taken), the mean absolute difference of its 224-px input from today's (8-bit
levels), and the cosine of Lite0's features on it to today's features (ham70: 70 photographs at
HAM10000's original 600x450). The issue's rule: a path is adopted only where the cosine is >= 0.999
on every image and HAM10000's lesion-grouped 5-fold balanced accuracy (logreg) moves by <= 0.003; the
second check runs for the paths that pass the first and that featcache can extract (`--resampler torch`).

Writes the block `decode-paths` of docs/benchmarks.md.

Run: python benchmarks/decode_paths.py [--cache cache]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
from docs_blocks import replace_block
from PIL import Image

import featcache
from featcache.backbones.models import load_backbone
from featcache.data.images import Preprocess, _center_crop, _chw, decode_jpeg_tensor, decode_rgb

REPO = Path(__file__).resolve().parents[1]
HAM70 = REPO.parent / "shared" / "data" / "ham70"
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"


def paths(preprocess: Preprocess) -> dict:
    size, crop = preprocess.resize_size, preprocess.crop_size
    fast = Preprocess.from_fields({**preprocess.to_dict(), "resampler": "torch"})

    def geometry(width: int, height: int) -> tuple[int, int]:
        return (int(size * width / height), size) if width >= height else (size, int(size * height / width))

    def scaled_dct(blob: bytes) -> np.ndarray:  # libjpeg-turbo's M/8 scaling to the smallest size >= target
        height, width, _, _ = simplejpeg.decode_jpeg_header(blob)
        target = geometry(width, height)
        image = Image.fromarray(simplejpeg.decode_jpeg(blob, "RGB", min_height=target[1], min_width=target[0]))
        return _chw(_center_crop(image.resize(target, Image.BICUBIC), crop))

    def opencv(interpolation: int):
        def run(blob: bytes) -> np.ndarray:
            pixels = simplejpeg.decode_jpeg(blob, "RGB")
            resized = cv2.resize(pixels, geometry(pixels.shape[1], pixels.shape[0]), interpolation=interpolation)
            return _chw(_center_crop(Image.fromarray(resized), crop))
        return run

    def bilinear(blob: bytes) -> np.ndarray:
        image = decode_rgb(blob)
        return _chw(_center_crop(image.resize(geometry(*image.size), Image.BILINEAR), crop))

    return {
        "today: PIL decode, PIL bicubic (`--resampler pil`)": preprocess.load_array,
        "libjpeg-turbo decode, PyTorch uint8 antialiased bicubic (`--resampler torch`)":
            lambda blob: fast._resize_tensor(decode_jpeg_tensor(blob)).numpy(),
        "libjpeg-turbo DCT-scaled decode (M/8), PIL bicubic": scaled_dct,
        "OpenCV INTER_AREA": opencv(cv2.INTER_AREA),
        "OpenCV INTER_CUBIC (no antialiasing)": opencv(cv2.INTER_CUBIC),
        "PIL bilinear (another interpolation)": bilinear,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    model = load_backbone("efficientnet_lite0")
    blobs = [p.read_bytes() for p in sorted(HAM70.rglob("*.jpg"))]
    ways = paths(model.preprocess)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    inputs = {name: np.stack([way(b) for b in blobs]) for name, way in ways.items()}
    ms = {name: [] for name in ways}
    for _ in range(3):  # interleaved: each repeat times every path
        for name, way in ways.items():
            started = time.perf_counter()
            for blob in blobs * 2:
                way(blob)
            ms[name].append((time.perf_counter() - started) / (2 * len(blobs)) * 1000)
    torch.set_num_threads(2)
    with torch.inference_mode():
        feats = {name: model.model(model.preprocess.normalize(torch.from_numpy(x)))["gap"].numpy()
                 for name, x in inputs.items()}
    today = next(iter(ways))
    rows = []
    for name in ways:
        a, b = feats[name], feats[today]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        rows.append((name, min(ms[name]), np.abs(inputs[name].astype(int) - inputs[today]).mean(), cosine))
    common = dict(data=str(HAM), group_col="lesion_id", cache=str(args.cache), quiet=True,
                  backbone="efficientnet_lite0", engine="openvino")
    scores = {}
    for resampler in ("pil", "torch"):
        featcache.extract(**common, resampler=resampler)
        (run,) = featcache.fit(**common, heads="logreg", resampler=resampler, precision="fp32")
        scores[resampler] = run.metrics["pooled"]["balanced_accuracy"]
    lines = ["## Cheaper decodes {#decode-paths}", "",
             f"`python benchmarks/decode_paths.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + ": EfficientNet-Lite0's input (resize 256 bicubic, crop 224) from ham70's 70 photographs of "
             "600x450, one core, all in this run; cosine of Lite0's features (gap) to today's.", "",
             "| path | ms per image (1 core) | x today | input differs (mean levels) | cosine mean | cosine min | "
             "passes >= 0.999 |", "|---|---|---|---|---|---|---|"]
    for name, took, diff, cosine in rows:
        lines.append(f"| {name} | {took:.2f} | {rows[0][1] / took:.2f} | {diff:.2f} | {cosine.mean():.5f} | "
                     f"{cosine.min():.5f} | {'yes' if cosine.min() >= 0.999 else 'no'} |")
    lines += ["", f"HAM10000 (200x150 JPEGs, upscaled to 256), lesion-grouped 5-fold, logreg on Lite0 gap: balanced "
              f"accuracy {scores['pil']:.3f} with `--resampler pil`, {scores['torch']:.3f} with `--resampler torch` "
              f"({scores['torch'] - scores['pil']:+.3f}; the rule asks <= 0.003)."]
    replace_block(args.out, "decode-paths", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
