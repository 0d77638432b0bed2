"""Where a short `featcache extract` spends its start-up, and the warm path that skips it.

On N JPEGs of 600x450 (ham70's photographs copied under N distinct names), in one run:

- whole commands, each in a fresh process: the first extraction (ONNX export, engine compile, every
  image); a warm no-op by the warm path (every image cached: no backbone, no PyTorch); the same no-op
  through the full path (its recipe removed first: the backbone named from its weights, as before); and
  one new image beside N cached ones (the engine compiled before), by the lean path (the export run
  without PyTorch) and by the full path (the recipes removed first);
- the full path's start-up broken down, in a fresh process: imports, backbone build and weights (with
  the state-dict hash and the probe forward), the ONNX export check (its file's SHA-256), the engine
  compile, and the resume plan (a stat of every file); and the lean path's: its imports, the recipe and
  the plan, OpenVINO's import and compile, and one image through it.

Writes the block `startup` of docs/benchmarks.md.

Run: python benchmarks/startup.py [--images 1024]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import HAM70, ham70_copies, run_command
from docs_blocks import replace_block

REPO = Path(__file__).resolve().parents[1]

BREAKDOWN = r"""
import json, sys, time
marks = {}
t = time.perf_counter()
import featcache.cli  # the command line itself (typer, rich)
marks["import featcache.cli"] = time.perf_counter() - t; t = time.perf_counter()
import torch
marks["import torch"] = time.perf_counter() - t; t = time.perf_counter()
import torchvision, timm
marks["import torchvision, timm"] = time.perf_counter() - t; t = time.perf_counter()
from featcache.extraction.extract import name_entry
from featcache.extraction.engines import make_forward, onnx_path
marks["import featcache's extraction"] = time.perf_counter() - t; t = time.perf_counter()
from featcache.backbones.models import load_backbone
model = load_backbone("efficientnet_lite0")
marks["backbone: build, weights, state hash, probe"] = time.perf_counter() - t; t = time.perf_counter()
from pathlib import Path
cache = Path(sys.argv[1]); data = sys.argv[2]
onnx_path(model, cache)
marks["ONNX export check (file SHA-256)"] = time.perf_counter() - t; t = time.perf_counter()
make_forward("openvino", model, cache)
marks["engine compile (OpenVINO)"] = time.perf_counter() - t; t = time.perf_counter()
from featcache.data.sources import open_source
from featcache.extraction.resume import images_to_extract
source = open_source(data)
named = name_entry(source, model, cache)
todo, skipped = images_to_extract(source, named.entry_dir)
marks[f"source, entry name and resume plan ({skipped} files stat-checked)"] = time.perf_counter() - t
print(json.dumps(marks))
"""


LEAN_BREAKDOWN = r"""
import json, sys, time
marks = {}
t = time.perf_counter()
import featcache.cli  # the command line itself (typer, rich)
marks["import featcache.cli"] = time.perf_counter() - t; t = time.perf_counter()
from pathlib import Path
from featcache.data.sources import open_source
from featcache.extraction.lean import _lean_recipe
from featcache.extraction.resume import images_to_extract
from featcache.extraction.warm import engine_key
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.store.naming import entry_path
cache, data = Path(sys.argv[1]), sys.argv[2]
source = open_source(data)
# as `featcache extract --data DATA` names it: every option at its default
recipe = _lean_recipe(cache, engine_key("efficientnet_lite0", FeatureRecipe(), ExecutionPlan()))
entry_dir = entry_path(cache, source.name, recipe["entry"]["backbone"], recipe["fingerprint"])
todo, skipped = images_to_extract(source, entry_dir)
marks[f"source, recipe (export SHA-256) and resume plan ({skipped} files stat-checked)"] = time.perf_counter() - t
t = time.perf_counter()
import openvino
marks["import openvino"] = time.perf_counter() - t; t = time.perf_counter()
from featcache.data.images import Preprocess
from featcache.extraction.runtimes import exported_forward
lean = recipe["lean"]
forward = exported_forward(lean["engine"], cache / lean["export"], tuple(recipe["entry"]["pools"]), lean["threads"])
marks["engine compile (OpenVINO)"] = time.perf_counter() - t; t = time.perf_counter()
preprocess = Preprocess(**recipe["entry"]["fingerprint_inputs"]["preprocess"])
forward(preprocess.load_array(Path(todo[0].path).read_bytes())[None])
marks["one image: read, decode, resize, forward"] = time.perf_counter() - t
print(json.dumps(marks))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    photos = sorted(HAM70.rglob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        ham70_copies(data, args.images)
        command = ["featcache", "extract", "--data", str(data), "--cache", str(cache), "-q"]
        first = run_command(command)[0]
        warm = statistics.median(run_command(command)[0] for _ in range(args.repeats))
        full = []
        for _ in range(args.repeats):
            shutil.rmtree(cache / ".warm", ignore_errors=True)
            full.append(run_command(command)[0])
        full_noop = statistics.median(full)
        shutil.copyfile(photos[0], data / "photos" / "new.jpg")
        one_new = run_command(command)[0]  # the recipes were written again by the last full run
        shutil.copyfile(photos[1], data / "photos" / "new2.jpg")
        shutil.copyfile(photos[2], data / "photos" / "new3.jpg")  # what the lean breakdown extracts
        lean_done = subprocess.run([sys.executable, "-c", LEAN_BREAKDOWN, str(cache), str(data)], capture_output=True,
                                   text=True, check=True)
        lean_marks = json.loads(lean_done.stdout.strip().splitlines()[-1])
        shutil.rmtree(cache / ".warm")
        one_new_full = run_command(command)[0]
        done = subprocess.run([sys.executable, "-c", BREAKDOWN, str(cache), str(data)], capture_output=True, text=True,
                              check=True)
        marks = json.loads(done.stdout.strip().splitlines()[-1])
    lines = ["## Start-up of a short `featcache extract` (issue 26)", "",
             f"`python benchmarks/startup.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f": {args.images} JPEGs of 600x450, EfficientNet-Lite0, default engine (OpenVINO), 2 cores; "
             f"whole commands in fresh processes (median of {args.repeats} where repeated), all in this run.", "",
             "| command | seconds |", "|---|---|",
             f"| first extraction (export, compile, {args.images} images) | {first:.2f} |",
             f"| warm no-op, full path (the backbone named from its weights, as before) | {full_noop:.2f} |",
             f"| **warm no-op, warm path** (recipe: no backbone, no PyTorch) | **{warm:.2f}** |",
             f"| one new image beside {args.images} cached, full path (recipes removed first) | {one_new_full:.2f} |",
             f"| **one new image beside {args.images} cached, lean path** (engine compiled before: its export run "
             f"without PyTorch) | **{one_new:.2f}** |", "",
             f"The warm path is {full_noop / warm:.1f}x faster than the full path's no-op, the lean path "
             f"{one_new_full / one_new:.1f}x faster than the full path with one new image (target: <= 2 s).", "",
             "Where the full path's start-up goes (one fresh process, seconds):", "",
             "| part | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in marks.items()]
    lines += ["", f"Total of the parts: {sum(marks.values()):.2f} s.", "",
              "Where the lean path's start-up goes (one fresh process, seconds; a Python interpreter starts in "
              "about 0.05 s):", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in lean_marks.items()]
    lines += ["", f"Total of the parts: {sum(lean_marks.values()):.2f} s."]
    replace_block(args.out, "startup", "\n".join(lines))
    print("\n".join(lines))



if __name__ == "__main__":
    main()
