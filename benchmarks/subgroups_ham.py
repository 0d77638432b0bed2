"""Scores by subgroup on HAM10000: sex, age bands and body site (issue 34).

    python benchmarks/subgroups_ham.py [--cache cache] [--heads logreg,svm-linear] [--best]

HAM10000 (all 10,015 images, lesion-grouped 5-fold CV) on EfficientNet-Lite0 gap features, the default
extraction; every head scored by `--subgroups sex,age,localization` through the public API, exactly as
`featcache fit --subgroups` does. ``--best`` also scores the best model of docs/best-ham.toml (its fused
linear SVM: four backbones with colour constancy and 4 views, scored on the official ISIC 2018 test set too),
by running that study with only that head and the subgroups added: subgroups read a run's predictions, so the
run is the study's own (same folder, same numbers). Writes the `subgroups-ham` block of docs/results.md: per
subgroup the images, balanced accuracy and AUROC with the lesion-resampled 95 % interval, the worst subgroup of
each column marked, and whether its interval lies wholly below the run's score.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

from docs_blocks import replace_block

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150" / "labels.csv"
BEST = REPO / "docs" / "best-ham.toml"
COLUMNS = ["sex", "age", "localization"]


def _ci(entry: dict | None) -> str:
    if not entry:
        return "–"
    ci = entry.get("ci")
    return f"{entry['pooled']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def run_table(run, title: str) -> list[str]:  # noqa: ANN001 - a featcache Run
    from featcache.data.sources import in_reading_order

    metrics = run.metrics
    pooled = metrics["pooled"]
    lines = [f"### {title}: balanced accuracy "
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
    print("\n".join(lines), flush=True)
    return lines


def best_model(cache: str) -> tuple[list[str], float]:
    """docs/best-ham.toml with only its best head (the fused linear SVM) and the subgroups: its fused run."""
    import featcache as fc

    started = time.perf_counter()
    study = tomllib.loads(BEST.read_text())
    base = BEST.parent
    for key in ("train", "test"):
        study["data"][key] = str((base / study["data"][key]).resolve())
    study["fit"] |= {"heads": ["svm-linear"], "subgroups": COLUMNS}
    study.pop("compare", None)
    study["report"] = {"top": 20, "best": 1}
    result = fc.run_study(study, cache=cache, quiet=True)
    fused = [run for run in map(fc.Run, result.runs) if "+" in run.metrics["config"]["backbone"]]
    if len(fused) != 1:
        raise SystemExit(f"expected the one fused run of {BEST.name}, found {len(fused)}")
    run = fused[0]
    test = run.metrics.get("test", {})
    title = (f"The best model of docs/best-ham.toml, {run.metrics['config']['backbone']} / svm-linear "
             f"(`{run.path.name}`; ISIC 2018 test {test.get('balanced_accuracy', float('nan')):.3f}, which has no "
             "sex, age or site column)")
    return run_table(run, title), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--heads", default="logreg,svm-linear")
    parser.add_argument("--best", action="store_true", help="also the best model of docs/best-ham.toml")
    args = parser.parse_args()
    import featcache as fc

    best_lines, best_seconds = best_model(args.cache) if args.best else ([], 0.0)
    started = time.perf_counter()
    fc.extract(HAM, group_col="lesion_id", backbone="efficientnet_lite0", cache=args.cache, quiet=True)
    runs = fc.fit(HAM, group_col="lesion_id", backbone="efficientnet_lite0", heads=args.heads, cv=5,
                  cache=args.cache, quiet=True, subgroups=COLUMNS)
    lines = []
    for run in runs:
        lines += run_table(run, f"{run.head} on efficientnet_lite0 / gap")
    best_note = (f" The best model of docs/best-ham.toml is scored by `--best` ({best_seconds:.0f} s in this run of "
                 "the script; from an empty cache its extraction of four backbones x 4 views adds about 45 min on 2 "
                 "cores), through that study with only its fused linear SVM and `subgroups` added to `[fit]`."
                 if best_lines else
                 " The best model of docs/best-ham.toml is scored the same way by `--best`.")
    text = "\n".join(["## Subgroups: HAM10000 by sex, age and body site {#subgroups-ham}", "",
                      "`python benchmarks/subgroups_ham.py" + (" --best" if best_lines else "") + "` (all 10,015 "
                      "images, lesion-grouped 5-fold CV; `--subgroups sex,age,localization`). HAM10000 has no "
                      "skin-tone column, so no model here was assessed across skin types." + best_note, "",
                      *best_lines,
                      "EfficientNet-Lite0 gap features of the default extraction "
                      f"({time.perf_counter() - started:.0f} s here with the extraction):", "",
                      *lines])
    replace_block(REPO / "docs" / "results.md", "subgroups-ham", text)


if __name__ == "__main__":
    main()
