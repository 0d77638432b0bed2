"""The results page's extraction budget, timed from nothing: the 4-view entries of its three budget backbones.

What benchmarks/accuracy.py extracts first (EfficientNet-Lite0, SqueezeNet 1.1 and EfficientNet-Lite1; 4 views:
identity, both mirrors, half turn; poolings gap / penult / multi) over HAM10000 (10,015 images, 200x150) and
the ISIC 2018 test set (1,512), with featcache's defaults (`--engine auto`, PIL resampler) or the options
given, into a fresh cache, one entry after the other. The target of issue 15 is <= 20 minutes on this 2-core
machine. Writes the block `results-extraction` of docs/benchmarks.md.

Run: python benchmarks/results_extraction.py [--engine auto] [--resampler pil] [--limit N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from accuracy import BUDGET_BACKBONES, HAM, ISIC_TEST, LAYER_POOLS, VIEWS
from docs_blocks import replace_block

from featcache.data.sources import open_source
from featcache.extraction.extract import extract
from featcache.progress import Reporter
from featcache.recipes import FeatureRecipe

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 20 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--resampler", default="pil")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set (a quick check; "
                        "the docs block is written only for the full sets)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    sources = [open_source(HAM), open_source(ISIC_TEST)]
    if args.limit:
        sources = [dataclasses.replace(s, records=s.records[:args.limit]) for s in sources]
    reporter = Reporter(quiet=True)
    rows, total, images = [], 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in BUDGET_BACKBONES:
            for source in sources:
                started = time.perf_counter()
                result = extract(source, backbone, cache_root=tmp, reporter=reporter,
                                 recipe=FeatureRecipe(pools=LAYER_POOLS, views=VIEWS, engine=args.engine,
                                                      resampler=args.resampler))
                seconds = time.perf_counter() - started  # the export and compile of the engine included
                engine = result.entry.manifest["fingerprint_inputs"].get("engine", "torch")
                total, images = total + seconds, images + result.extracted
                row = (f"| {backbone} | {source.name} | {engine} | {result.extracted} | {seconds:.0f} | "
                       f"{result.extracted * VIEWS / seconds:.1f} |")
                rows.append(row)
                print(row, flush=True)
    verdict = "met" if total <= TARGET_S else "not met"
    lines = ["## The results page's extraction (4 views, three backbones, from nothing)", "",
             f"`python benchmarks/{' '.join(['results_extraction.py', *sys.argv[1:]])}` "
             f"({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads; offline ImageNet weights; "
             f"poolings {', '.join(LAYER_POOLS)}; `--resampler {args.resampler}`):", "",
             "| backbone | images | engine | images extracted | seconds | forwards/s (images x views) |",
             "|---|---|---|---|---|---|", *rows,
             f"| **all** | | | {images} | **{total:.0f} s = {total / 60:.1f} min** | |", "",
             f"Target (issue 15): <= {TARGET_S // 60} min: {verdict}."]
    print("\n".join(lines[-3:]))
    if not args.limit:
        replace_block(args.out, "results-extraction", "\n".join(lines))


if __name__ == "__main__":
    main()
