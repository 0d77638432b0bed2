"""What `--ray` costs and gives on one machine, in one run: extraction and head fitting, local path vs Ray.

Extraction of N images (every k-th) of ../shared/data/ham10000_200x150 (200x150 JPEGs) into fresh caches:
- local, as `featcache extract` runs by default (torch threads = cores, one decode worker);
- local with one torch thread (what one CPU actor runs: the per-image overhead of Ray is measured against it);
- `--ray local` with 1 and 2 backbone actors of one CPU each (decode in Ray Data tasks).
Ray's start-up (cluster, then the first actor) is timed apart from the per-image rate.
Head fitting: `fit` of logreg and mlp (5-fold lesion-grouped CV) on those images, local vs Ray tasks.
Every Ray result is checked against the local one (features byte-equal at one thread, metrics equal).
Writes the block `ray` of docs/benchmarks.md.

Run: python benchmarks/ray_scale.py [--images 1000] [--backbone squeezenet1_1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from docs_blocks import replace_block

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.evaluation.fitting import fit_many
from featcache.evaluation.protocol import Protocol, RunRecipe
from featcache.extraction.extract import extract
from featcache.extraction.ray import RayCluster
from featcache.recipes import ExecutionPlan, FitPlan
from featcache.store.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"
DEFAULT_BACKBONE = "squeezenet1_1"


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    args = parser.parse_args()
    source = open_source(HAM)
    step = max(1, len(source.records) // args.images)  # every k-th image: all 7 classes, as in the whole set
    source = dataclasses.replace(source, records=source.records[::step][:args.images])
    n = len(source.records)
    cores = torch.get_num_threads()
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load = lambda: load_backbone(args.backbone)  # noqa: E731
        local, t_local = timed(lambda: extract(source, load(), cache_root=tmp / "local").entry)
        rows.append(("local (featcache extract)", f"{cores} torch threads, 1 decode worker", t_local))
        torch.set_num_threads(1)
        local1, t_local1 = timed(lambda: extract(source, load(), cache_root=tmp / "local1").entry)
        rows.append(("local, 1 torch thread", "1 thread, 1 decode worker", t_local1))
        cluster, t_start = timed(lambda: RayCluster("local"))
        tiny = dataclasses.replace(source, records=source.records[:8])
        _, t_first = timed(lambda: extract(tiny, load(), cache_root=tmp / "warm", plan=ExecutionPlan(cluster=cluster)))
        ray_entries = {}
        for actors in (1, 2):
            cluster.actors = actors
            entry, seconds = timed(lambda a=actors: extract(source, load(), cache_root=tmp / f"ray{a}",
                                                            plan=ExecutionPlan(cluster=cluster)).entry)
            ray_entries[actors] = entry
            rows.append((f"--ray local, {actors} actor(s)", f"{actors} x 1 CPU actor, Ray Data decode tasks", seconds))
            same = np.array_equal(entry.read("gap", local1.ids), local1.read("gap"))
            checks.append(f"{actors} actor(s): features byte-equal to the 1-thread local run: {same}")
        torch.set_num_threads(cores)
        protocol = Protocol(cv=5)
        heads = ["logreg", "mlp"]
        local_runs, t_fit_local = timed(lambda: fit_many(source, local1, RunRecipe(tuple(heads), protocol, "gap")))
        ray_runs, t_fit_ray = timed(lambda: fit_many(source, ray_entries[1], RunRecipe(tuple(heads), protocol, "gap"),
                                                     plan=FitPlan(force=True, cluster=cluster)))
        for a, b in zip(local_runs, ray_runs, strict=True):
            checks.append(f"fit {a.name.split('-')[0]}: metrics equal local vs Ray: "
                          f"{read_metrics(a)['pooled'] == read_metrics(b)['pooled']}")
    per_image_local1 = t_local1 / n
    lines = [
        f"`python benchmarks/ray_scale.py --images {args.images} --backbone {args.backbone}` "
        f"({time.strftime('%Y-%m-%d')}; {n} HAM10000 200x150 JPEGs, {args.backbone}, float16, 1 view; "
        f"{cores} cores, Ray {cluster.info['ray']}, local cluster started by the script):",
        "",
        "| extraction | setting | seconds | images/s | vs local |",
        "|---|---|---|---|---|",
    ]
    for name, setting, seconds in rows:
        lines.append(f"| {name} | {setting} | {seconds:.1f} | {n / seconds:.1f} | {t_local / seconds:.2f}x |")
    one_actor, two_actors = rows[2][2], rows[3][2]
    steady = (one_actor - t_first) / n  # every extraction starts its actor pool: take that start-up out
    decode_ms, megabytes = large_jpeg_decode_ms()
    lines += [
        "",
        f"Ray start-up: the cluster {t_start:.1f} s once, then at every extraction the actor pool (import torch, "
        f"load the backbone) and the first batch, {t_first:.1f} s. Per image against the same one-thread forward "
        f"run locally ({per_image_local1 * 1000:.1f} ms): {one_actor / n * 1000:.1f} ms with the start-up "
        f"({(one_actor / n - per_image_local1) * 1000:+.1f} ms), {steady * 1000:.1f} ms without it "
        f"({(steady - per_image_local1) * 1000:+.1f} ms). 2 actors against 1 on these 2 cores: "
        f"{one_actor / two_actors:.2f}x (the decode tasks share the cores).",
        "",
        f"Decode of one archive-size dermoscopy JPEG (a ham70 photograph upscaled to 4000x3000 with sensor-like "
        f"noise, {megabytes:.1f} MB; read, SHA-256, reduced-size JPEG decode, resize and crop to 224): "
        f"{decode_ms:.1f} ms on one core.",
        "",
        f"Head fitting (logreg + mlp, 5-fold lesion-grouped CV + refit, on these {n} images): local "
        f"{t_fit_local:.1f} s, Ray tasks {t_fit_ray:.1f} s.",
        "",
        "Checks: " + "; ".join(checks) + ".",
    ]
    text = "## Ray (`--ray`): overhead and local scaling {#ray}\n\n" + "\n".join(lines)
    print(text)
    replace_block(REPO / "docs" / "benchmarks.md", "ray", text)
    cluster_shutdown()


def large_jpeg_decode_ms(repeats: int = 10) -> tuple[float, float]:
    """What the decode tasks pay per image of the ISIC archive's size (multi-megapixel JPEGs)."""
    import hashlib
    import io

    from PIL import Image

    from featcache.data.images import decode_rgb

    photo = next((REPO.parent / "shared" / "data" / "ham70").rglob("*.jpg"))
    big = np.asarray(Image.open(photo).convert("RGB").resize((4000, 3000), Image.BICUBIC)).astype(np.float32)
    big += np.random.default_rng(0).normal(0, 6, big.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    data = buffer.getvalue()
    preprocess = load_backbone(DEFAULT_BACKBONE).preprocess
    started = time.perf_counter()
    for _ in range(repeats):
        hashlib.sha256(data).hexdigest()
        preprocess.to_uint8(decode_rgb(data, preprocess.decode_min_side))
    return (time.perf_counter() - started) / repeats * 1000, len(data) / 1e6


def cluster_shutdown() -> None:
    import ray

    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
