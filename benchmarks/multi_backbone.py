"""One decode for several backbones against one command per backbone, in one run.

On N JPEGs of 600x450 (ham70's photographs copied under N distinct names), each into a fresh cache:
three single `featcache extract --backbone X` commands one after the other, and one
`featcache extract --backbone a,b,c`. Whole commands, each in a fresh process. The features of every
entry are compared value for value. Writes the block `multi-backbone` of docs/benchmarks.md.

Run: python benchmarks/multi_backbone.py [--images 1024] [--backbones a,b,c]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_common import ham70_copies, run_command
from docs_blocks import replace_block

from featcache.store.entries import CacheEntry

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--backbones", default="efficientnet_lite0,squeezenet1_1,efficientnet_lite1")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    names = args.backbones.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ham70_copies(data, args.images)
        singles, shared = Path(tmp) / "singles", Path(tmp) / "shared"
        seconds = {}
        for name in names:
            seconds[name] = run_command(["featcache", "extract", "--data", str(data), "--cache", str(singles),
                                      "--backbone", name, "-q"])[0]
        together = run_command(["featcache", "extract", "--data", str(data), "--cache", str(shared), "--backbone",
                             args.backbones, "-q"])[0]
        identical = all(_same(entry.parent, singles / entry.parent.relative_to(shared))
                        for entry in shared.glob("*/*/manifest.json"))
    total = sum(seconds.values())
    lines = ["## One decode for several backbones (`extract --backbone a,b,c`)", "",
             f"`python benchmarks/multi_backbone.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f": {args.images} JPEGs of 600x450, default engines, 2 cores, whole commands in fresh processes, "
             "seconds, all in this run.", "",
             "| command | seconds |", "|---|---|"]
    lines += [f"| `extract --backbone {name}` | {value:.1f} |" for name, value in seconds.items()]
    lines += [f"| the {len(names)} single commands | {total:.1f} |",
              f"| **`extract --backbone {args.backbones}`** | **{together:.1f}** |", "",
              f"One decode for all: {total / together:.2f}x faster than the single commands (target >= 1.2x); "
              f"features {'identical' if identical else 'NOT identical'} to the single commands' in every entry."]
    replace_block(args.out, "multi-backbone", "\n".join(lines))
    print("\n".join(lines))



def _same(a: Path, b: Path) -> bool:
    first, second = CacheEntry(a), CacheEntry(b)
    return first.ids == second.ids and all(
        np.array_equal(first.read(p, dtype="float16"), second.read(p, first.ids, dtype="float16"))
        for p in first.pools)


if __name__ == "__main__":
    main()
