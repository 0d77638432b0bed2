"""Extraction efficiency: `featcache extract` throughput / bare forward throughput, per backbone.

Bare forward = the backbone alone on pre-made tensors (no decode, no hashing, no I/O), same batch
size, layout and threads. Whole extraction = decode + resize in DataLoader workers, SHA-256, the
forward, float16 shard writes, into a fresh cache. Random weights (timing only). Also prints the
forward's FLOPs per image and achieved GFLOP/s against a fp32 GEMM measured in the same run.

Run: python benchmarks/extraction_efficiency.py [--backbones efficientnet_lite0,resnet18,resnet50,dinov2_vits14]
Target (issue 6): ratio >= 0.9. Data: the first N images of ../shared/data/ham10000_200x150.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from efficiency import extraction_efficiency, gemm_peak_gflops

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"
# Enough images for 10-30 s of work per measurement on 2 cores. The DataLoader worker start and the
# first-batch warm-up are a fixed cost: lite0 measured 0.82 at 240 images and 0.94 at 1,200.
IMAGES = {"efficientnet_lite0": 1200, "resnet18": 320, "resnet50": 120, "dinov2_vits14": 400,
          "alexnet": 480, "vgg16": 40}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet18,resnet50,dinov2_vits14")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    source = open_source(HAM)
    peak = gemm_peak_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 GEMM peak {peak:.0f} GFLOP/s")
    print("| backbone | batch | images | bare forward img/s | featcache extract img/s | ratio | GFLOP/img "
          "| achieved GFLOP/s | % of GEMM peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.backbones.split(","):
        backbone = load_backbone(name, weights="random")
        r = extraction_efficiency(backbone, source, IMAGES.get(name, 120), args.batch_size, args.repeats, peak)
        print(f"| {name} | {r.batch_size} | {r.n_images} | {r.bare_ips:.1f} | {r.extract_ips:.1f} | **{r.ratio:.2f}** "
              f"| {r.gflop_per_image:.1f} | {r.achieved_gflops:.0f} | {100 * r.achieved_gflops / peak:.0f} % |",
              flush=True)


if __name__ == "__main__":
    main()
