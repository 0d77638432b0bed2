"""The default `featcache extract` against the machine's ceiling for it, measured in the same run.

The ceiling for a backbone on C cores, when the JPEG decode and the forward share the cores perfectly:
C / (decode + C / forward) images/s, where ``forward`` is the bare forward's images/s on all cores (the
default engine on pre-made batches of 8 and 32, the better, as extraction runs it) and ``decode`` the
decode's core-seconds per image, measured as the work itself done in this process on one thread: read,
SHA-256, decode, resize with the backbone's own interpolation, crop (no hand-over between processes).
Beside it, labelled, the earlier figure, whose decode was featcache's own loader worker (the same work
plus the hand-over of each batch to the main process): a ceiling that featcache's own overhead lowers.

Also measured: the extraction itself (the images/s extract reports, start-up excluded) and the whole
command (N / its wall time, in a fresh process, the engine compiled before: an earlier command on another
dataset exported and compiled it, so this one takes the lean path, featcache.extraction.lean, without
importing PyTorch).

On N JPEGs of 600x450 (ham70's photographs copied under N distinct names). Writes the block `ceiling` of
docs/benchmarks.md.

Run: python benchmarks/ceiling.py [--images 3072] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_common import HAM70, ham70_copies, run_command
from docs_blocks import replace_block
from efficiency import bare_forward_ips, decode_ips, inprocess_decode_ips

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.extraction.engines import resolve_engine

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    photos = sorted(HAM70.rglob("*.jpg"))
    cores = torch.get_num_threads()
    rows = []
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
        sample = open_source(data)
        sample.records = sample.records[:1024]  # the decode's cost per image (the photos repeat)
        # the parts and the command interleaved, repeated: this machine is shared, and each ratio is
        # taken within one repeat
        for _ in range(args.repeats):
            forward = max(bare_forward_ips(backbone, b, 512, engine, cache) for b in (8, 32))
            work = inprocess_decode_ips(backbone, sample)  # the decode's own work, one core
            decode = decode_ips(backbone, sample, "pil")  # featcache's loader worker (the earlier figure)
            shutil.rmtree(cache / data.name, ignore_errors=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            seconds, output = run_command(["featcache", "extract", "--data", str(data), "--cache", str(cache),
                                           "--backbone", args.backbone], stderr=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            busy = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / seconds
            rows.append({"forward": forward, "work": work, "ceiling": cores / (cores / forward + 1 / work),
                         "decode": decode, "worker_ceiling": cores / (cores / forward + 1 / decode),
                         "reported": float(re.search(r"\(([\d.]+) images/s\)", output).group(1)),
                         "whole": args.images / seconds, "busy": busy,
                         "path": "lean" if "without PyTorch" in output else "full"})
    lines = ["## The default extraction against the machine's ceiling", "",
             f"`python benchmarks/ceiling.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f": {args.backbone}, default engine ({engine}), {args.images} JPEGs of 600x450, {cores} cores, "
             "img/s, all in this run. Ceiling = C / (decode + C / forward): forward = the bare forward on all cores; "
             "decode = the work itself in-process on one core (read, SHA-256, decode, resize with the backbone's own "
             "interpolation, crop). Beside it, labelled *worker*, the earlier ceiling, whose decode was featcache's "
             "loader worker (the same work plus each batch's hand-over between processes). Each repeat measures the "
             "parts, then the whole command in a fresh process, the engine compiled before by a command on another "
             "dataset; each ratio is taken within its repeat.", "",
             "| repeat | bare forward | decode in-process (1 core) | **ceiling** | decode, loader worker | "
             "worker ceiling | extraction (as reported) | whole command / ceiling | whole / worker ceiling | path | "
             "cores busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(rows, 1):
        lines.append(f"| {k} | {r['forward']:.1f} | {r['work']:.1f} | **{r['ceiling']:.1f}** | {r['decode']:.1f} | "
                     f"{r['worker_ceiling']:.1f} | {r['reported']:.1f} | {r['whole']:.1f} "
                     f"(**{r['whole'] / r['ceiling']:.2f}**) | {r['whole'] / r['worker_ceiling']:.2f} | {r['path']} | "
                     f"{r['busy']:.2f} |")
    ratio = statistics.median(r["whole"] / r["ceiling"] for r in rows)
    worker = statistics.median(r["whole"] / r["worker_ceiling"] for r in rows)
    lines += ["", f"The whole command reaches **{ratio:.2f}** of the ceiling (median of {len(rows)} repeats; "
              f"target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'}); {worker:.2f} of the earlier, worker-based "
              "figure."]
    replace_block(args.out, "ceiling", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
