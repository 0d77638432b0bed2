"""Cached features vs the backbone in the training loop: how much faster the head grid is.

Issue 6's target: the whole default head grid on 10,000 x 384 cached features is >= 100x faster
than training one MLP head for the same number of epochs with the backbone in the loop, which is
what users did before featcache (decode + frozen DINOv2-S/14 forward on every image of every epoch).

Measured in one run:
1. the MLP head on the cached features (5 folds + the final refit, as ``featcache fit`` runs it),
   with the epochs and rows of each of its fits;
2. the whole default grid on the same features (as benchmarks/heads_speed.py);
3. the backbone in the loop on a subset: real HAM10000 JPEGs decoded and resized by DataLoader
   workers, DINOv2-S/14 forward (random weights: timing only; frozen, inference mode), then the
   same MLP's training step, for ``--epochs`` epochs over ``--images`` images. Seconds per
   image-epoch times the image-epochs the cached MLP used gives the in-loop time it would take.

Run: python benchmarks/backbone_in_loop.py [--images 96 --epochs 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from heads_speed import ham_pca_features, run_grid
from torch.utils.data import DataLoader

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.extraction.loader import _collate, _ImageDataset, _worker_init
from featcache.recipes import FitPlan

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"


def in_loop_seconds_per_image_epoch(n_images: int, epochs: int, batch_size: int) -> float:
    """One MLP head trained with a frozen DINOv2-S/14 forward on every batch of every epoch."""
    source = open_source(HAM)
    backbone = load_backbone("dinov2_vits14", weights="random")
    records = source.records[:n_images]
    classes = sorted({r.label for r in records})
    target = torch.tensor([classes.index(r.label) for r in records])
    mlp = torch.nn.Sequential(torch.nn.Linear(384, 256), torch.nn.GELU(), torch.nn.Dropout(0.3),
                              torch.nn.Linear(256, len(classes)))
    optimiser = torch.optim.AdamW(mlp.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = DataLoader(_ImageDataset(records, backbone.preprocess), batch_size=batch_size, shuffle=True,
                        num_workers=2, collate_fn=_collate, worker_init_fn=_worker_init,
                        persistent_workers=True, generator=torch.Generator().manual_seed(0))
    timed_from = None
    for epoch in range(epochs + 1):  # epoch 0 warms up the workers and the allocator, untimed
        if epoch == 1:
            timed_from = time.perf_counter()
        for batch in loader:
            with torch.inference_mode():  # the backbone is frozen
                features = backbone.model(backbone.preprocess.normalize(batch["images"]))["cls"]
            loss = torch.nn.functional.cross_entropy(mlp(features.clone()), target[batch["ok"]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return (time.perf_counter() - timed_from) / (epochs * n_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    data = ham_pca_features()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        run = fit_head(data, _entry(Path(tmp)), "mlp", "gap", Protocol(), "ham10000_pca384", plan=FitPlan(force=True))
        cached_mlp = time.perf_counter() - started
        fits = json.loads((run / "metrics.json").read_text())["mlp_fits"]
    grid = run_grid(data)
    image_epochs = sum(f["epochs"] * f["rows"] for f in fits)
    per_image_epoch = in_loop_seconds_per_image_epoch(args.images, args.epochs, args.batch_size)
    in_loop = per_image_epoch * image_epochs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cached MLP head (5 folds + refit, {[f['epochs'] for f in fits]} epochs): {cached_mlp:.1f} s")
    print(f"whole default grid on cached features: {grid:.1f} s (wall, metrics and run files included)")
    print(f"backbone in the loop: {per_image_epoch * 1000:.1f} ms per image-epoch "
          f"({args.images} images x {args.epochs} epochs, DINOv2-S/14, batch {args.batch_size})")
    print(f"the same MLP with the backbone in the loop: {image_epochs:,} image-epochs -> {in_loop:,.0f} s "
          f"({in_loop / 3600:.1f} h)")
    print(f"| cached MLP head vs in-loop MLP | **{in_loop / cached_mlp:,.0f}x** |")
    print(f"| whole cached grid vs in-loop MLP | **{in_loop / grid:,.0f}x** (target >= 100x) |")


def _entry(path: Path):
    from heads_speed import _Entry

    return _Entry(path)


if __name__ == "__main__":
    main()
