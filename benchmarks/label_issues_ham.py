"""Suspected label errors on HAM10000 with 5 % of the labels flipped at random (seeded).

    python benchmarks/label_issues_ham.py [--cache cache] [--share 0.05] [--seed 0]

Writes a copy of HAM10000's labels.csv with the flips (absolute image paths, so its features are copied
from the HAM10000 entry, not recomputed), runs `featcache.audit` on it under 5-fold lesion-grouped CV,
and counts how many flipped images are in the top 2x of label_issues.csv. Writes the `label-issues` block
of docs/results.md.
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
    args = parser.parse_args()
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
        fc.extract(noisy, cache=args.cache, quiet=True)  # copied from the HAM10000 entry: same files
        folder = fc.audit(noisy, group_col="lesion_id", cache=args.cache, out=Path(tmp) / "audit", quiet=True)
        with open(folder / "label_issues.csv", newline="") as handle:
            issues = [r["id"] for r in csv.DictReader(handle)]
    ids = {rows[i]["image_id"] for i in flipped}
    top = issues[:2 * len(flipped)]
    found = sum(1 for i in top if i in ids)
    text = "\n".join([
        "## Suspected label errors: HAM10000 with 5 % of the labels flipped", "",
        f"Command: `python benchmarks/label_issues_ham.py --share {args.share} --seed {args.seed}` (EfficientNet-Lite0 "
        "gap, `featcache audit` = confident learning on the mean out-of-fold probabilities of a logistic regression "
        "and an MLP under 5-fold lesion-grouped CV).", "",
        f"{len(flipped)} labels flipped at random; label_issues.csv lists {len(issues)} suspects; **{found} of the "
        f"{len(flipped)} flipped images ({found / len(flipped):.0%}) are in its top {len(top)}** (2x the flips)."])
    replace_block(REPO / "docs" / "results.md", "label-issues", text)
    print(text)


if __name__ == "__main__":
    main()
