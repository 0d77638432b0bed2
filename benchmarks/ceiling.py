"""The default `featcache extract` against the machine's ceiling for it, measured in the same run.

The ceiling for a backbone on C cores, when the JPEG decode and the forward share the cores perfectly:
C / (decode + C / forward) images/s, where ``decode`` is the decode's core-seconds per image (the
loader alone, one worker: read, SHA-256, decode, resize) and ``forward`` the bare forward's images/s on
all cores (the default engine on pre-made batches, as extraction runs it). Beside it: the extraction
itself (the images/s extract reports, start-up excluded) and the whole command (N / its wall time, in a
fresh process, the engine compiled before: an earlier command on another dataset exported and compiled
it, so this one takes the lean path, featcache.extraction.lean, without importing PyTorch).

On N JPEGs of 600x450 (ham70's photographs copied under N distinct names). Writes the block `ceiling` of
docs/benchmarks.md.

Run: python benchmarks/ceiling.py [--images 3072] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from bench_common import HAM70, ham70_copies, run_command
from docs_blocks import replace_block
from efficiency import bare_forward_ips, decode_ips

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.extraction.engines import resolve_engine

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    photos = sorted(HAM70.rglob("*.jpg"))
    cores = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        ham70_copies(data, args.images)
        # the engine exported and compiled by an earlier command (on one image, into the same cache)
        (Path(tmp) / "one" / "photos").mkdir(parents=True)
        shutil.copyfile(photos[0], Path(tmp) / "one" / "photos" / "a.jpg")
        run_command(["featcache", "extract", "--data", str(Path(tmp) / "one"), "--cache", str(cache),
              "--backbone", args.backbone, "-q"])
        backbone = load_backbone(args.backbone)
        engine = resolve_engine("auto", backbone, torch.device("cpu"))
        forward = max(bare_forward_ips(backbone, b, 512, engine, cache) for b in (8, 32))
        decode = decode_ips(backbone, open_source(data), "pil")
        ceiling = cores / (cores / forward + 1 / decode)
        seconds, output = run_command(["featcache", "extract", "--data", str(data), "--cache", str(cache),
                                       "--backbone", args.backbone], stderr=True)
        path = "lean" if "without PyTorch" in output else "full"
        whole = args.images / seconds
        reported = float(re.search(r"\(([\d.]+) images/s\)", output).group(1))
    lines = ["## The default extraction against the machine's ceiling", "",
             f"`python benchmarks/ceiling.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f": {args.backbone}, default engine ({engine}), {args.images} JPEGs of 600x450, {cores} cores, "
             "img/s, all in this run. Ceiling = C / (decode + C / forward): decode = the loader alone (1 worker), "
             f"forward = the bare forward on all cores. The whole command took the {path} path "
             "(engine compiled before by a command on another dataset).", "",
             "| bare forward | decode (1 core) | ceiling | extraction (as reported) | whole command |",
             "|---|---|---|---|---|",
             f"| {forward:.1f} | {decode:.1f} | {ceiling:.1f} | {reported:.1f} ({reported / ceiling:.2f} of the "
             f"ceiling) | {whole:.1f} (**{whole / ceiling:.2f}** of the ceiling) |"]
    replace_block(args.out, "ceiling", "\n".join(lines))
    print("\n".join(lines))



if __name__ == "__main__":
    main()
