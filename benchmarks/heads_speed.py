"""The default head grid on 10,000 x 384 features: seconds for all heads x 5 folds, no tuning.

Issue 6's target is <= 60 s on 2 CPU cores. The features are real: the HAM10000 EfficientNet-Lite0
embeddings (from cache/, see heads_ham10000.py) projected to their first 384 principal components
(the DINOv2-S/14 width), 10,000 images, 7 classes, lesion-grouped 5-fold CV. Prints each head's CV
time (from the run's own record, measured in this process) and the total.

Run: python benchmarks/heads_speed.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA

from featcache.evaluate import LabeledFeatures, Protocol, fit_head, labeled_features
from featcache.heads import BASELINES, HEADS
from featcache.pipeline import find_entry
from featcache.sources import open_source

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"


class _Entry:
    """Stands in for a cache entry: ``fit_head`` only needs a fingerprint, a backbone and a folder."""

    def __init__(self, path: Path):
        self.path, self.fingerprint, self.manifest = path, "pca384", {"backbone": "efficientnet_lite0+pca384"}


def main() -> None:
    source = open_source(HAM)
    entry = find_entry(REPO / "cache", source, "efficientnet_lite0", None)
    started = time.perf_counter()
    full = labeled_features(source, entry, entry.pools[0])
    load_seconds = time.perf_counter() - started
    keep = np.arange(10_000)
    X = PCA(384, random_state=0).fit_transform(full.X[keep]).astype(np.float32)
    data = LabeledFeatures(X, full.y[keep], full.groups[keep], None, [full.ids[i] for i in keep], full.classes)
    print(f"features: {X.shape[0]} x {X.shape[1]}, loaded from the store in {load_seconds:.1f} s (10,015 x 1280)")
    print("| head | CV seconds (5 folds) |")
    print("|---|---|")
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for head in HEADS + BASELINES:
            run = fit_head(data, _Entry(Path(tmp)), head, "gap", Protocol(), "ham10000_pca384", force=True)
            seconds = json.loads((run / "metrics.json").read_text())["cv_seconds"]
            total += seconds
            print(f"| {head} | {seconds:.1f} |", flush=True)
    print(f"| **all {len(HEADS + BASELINES)} heads** | **{total:.0f}** (target <= 60) |")


if __name__ == "__main__":
    main()
