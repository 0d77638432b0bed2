"""Extraction engines side by side, in one run: bare forward of each engine, decode alone, and `featcache extract`.

Per backbone (random weights: timing only):
- bare forward: each engine (torch channels_last, ONNX Runtime, OpenVINO) alone on pre-made uint8 batches,
  normalisation included (batch 8 and 32, the better kept), same threads;
- decode: the DataLoader alone (read, hash, decode, resize; 1 worker) on real JPEGs, no forward, with the
  default resampler (PIL, the backbone's eval transform bit for bit) and with `--resampler torch`;
- extract: the whole `featcache extract` of the same JPEGs into a fresh cache with `--engine torch`, with
  the default engine (`auto`), and with `auto` and `--resampler torch`;
- ratio: extract / the best engine's bare forward (the target is >= 0.85);
- ceiling: that ratio if decode and forward shared the cores perfectly (the decode's core time is not free).
Images: the first N of ../shared/data/ham10000_200x150 (200x150), and N from ../shared/data/ham70 (600x450;
its 70 photographs repeated under distinct ids).
Writes the block `engines` of docs/benchmarks.md.

Run: python benchmarks/engines.py [--backbones efficientnet_lite0,squeezenet1_1,resnet18] [--images 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from docs_blocks import replace_block
from efficiency import bare_forward_ips, ceiling, decode_ips, extraction_ips

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.extraction.engines import onnx_path

REPO = Path(__file__).resolve().parents[1]
DATA = {"200x150": REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv",
        "600x450": REPO.parent / "shared" / "data" / "ham70"}
ENGINES = ("torch", "onnxruntime", "openvino")
DEFAULT = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,squeezenet1_1,resnet18,resnet50,dinov2_vits14"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default=DEFAULT)
    parser.add_argument("--images", type=int, default=256, help="images per measurement (200x150 set)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    sources = {"200x150": open_source(DATA["200x150"]), "600x450": open_source(DATA["600x450"])}
    sources["200x150"] = dataclasses.replace(sources["200x150"], records=sources["200x150"].records[:args.images])
    # ham70 has 70 photographs: repeat them under distinct ids to N, so the loader's start-up does not
    # dominate (the files are decoded again each time; only the disk reads come from the page cache)
    big = sources["600x450"].records
    repeated = [dataclasses.replace(big[i % len(big)], id=f"copy{i // len(big)}/{big[i % len(big)].id}")
                for i in range(args.images)]
    sources["600x450"] = dataclasses.replace(sources["600x450"], records=repeated)
    lines = ["## Extraction engines (`--engine`) and the fast resampler (`--resampler torch`) {#engines}", "",
             f"`python benchmarks/{' '.join(['engines.py', *sys.argv[1:]])}`, "
             f"{torch.get_num_threads()} threads, random weights, img/s. Bare forward: each engine alone on "
             "pre-made batches (best of batch 8 and 32). Decode: the loader alone (read, SHA-256, decode, resize; "
             "1 worker), PIL resize (default) / `--resampler torch`. Extract: the whole `featcache extract` of the "
             "same JPEGs with `--engine torch`, with the defaults (`--engine auto`), and with `--engine auto "
             "--resampler torch`. Ratios: extract / the best engine's bare forward, all in this run.", "",
             "| backbone | images | bare forward torch / ORT / OpenVINO | decode pil / torch | extract torch | "
             "extract default (auto) | extract auto + resampler torch | default / best bare | "
             "resampler torch / best bare | ceiling pil / torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for name in args.backbones.split(","):
            backbone = load_backbone(name, weights="random")
            onnx_path(backbone, cache)
            bare = {e: max(bare_forward_ips(backbone, b, 256, e, cache) for b in (8, 32)) for e in ENGINES}
            best = max(bare, key=bare.get)
            for label, source in sources.items():
                decode = {r: decode_ips(backbone, source, r) for r in ("pil", "torch")}
                ips = {(engine, resampler): extraction_ips(load_backbone(name, weights="random"), source,
                                                           len(source.records), None, engine=engine,
                                                           cache_root=cache, resampler=resampler)
                       for engine, resampler in (("torch", "pil"), ("auto", "pil"), ("auto", "torch"))}
                forwards = " / ".join(f"**{bare[e]:.1f}**" if e == best else f"{bare[e]:.1f}" for e in ENGINES)
                line = (f"| {name} | {label} | {forwards} | {decode['pil']:.0f} / {decode['torch']:.0f} | "
                        f"{ips['torch', 'pil']:.1f} | {ips['auto', 'pil']:.1f} | {ips['auto', 'torch']:.1f} | "
                        f"{ips['auto', 'pil'] / bare[best]:.2f} | {ips['auto', 'torch'] / bare[best]:.2f} | "
                        f"{ceiling(bare[best], decode['pil']):.2f} / {ceiling(bare[best], decode['torch']):.2f} |")
                lines.append(line)
                print(line, flush=True)
    replace_block(args.out, "engines", "\n".join(lines))


if __name__ == "__main__":
    main()
