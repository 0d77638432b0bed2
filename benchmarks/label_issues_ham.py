"""Suspected label errors on HAM10000 with 5 % of the labels flipped at random (seeded).

    python benchmarks/label_issues_ham.py [--cache cache] [--share 0.05] [--seed 0]
        [--backbone efficientnet_lite0] [--pools gap,penult,multi] [--pool penult] [--views 4]
        [--preprocess color-constancy]

Writes a copy of HAM10000's labels.csv with the flips (absolute image paths, so its features are copied
from the HAM10000 entry, not recomputed), runs `featcache.audit` on it under 5-fold lesion-grouped CV,
and counts how many flipped images are in the top 2x of label_issues.csv. Writes the `label-issues` block
of docs/results.md (EfficientNet-Lite0 gap, 1 view, by default; any other setting gets its own block, named
after it, e.g. `label-issues-penult-4views-color-constancy`).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from docs_blocks import replace_block

import featcache as fc

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--pools", default="gap", help="extracted poolings (as the HAM10000 entry's, to reuse it)")
    parser.add_argument("--pool", default="gap", help="the pooling audited")
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--preprocess", default="")
    args = parser.parse_args()
    features = dict(backbone=args.backbone, views=args.views, preprocess=args.preprocess, cache=args.cache,
                    quiet=True)
    with open(HAM / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(args.seed)
    classes = sorted({r["dx"] for r in rows})
    flipped = rng.choice(len(rows), int(round(args.share * len(rows))), replace=False)
    for i in flipped:
        rows[i]["dx"] = str(rng.choice([c for c in classes if c != rows[i]["dx"]]))
    inputs = Path(args.cache) / "benchmark-inputs"  # a fixed place: a rerun reuses its entry and runs
    inputs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        noisy = inputs / f"ham10000_flipped{round(args.share * 100)}_seed{args.seed}.csv"
        for r in rows:
            r["path"] = str((HAM / r["path"]).resolve())
        with open(noisy, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        # copied from the HAM10000 entry made with the same settings: the same files
        fc.extract(noisy, pools=args.pools, **features)
        folder = fc.audit(noisy, group_col="lesion_id", pool=args.pool, out=Path(tmp) / "audit", **features)
        with open(folder / "label_issues.csv", newline="") as handle:
            issues = [r["id"] for r in csv.DictReader(handle)]
    ids = {rows[i]["image_id"] for i in flipped}
    top = issues[:2 * len(flipped)]
    found = sum(1 for i in top if i in ids)
    default = (args.backbone, args.pools, args.pool, args.views, args.preprocess) == (
        "efficientnet_lite0", "gap", "gap", 1, "")
    options = "" if default else (f" --backbone {args.backbone} --pools {args.pools} --pool {args.pool} "
                                  f"--views {args.views}"
                                  + (f" --preprocess {args.preprocess}" if args.preprocess else ""))
    setting = (f"{args.backbone} {args.pool}, {args.views} view{'s' if args.views > 1 else ''}"
               + (f", {args.preprocess}" if args.preprocess else ""))
    text = "\n".join([
        f"## Suspected label errors: HAM10000 with {args.share:.0%} of the labels flipped ({setting})", "",
        f"Command: `python benchmarks/label_issues_ham.py --share {args.share} --seed {args.seed}{options}` ("
        "`featcache audit` = confident learning on the mean out-of-fold probabilities of a logistic regression "
        "and an MLP under 5-fold lesion-grouped CV).", "",
        f"{len(flipped)} labels flipped at random; label_issues.csv lists {len(issues)} suspects; **{found} of the "
        f"{len(flipped)} flipped images ({found / len(flipped):.0%}) are in its top {len(top)}** (2x the flips)."])
    name = "label-issues" if default else "-".join(
        ["label-issues", args.pool, f"{args.views}views", *args.preprocess.split(",")]).rstrip("-")
    replace_block(REPO / "docs" / "results.md", name, text)
    print(text)


if __name__ == "__main__":
    main()
