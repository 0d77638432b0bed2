"""Coral's failure mode on small test batches, and its guard (issue 36, part 4).

    python benchmarks/coral_guard.py [--cache cache] [--draws 5]

EfficientNet-Lite0 `gap` features (1,280 dimensions) of all of HAM10000 and of the official ISIC 2018 test set.
Each head (logistic regression, the RBF SVM) is fit once on all of HAM10000, as `fit --test-data` refits it, and
scored on random test batches of 100 to 1,512 images (the same batches for every method), aligned without
labels by `none`, `moments`, `coral` with the fixed shrinkage of featcache 0.3 (0.1 towards the diagonal) and
`coral` with today's Ledoit-Wolf shrinkage. Writes the `coral-guard` block of docs/results.md: mean macro AUROC
and balanced accuracy over the draws, and the shrinkage Ledoit-Wolf chose for the test side.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from docs_blocks import replace_block

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SIZES = (100, 200, 400, 800, 1512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    import featcache as fc
    from featcache.data.sources import open_source
    from featcache.evaluation.features import labeled_features
    from featcache.evaluation.head_registry import make_pipeline
    from featcache.evaluation.metrics import compute_metrics
    from featcache.evaluation.shift import align, coral_shrinkage
    from featcache.store.entries import CacheEntry

    started = time.perf_counter()
    train_csv, test_csv = SHARED / "ham10000_200x150" / "labels.csv", SHARED / "isic2018_task3_test_224" / "labels.csv"
    entries = [CacheEntry(fc.extract(p, cache=args.cache, quiet=True, engine="openvino").path)
               for p in (train_csv, test_csv)]
    train = labeled_features(open_source(train_csv, group_col="lesion_id"), entries[0], "gap")
    test = labeled_features(open_source(test_csv), entries[1], "gap", audit=False)
    methods = {"none": ("none", None), "moments": ("moments", None), "coral (fixed 0.1, featcache 0.3)":
               ("coral", 0.1), "coral (Ledoit-Wolf)": ("coral", None)}
    rows = []
    for head in ("logreg", "svm-rbf"):
        model = make_pipeline(head).fit(train.X, train.y)
        for n in SIZES:
            rng = np.random.default_rng(n)
            draws = [np.sort(rng.choice(len(test.y), n, replace=False)) for _ in range(args.draws if n < len(
                test.y) else 1)]
            shrinkage = float(np.mean([coral_shrinkage(test.X[d]) for d in draws]))
            for name, (method, fixed) in methods.items():
                auroc, bacc = [], []
                for d in draws:
                    X = align(test.X[d], train.X, method, shrinkage=fixed)
                    scores = compute_metrics(test.y[d], model.predict_proba(X), train.classes)
                    auroc.append(scores["auroc"])
                    bacc.append(scores["balanced_accuracy"])
                rows.append(f"| {head} | {n} | {name} | {np.mean(auroc):.3f} | {np.mean(bacc):.3f} | "
                            f"{shrinkage:.2f} |")
                print(rows[-1], flush=True)
    text = "\n".join([
        "## Coral on small test batches, and its guard {#coral-guard}", "",
        f"`python benchmarks/coral_guard.py --draws {args.draws}` (EfficientNet-Lite0 gap, 1,280 dimensions; each "
        "head fit on all of HAM10000, 7 classes; random batches of the official ISIC 2018 test set, the same "
        f"batches for every method, {args.draws} draws per size below 1,512; {time.perf_counter() - started:.0f} s "
        "here). The last column is the shrinkage towards the diagonal that Ledoit-Wolf chose for the test side's "
        "covariance (1: none of it could be estimated).", "",
        "| head | test images | --test-align | macro AUROC | balanced accuracy | test-side shrinkage (LW) |",
        "|---|---|---|---|---|---|", *rows])
    replace_block(REPO / "docs" / "results.md", "coral-guard", text)


if __name__ == "__main__":
    main()
