"""Scores by subgroup on HAM10000: sex, age bands and body site (issue 34).

    python benchmarks/subgroups_ham.py [--cache cache] [--heads logreg,svm-linear]

HAM10000 (all 10,015 images, lesion-grouped 5-fold CV) on EfficientNet-Lite0 gap features, the default
extraction; every head scored by `--subgroups sex,age,localization` through the public API, exactly as
`featcache fit --subgroups` does. Writes the `subgroups-ham` block of docs/results.md: per subgroup the images,
balanced accuracy and AUROC with the lesion-resampled 95 % interval, the worst subgroup of each column marked,
and whether its interval lies wholly below the run's score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from docs_blocks import replace_block

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"


def _ci(entry: dict | None) -> str:
    if not entry:
        return "–"
    ci = entry.get("ci")
    return f"{entry['pooled']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--heads", default="logreg,svm-linear")
    args = parser.parse_args()
    import featcache as fc
    from featcache.evaluation.subgroups import in_reading_order

    started = time.perf_counter()
    fc.extract(HAM, group_col="lesion_id", cache=args.cache, quiet=True)
    runs = fc.fit(HAM, group_col="lesion_id", heads=args.heads, cv=5, cache=args.cache, quiet=True,
                  subgroups=["sex", "age", "localization"])
    lines = []
    for run in runs:
        metrics = run.metrics
        pooled = metrics["pooled"]
        lines += [f"### {run.head} on efficientnet_lite0 / gap: balanced accuracy "
                  f"{_ci({'pooled': pooled['balanced_accuracy'], 'ci': pooled['ci95']['balanced_accuracy']})}", "",
                  "| column | subgroup | images | balanced accuracy [95% CI] | AUROC [95% CI] | |",
                  "|---|---|---|---|---|---|"]
        for column, groups in metrics["subgroups"].items():
            for value, entry in in_reading_order(groups):
                below = "**worst, below the run**" if entry.get("below_overall") else "worst"
                mark = below if entry.get("worst") else ""
                lines.append(f"| {column} | {value} | {entry['n']} | {_ci(entry.get('balanced_accuracy'))} | "
                             f"{_ci(entry.get('auroc'))} | {mark} |")
        bands = metrics.get("subgroup_bands", {})
        lines += ["", "Bands: " + "; ".join(f"{c}: quartile edges {', '.join(f'{e:g}' for e in b)}"
                                            for c, b in bands.items()), ""]
        print("\n".join(lines[-12:]), flush=True)
    text = "\n".join(["## Subgroups: HAM10000 by sex, age and body site {#subgroups-ham}", "",
                      "`python benchmarks/subgroups_ham.py` (all 10,015 images, lesion-grouped 5-fold CV, "
                      "EfficientNet-Lite0 gap features of the default extraction; `--subgroups sex,age,localization`; "
                      f"{time.perf_counter() - started:.0f} s here with the extraction). HAM10000 has no skin-tone "
                      "column, so no model here was assessed across skin types. The best model of "
                      "docs/best-ham.toml (four backbones, 4 views, about an hour of extraction) is scored the same "
                      "way by adding `subgroups = [\"sex\", \"age\", \"localization\"]` to its `[fit]` table.", "",
                      *lines])
    replace_block(REPO / "docs" / "results.md", "subgroups-ham", text)


if __name__ == "__main__":
    main()
