"""The default head grid on 10,000 x 384 features: seconds for all heads x 5 folds, no tuning.

Issue 6's target is <= 60 s on 2 CPU cores. Each head's seconds cover its 5 folds *and* the
final refit on all rows, which run side by side in worker processes (one per core).

The features are real: the HAM10000 EfficientNet-Lite0 embeddings (from cache/) projected to
their first 384 principal components (the DINOv2-S/14 width), 10,000 images, 7 classes,
lesion-grouped 5-fold CV. Prints each head's seconds (from the run's own record, measured in
this process), their total, and the wall clock of the whole grid.

Needs the HAM10000 EfficientNet-Lite0 entry in cache/ (``python benchmarks/heads_ham10000.py`` or
``featcache extract --backbone efficientnet_lite0 --data ../shared/data/ham10000_200x150/labels.csv``).

Run: python benchmarks/heads_speed.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA

from featcache.data.sources import open_source
from featcache.evaluation.features import LabeledFeatures, labeled_features
from featcache.evaluation.fitting import EntrySelection, find_entry
from featcache.evaluation.head_registry import baselines, head_names
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.runner import fit_head
from featcache.recipes import FitPlan

BASELINES, HEADS = baselines(), tuple(h for h in head_names("all") if h not in baselines())

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"


class _Entry:
    """Stands in for a cache entry: ``fit_head`` only needs a fingerprint, a backbone and a folder."""

    def __init__(self, path: Path):
        self.path, self.fingerprint, self.manifest = path, "pca384", {"backbone": "efficientnet_lite0+pca384"}


def ham_pca_features() -> LabeledFeatures:
    """10,000 HAM10000 EfficientNet-Lite0 embeddings from cache/, projected to 384 dimensions."""
    source = open_source(HAM)
    entry = find_entry(REPO / "cache", source, EntrySelection("efficientnet_lite0"))
    started = time.perf_counter()
    full = labeled_features(source, entry, entry.pools[0])
    load_seconds = time.perf_counter() - started
    keep = np.arange(10_000)
    X = PCA(384, random_state=0).fit_transform(full.X[keep]).astype(np.float32)
    print(f"features: {X.shape[0]} x {X.shape[1]}, loaded from the store in {load_seconds:.1f} s (10,015 x 1280)")
    return LabeledFeatures(X, full.y[keep], full.groups[keep], None, [full.ids[i] for i in keep], full.classes)


def run_grid(data: LabeledFeatures, verbose: bool = False) -> float:
    """Fits every default head (5 folds + refit each); returns the wall-clock seconds of it all."""
    if verbose:
        print("| head | CV seconds (5 folds + refit) |")
        print("|---|---|")
    total = 0.0
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for head in HEADS + BASELINES:
            run = fit_head(data, _Entry(Path(tmp)), head, "gap", Protocol(), "ham10000_pca384",
                           plan=FitPlan(force=True))
            seconds = json.loads((run / "metrics.json").read_text())["cv_seconds"]
            total += seconds
            if verbose:
                print(f"| {head} | {seconds:.1f} |", flush=True)
    wall = time.perf_counter() - wall
    if verbose:
        print(f"| **all {len(HEADS + BASELINES)} heads** | **{total:.0f}** (target <= 60) |")
        print(f"wall clock for the whole grid, metrics, bootstrap CIs and run files included: {wall:.0f} s")
    return wall


def main() -> None:
    run_grid(ham_pca_features(), verbose=True)


if __name__ == "__main__":
    main()
