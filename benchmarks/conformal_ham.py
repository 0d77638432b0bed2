"""Conformal prediction sets on HAM10000 under lesion-grouped CV, and on the ISIC 2018 test set.

    python benchmarks/conformal_ham.py [--cache cache] [--level 0.9] [--heads logreg]

For each head and mode (marginal, class): the out-of-fold coverage and mean set size of `fit --conformal`,
and the test set's coverage as it is (another clinic's images) and with `--test-align moments`. Writes the
`conformal` block of docs/results.md.
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
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--heads", default="logreg")
    args = parser.parse_args()
    train = SHARED / "ham10000_200x150" / "labels.csv"
    test = SHARED / "isic2018_task3_test_224" / "labels.csv"
    lines = []
    for mode in ("marginal", "class"):
        for align in ("none", "moments"):
            for run in fc.fit(train, heads=args.heads.split(","), group_col="lesion_id", test_data=test,
                              conformal=args.level, conformal_mode=mode, test_align=align, cache=args.cache,
                              quiet=True):
                oof, held = run.metrics["conformal"], run.metrics["test"]["conformal"]
                lines.append(f"| {run.head} | {mode} | {align} | {oof['coverage']:.3f} | {oof['mean_set_size']:.2f} | "
                             f"{held['coverage']:.3f} | {held['mean_set_size']:.2f} |")
                print(lines[-1], flush=True)
    text = "\n".join([
        f"## Conformal prediction sets at {args.level:.0%}", "",
        f"Command: `python benchmarks/conformal_ham.py --level {args.level} --heads {args.heads}` (EfficientNet-Lite0 "
        "gap; cross-conformal on the folds of 5-fold lesion-grouped CV on HAM10000; the ISIC 2018 test set scored "
        "with the threshold of all folds).", "",
        "| head | mode | --test-align | out-of-fold coverage | mean set size | ISIC 2018 test coverage | "
        "test mean set size |", "|---|---|---|---|---|---|---|", *lines])
    replace_block(REPO / "docs" / "results.md", "conformal", text)
    print(text)


if __name__ == "__main__":
    main()
