"""Across clinics on the shared data: HAM10000 (lesion-grouped CV) -> the official ISIC 2018 test set.

    python benchmarks/shift_ham_isic.py [--cache cache] [--heads logreg,svm-rbf,mlp] [--align none,moments,coral]

EfficientNet-Lite0 `gap` features of all of HAM10000 (200x150) and of the ISIC 2018 Task 3 test set (224),
then every head fit on HAM10000 under 5-fold lesion-grouped CV, refit on all of it and scored on the test
set, once per `--test-align`. Writes the `shift` block of docs/results.md: the shift audit (domain
classifier AUROC, share of test images beyond the OOD threshold, prevalence estimated without labels) and
each head's test balanced accuracy without and with alignment. Everything goes through featcache's API,
as a user would run it; finished extractions and runs are reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from docs_blocks import replace_block

import featcache as fc

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--heads", default="logreg,svm-rbf,mlp")
    parser.add_argument("--align", default="none,moments,coral")
    args = parser.parse_args()
    train = SHARED / "ham10000_200x150" / "labels.csv"
    test = SHARED / "isic2018_task3_test_224" / "labels.csv"
    for source in (train, test):
        fc.extract(source, cache=args.cache, quiet=True)
    rows, audit = [], None
    for method in args.align.split(","):
        runs = fc.fit(train, heads=args.heads.split(","), group_col="lesion_id", test_data=test,
                      test_align=method, cache=args.cache, quiet=True)
        for run in runs:
            t = run.metrics["test"]
            audit = audit or t["shift"]
            low, high = t["ci95"]["balanced_accuracy"]
            rows.append(f"| {run.head} | {method} | {run.metrics['pooled']['balanced_accuracy']:.3f} | "
                        f"{t['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}] | {t['auroc']:.3f} |")
            print(rows[-1], flush=True)
    low, high = audit["domain_auroc_ci"]
    estimate = ", ".join(f"{c} {audit['prevalence_estimate'][c]:.2f} ({audit['prevalence_true'][c]:.2f})"
                         for c in audit["prevalence_estimate"])
    text = "\n".join([
        "## Across clinics: HAM10000 -> ISIC 2018 test, shift audit and test alignment {#across-clinics}", "",
        f"Command: `python benchmarks/shift_ham_isic.py --heads {args.heads} --align {args.align}` "
        "(EfficientNet-Lite0 gap, 5-fold lesion-grouped CV on HAM10000, refit on all of it, scored on the "
        "1,512 official test images).", "",
        f"Shift audit (`metrics.json` `test.shift`): domain classifier AUROC **{audit['domain_auroc']:.3f}** "
        f"[{low:.3f}, {high:.3f}]; {audit['ood_fraction']:.0%} of test images beyond the OOD threshold (5 % of "
        f"held-out training images are); prevalence estimated without labels (true): {estimate}.", "",
        "| head | --test-align | CV balanced accuracy (pooled) | test balanced accuracy [95% CI] | test AUROC |",
        "|---|---|---|---|---|", *rows])
    replace_block(REPO / "docs" / "results.md", "shift", text)
    print(text)


if __name__ == "__main__":
    main()
