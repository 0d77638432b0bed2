"""Would `--resampler torch` make a better default? The whole `featcache extract` command with the default
(`pil`: the lean path, no PyTorch import) against `--resampler torch` (its cheaper decode, but PyTorch
imported), in one run, on N JPEGs of 600x450 (ham70's photographs copied under N names), the engine
compiled before by a command on another dataset with the same options (so the default takes the lean path).
The two commands alternate within each repeat; each ratio is taken within its repeat.

Writes the block `resampler-whole` of docs/benchmarks.md.

Run: python benchmarks/resampler_whole.py [--sizes 512,3072] [--repeats 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_common import HAM70, ham70_copies, run_command
from docs_blocks import replace_block
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"pil": [], "torch": ["--resampler", "torch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512,3072")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        (Path(tmp) / "one" / "photos").mkdir(parents=True)
        # an image none of the timed datasets holds (a known image's features would be reused, not extracted)
        Image.open(sorted(HAM70.rglob("*.jpg"))[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
            Path(tmp) / "one" / "photos" / "a.jpg")
        for extra in OPTIONS.values():  # the engine exported and compiled, the recipes written
            run_command(["featcache", "extract", "--data", str(Path(tmp) / "one"), "--cache", str(cache), "-q",
                         *extra])
        for size in (int(s) for s in args.sizes.split(",")):
            data = Path(tmp) / f"data{size}"
            ham70_copies(data, size)
            for repeat in range(args.repeats):
                order = list(OPTIONS) if repeat % 2 == 0 else list(reversed(OPTIONS))
                seconds = {}
                for name in order:
                    for made in cache.glob("data*"):  # no entry to reuse features from: every image extracted
                        shutil.rmtree(made)
                    seconds[name], output = run_command(["featcache", "extract", "--data", str(data), "--cache",
                                                         str(cache), *OPTIONS[name]], stderr=True)
                    extracted = int(re.search(r"(\d+) extracted", output).group(1))
                    assert extracted == size, f"{name}: {extracted} of {size} images extracted"
                    if name == "pil":
                        lean = "without PyTorch" in output
                rows.append({"size": size, "repeat": repeat + 1, **seconds, "lean": lean})
                print(rows[-1], flush=True)
    lines = ["## `--resampler torch` as the default? The whole command {#resampler-whole}", "",
             f"`python benchmarks/resampler_whole.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + ": EfficientNet-Lite0, default engine, JPEGs of 600x450, 2 cores, a fresh process per command, the "
             "engine compiled before; the two commands alternate within each repeat.", "",
             "| images | repeat | default (`pil`, lean path) s | `--resampler torch` s | torch / default | "
             "default took the lean path |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['repeat']} | {r['pil']:.1f} | {r['torch']:.1f} | "
                     f"{r['torch'] / r['pil']:.2f} | {'yes' if r['lean'] else 'NO'} |")
    for size in sorted({r["size"] for r in rows}):
        ratio = statistics.median(r["torch"] / r["pil"] for r in rows if r["size"] == size)
        lines.append(f"\n{size} images: `--resampler torch` takes **{ratio:.2f}x** the default's time (median).")
    replace_block(args.out, "resampler-whole", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
