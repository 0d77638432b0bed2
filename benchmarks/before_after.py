"""`featcache extract` as it was before issue 15 against today's defaults, in one run on the same JPEGs.

The old revision is unpacked from git (`git archive`) into a temporary folder and run from there with this
environment's packages; today's code runs from this checkout. Both extract the same N photographs of
../shared/data/ham70 (600x450 HAM10000 originals) into fresh caches, alternated `--repeats` times; each run's own
images/s (what `extract` prints: the backbone, decode and writes, not Python's start-up) is kept, the best of
each side reported. The copies carry a distinct trailing byte after the JPEG's end marker, so every file has
its own SHA-256 (nothing is reused) and decodes to the same pixels.
Writes the block `before-after` of docs/benchmarks.md.

Run: python benchmarks/before_after.py [--rev 5d948d6] [--images 1024] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from docs_blocks import replace_block

REPO = Path(__file__).resolve().parents[1]
HAM70 = REPO.parent / "shared" / "data" / "ham70"
BEFORE_ISSUE_15 = "5d948d6"  # the last commit before the engines, the loader fix and the resampler


def distinct_copies(folder: Path, count: int) -> None:
    """``count`` JPEGs in an ImageFolder, the 70 photographs cycled, each with its own content hash."""
    photos = sorted(HAM70.rglob("*.jpg"))
    for i in range(count):
        src = photos[i % len(photos)]
        target = folder / src.parent.name / f"{i:05d}_{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes() + i.to_bytes(4, "big"))  # after the end marker: never decoded


def images_per_second(code_root: Path, data: Path, cache: Path, backbone: str, extra: list[str]) -> float:
    command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(code_root)!r}); import featcache; "
               f"assert featcache.__file__.startswith({str(code_root)!r}), featcache.__file__; "
               "from featcache.cli import main; sys.argv[0] = 'featcache'; main()",
               "extract", "--data", str(data), "--cache", str(cache), "--backbone", backbone, *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=code_root)
    found = re.search(r"\(([\d.]+) images/s\)", done.stdout + done.stderr)
    if not found:
        raise RuntimeError(f"no images/s in the output of {' '.join(command)}:\n{done.stdout}\n{done.stderr}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", default=BEFORE_ISSUE_15)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    settings = {f"before ({args.rev}, PyTorch, its defaults)": ("old", []),
                "today, defaults (--engine auto)": ("new", []),
                "today, --engine auto --resampler torch": ("new", ["--resampler", "torch"]),
                "today, --engine torch": ("new", ["--engine", "torch"])}
    best = dict.fromkeys(settings, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        data = tmp / "images"
        distinct_copies(data, args.images)
        for repeat in range(args.repeats):
            for label, (code, extra) in settings.items():
                cache = tmp / f"cache-{repeat}-{len(extra)}-{code}-{extra[-1] if extra else ''}"
                ips = images_per_second(old if code == "old" else REPO, data, cache, args.backbone, extra)
                best[label] = max(best[label], ips)
                print(f"{label}: {ips:.1f} images/s", flush=True)
    before = best[next(iter(settings))]
    lines = ["## Before and after issue 15 (one run)", "",
             f"`python benchmarks/{' '.join(['before_after.py', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}; "
             f"{args.images} 600x450 HAM10000 JPEGs, {args.backbone}, offline ImageNet weights, best of "
             f"{args.repeats} alternated runs each, the images/s `extract` reports):", "",
             "| extraction | images/s | vs before |", "|---|---|---|",
             *(f"| {label} | {ips:.1f} | {ips / before:.2f}x |" for label, ips in best.items())]
    print("\n".join(lines))
    replace_block(args.out, "before-after", "\n".join(lines))


if __name__ == "__main__":
    main()
