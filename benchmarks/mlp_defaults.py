"""The MLP head's fast defaults against its previous ones, over several seeds, on full-width features.

The defaults (batches of 512, lr 2e-3, patience 10) were chosen on 10k x 384 features, where they
matched the previous ones (256, 1e-3, 15) in balanced accuracy at 60 % of the time. This checks the
same trade on HAM10000's 1280-d EfficientNet-Lite0 features, standardized, lesion-grouped 5-fold CV
(the same folds for every run), one seed at a time so that seed noise shows.

Run: python benchmarks/mlp_defaults.py [--cache cache] [--seeds 3]
Needs ../shared/data/ham10000_200x150 (its Lite0 features are extracted if missing, ~8 min on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from featcache.data.sources import open_source
from featcache.evaluation.features import labeled_features
from featcache.evaluation.head_registry import make_pipeline
from featcache.evaluation.metrics import compute_metrics
from featcache.evaluation.splits import make_folds
from featcache.extraction.extract import extract

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"
SETTINGS = {"defaults (512, lr 2e-3, patience 10)": {},
            "previous (256, lr 1e-3, patience 15)": {"head__batch_size": 256, "head__lr": 1e-3, "head__patience": 15}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    source = open_source(HAM)
    entry = extract(source, "efficientnet_lite0", cache_root=args.cache).entry
    data = labeled_features(source, entry, "gap")
    folds = make_folds(data.y, data.groups, 5, 0)
    for name, params in SETTINGS.items():
        scores, seconds = [], []
        for seed in range(args.seeds):
            started = time.perf_counter()
            oof = np.zeros((len(data.y), len(data.classes)))
            for train, test in folds:
                model = make_pipeline("mlp", seed=seed).set_params(**params).fit(data.X[train], data.y[train])
                oof[test] = model.predict_proba(data.X[test])
            seconds.append(time.perf_counter() - started)
            scores.append(compute_metrics(data.y, oof, data.classes)["balanced_accuracy"])
            print(f"{name}, seed {seed}: balanced accuracy {scores[-1]:.3f} ({seconds[-1]:.0f} s)", flush=True)
        print(f"{name}: {np.mean(scores):.3f} +- {np.std(scores):.3f} over {args.seeds} seeds, "
              f"{np.mean(seconds):.0f} s per 5 folds")


if __name__ == "__main__":
    main()
