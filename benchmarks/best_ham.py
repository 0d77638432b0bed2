"""The strongest frozen-feature model on HAM10000 -> ISIC 2018, and what each step of it adds.

    python benchmarks/best_ham.py [--cache cache] [--dermamnist]

Runs `docs/best-ham.toml` (`featcache run`: four offline backbones with colour constancy, 4 views and their
best poolings, three heads each and on all four fused, a stacked ensemble, the test set aligned), then the
smaller steps that lead up to it on the same lesion-grouped 5-fold CV, and writes the `best` block of
docs/results.md: each step's CV balanced accuracy and ISIC 2018 test balanced accuracy with their 95 %
intervals (resampled by lesion in CV) and the increment over the step before. The test column is the
model as trained (no alignment) until the last step, which adds the label-free test alignment.
With `--dermamnist`, also the `best-dermamnist` block: the same recipe under DermaMNIST's image-level
7:1:2 split, beside the published frozen probes. Everything goes through featcache's API as a user would
run it; finished extractions and runs are reused.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

from accuracy import PUBLISHED_DERMAMNIST
from docs_blocks import replace_block

import featcache as fc

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HAM = SHARED / "ham10000_200x150" / "labels.csv"
ISIC_TEST = SHARED / "isic2018_task3_test_224" / "labels.csv"
STUDY = REPO / "docs" / "best-ham.toml"
COMMON = {"group_col": "lesion_id", "test_data": str(ISIC_TEST), "test_align": "moments", "quiet": True}


def _scores(metrics: dict, test: dict | None, aligned: bool) -> tuple:
    """(cv, cv interval, test, test interval) of a run's or ensemble's balanced accuracy; the test score
    as trained unless ``aligned``."""
    cv = metrics["balanced_accuracy"]
    chosen = test if aligned or not test or "unaligned" not in test else test["unaligned"]
    return (cv["pooled"], tuple(cv["ci"]), chosen["balanced_accuracy"], tuple(chosen["ci95"]["balanced_accuracy"]))


def _run_scores(run: fc.Run, aligned: bool = False) -> tuple:
    pooled = run.metrics["pooled"]
    metrics = {"balanced_accuracy": {"pooled": pooled["balanced_accuracy"],
                                     "ci": pooled["ci95"]["balanced_accuracy"]}}
    return _scores(metrics, run.metrics.get("test"), aligned)


def _fmt(value: float, interval: tuple) -> str:
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--dermamnist", action="store_true", help="also the recipe under the 7:1:2 split")
    args = parser.parse_args()
    cache = Path(args.cache)
    started = time.perf_counter()
    study = fc.run_study(STUDY, cache=cache)
    study_s = time.perf_counter() - started
    runs = [fc.Run(path) for path in study.runs]
    by_name = {(r.config["backbone"], r.config["pool"], r.head): r for r in runs}
    fused = next(r for r in runs if "+" in r.config["backbone"] and r.head == "svm-rbf")
    lite0_penult = by_name[("efficientnet_lite0", "penult", "svm-rbf")]

    # the steps up to the study's own runs, on the same folds (Lite0, svm-rbf)
    lite0 = dict(data=str(HAM), backbone="efficientnet_lite0", heads="svm-rbf", cache=cache, **COMMON)
    for source in (HAM, ISIC_TEST):  # 1 view, no filter
        fc.extract(data=str(source), backbone="efficientnet_lite0", cache=cache, quiet=True)
    [baseline] = fc.fit(**lite0, pool="gap", views=1)
    cc = dict(lite0, preprocess="color-constancy", views=4)
    [cc_one_view] = fc.fit(**cc, pool="gap", use_views="first")
    [cc_views] = fc.fit(**cc, pool="gap")

    table = fc.compare(runs=[r.path for r in runs], ensemble="stack")
    [stacked] = [row for row in table.rows if row.head.startswith("stack of")]
    voted = fc.compare(runs=[r.path for r in runs], ensemble=3)
    [top3] = [row for row in voted.rows if row.backbone == "ensemble"]

    steps = [
        ("EfficientNet-Lite0 / gap / svm-rbf, 1 view (the starting point)", _run_scores(baseline)),
        ("+ colour constancy (Shades of Gray)", _run_scores(cc_one_view)),
        ("+ 4 cached views, test-time averaging", _run_scores(cc_views)),
        ("+ the backbone's best pooling (penult)", _run_scores(lite0_penult)),
        ("+ four backbones fused at their best poolings ("
         + ", ".join(" ".join(part) for part in zip(fused.config["backbone"].split("+"),
                                                      fused.config["pool"].split("+"), strict=True)) + ")",
         _run_scores(fused)),
        (f"+ three heads on each and on the fusion, stacked ({len(runs)} runs, `--ensemble stack`)",
         _scores(stacked.metrics, stacked.test, aligned=False)),
        ("+ label-free test alignment (`--test-align moments`; test only)", _scores(stacked.metrics, stacked.test,
                                                                                   aligned=True)),
    ]
    lines = ["## The best model: every gain together (`docs/best-ham.toml`)", "",
             f"Command: `python benchmarks/best_ham.py` (runs `featcache run docs/best-ham.toml`, {study_s / 60:.0f} "
             f"min in this run with what the cache held; from nothing, on 2 cores on 2026-11-30, its extraction took "
             f"52 min for HAM10000 and 7 min for the test set, four backbones x 4 views from one decode, and its "
             f"15 fits about 35 min; then the first three steps' runs). HAM10000 (10,015 images, "
             "200x150) under lesion-grouped 5-fold CV, the same folds for every row; each model refit on all of "
             "HAM10000 and scored on the 1,512 official ISIC 2018 test images. Balanced accuracy with 95 % "
             "bootstrap intervals (CV: resampled by lesion). The test column is the model as trained until the "
             "last row.", "",
             "| step | CV balanced acc. [95 % CI] | change | ISIC 2018 test balanced acc. [95 % CI] | change |",
             "|---|---|---|---|---|"]
    previous = None
    for label, (cv, cv_ci, test, test_ci) in steps:
        change = ("–", "–") if previous is None else (f"{cv - previous[0]:+.3f}", f"{test - previous[2]:+.3f}")
        lines.append(f"| {label} | {_fmt(cv, cv_ci)} | {change[0]} | {_fmt(test, test_ci)} | {change[1]} |")
        previous = (cv, cv_ci, test, test_ci)
    lines += ["", "Every run of the study (test: as trained / aligned):", "",
              "| run | CV balanced acc. [95 % CI] | test as trained | test aligned |", "|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: -r.metrics["pooled"]["balanced_accuracy"]):
        cv, cv_ci, test, _ = _run_scores(run)
        name = f"{run.config['backbone']} / {run.config['pool']} / {run.head}"
        lines.append(f"| {name} | {_fmt(cv, cv_ci)} | {test:.3f} | {_run_scores(run, aligned=True)[2]:.3f} |")
    lines += ["", "The same runs across clinics (issue: shift audit, test alignment, prediction sets at 90 %; "
              "`test.shift`, `test.unaligned` and `conformal` of each run's metrics.json):", "",
              "| run | domain AUROC | test bal. acc. as trained -> moments | conformal coverage: CV / test as "
              "trained / test aligned (mean set size) |", "|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: -r.metrics["pooled"]["balanced_accuracy"]):
        test = run.metrics["test"]
        sets = [run.metrics.get("conformal"), test["unaligned"].get("conformal"), test.get("conformal")]
        coverage = " / ".join(f"{c['coverage']:.3f} ({c['mean_set_size']:.2f})" if c else "–" for c in sets)
        before, after = test["unaligned"]["balanced_accuracy"], test["balanced_accuracy"]
        lines.append(f"| {run.config['backbone']} / {run.config['pool']} / {run.head} | "
                     f"{test['shift']['domain_auroc']:.3f} | {before:.3f} -> {after:.3f} ({after - before:+.3f}) | "
                     f"{coverage} |")
    cv, cv_ci, test, test_ci = _scores(top3.metrics, top3.test, aligned=True)
    lines += ["", f"Beside the stack, the soft vote of the 3 best runs (`--ensemble 3`; for each fold its members are "
              "chosen on the other folds' images, nested like the stack): "
              f"CV {_fmt(cv, cv_ci)}, test (aligned) {_fmt(test, test_ci)}.", ""]
    # the best model is the study report's first row (ranked by CV, never by the test set): the model
    # `featcache predict --study docs/best-ham.toml` uses
    best = fc.best_model(STUDY, cache=cache)
    if isinstance(best, fc.Ensemble):
        best_cv, best_cv_ci, best_test, best_test_ci = _scores(stacked.metrics, stacked.test, aligned=True)
        name = f"the stack of {len(best.runs)} runs"
    else:
        best_cv, best_cv_ci, best_test, best_test_ci = _run_scores(best, aligned=True)
        name = f"{best.config['backbone']} / {best.config['pool']} / {best.head}"
    lines += [f"The best model, the first row of the study's report (ranked by CV balanced accuracy; what "
              f"`featcache predict --study docs/best-ham.toml` uses): **{name}**, CV {_fmt(best_cv, best_cv_ci)}, "
              f"ISIC 2018 test (aligned) {_fmt(best_test, best_test_ci)}. Targets: CV >= 0.70 "
              f"({'reached' if best_cv >= 0.70 else f'short by {0.70 - best_cv:.3f}'}), test >= 0.65 "
              f"({'reached' if best_test >= 0.65 else f'short by {0.65 - best_test:.3f}'}).", ""]
    lines += ["How the study came to its poolings: until 2026-12-01 it fused SqueezeNet's `gap`, the best pooling on "
              "featcache 0.1's results page (features without colour constancy). The page regenerated on this "
              "study's colour-constancy features (`benchmarks/accuracy.py`, item 2) found `multi` better for "
              "SqueezeNet (svm-rbf CV 0.660 against 0.647), and the study took it, which moved the fused "
              "svm-linear from CV 0.696 [0.674, 0.716] / test 0.658 to the numbers above. Every pooling of the "
              "study was chosen (best of three per backbone, with svm-rbf) on these same folds, so its CV figures "
              "carry that choice, a small optimism against a margin of 0.005 over the target; the test scores "
              "carry none.", "",
              "Tried on the way to CV >= 0.70 with SqueezeNet `gap`, on the same folds: the fused svm-linear with "
              "`--tune` (its alpha by inner grouped CV, 32 min): CV 0.696, the same as untuned. Stacking on "
              "standardised log-probabilities instead of probabilities: 0.651-0.671 on 9 of the runs (nested, any "
              "C) against 0.677-0.681; on all 15 runs the best fixed C reached 0.697, and choosing C by inner CV "
              "gave 0.690. Logistic regression as the third head: left out, weaker at C=1 and about 30 min per "
              "fused run here. The soft vote of the 3 best runs is nested (above), but N = 3 was the one tried "
              "first, and the study's ensemble is the stack, so the best model is the report's first row.", ""]
    lines.append(f"best: cv {best_cv:.3f} test {best_test:.3f}")
    replace_block(REPO / "docs" / "results.md", "best", "\n".join(lines))
    print("\n".join(lines))
    if args.dermamnist:
        dermamnist(cache)


def dermamnist(cache: Path) -> None:
    """The study's recipe under DermaMNIST's protocol: an image-level random 7:1:2 split of HAM10000 (lesions
    on both sides, as in DermaMNIST), with and without class weights, and the soft vote of the 3 best."""
    content = tomllib.loads(STUDY.read_text())
    content["data"] = {"train": str((STUDY.parent / content["data"]["train"]).resolve())}
    content["fit"] = {**content["fit"], "split": "random712", "class_weight": "balanced"}
    content["fit"].pop("test_align")
    content["compare"] = {"ensemble": 3}
    runs = []
    for weights in ("balanced", "none"):
        content["fit"]["class_weight"] = weights
        runs += fc.run_study(content, cache=cache).runs
    table = fc.compare(runs=runs, ensemble=3)
    lines = ["## The best recipe under the DermaMNIST protocol (image-level 7:1:2)", "",
             "Command: `python benchmarks/best_ham.py --dermamnist`: `docs/best-ham.toml`'s features and heads "
             "with `split = \"random712\"` (train on 70 %, test on 20 %, split by image at random with seed 0, "
             "stratified; lesions land on both sides, as in DermaMNIST), with and without class weights. "
             "Published frozen probes on DermaMNIST at 224 px below, with other backbones.", "",
             "| run | test accuracy | test AUROC | test balanced acc. [95 % CI] |", "|---|---|---|---|"]
    rows = sorted(table.rows, key=lambda r: -r.metrics["accuracy"]["pooled"])
    for row in rows:
        ci = row.metrics["balanced_accuracy"]["ci"]
        name = "soft vote of the 3 best: " + row.head.split(": ", 1)[1] if row.backbone == "ensemble" else \
            f"{row.backbone} / {row.pool} / {row.head}"
        lines.append(f"| {name} | {row.metrics['accuracy']['pooled']:.3f} | {row.metrics['auroc']['pooled']:.3f} | "
                     f"{_fmt(row.metrics['balanced_accuracy']['pooled'], ci)} |")
    lines += ["", "| published (DermaMNIST, 224 px) | accuracy | AUROC |", "|---|---|---|"]
    lines += [f"| {name} | {acc / 100:.3f} | {'–' if auc is None else f'{auc / 100:.3f}'} |"
              for name, acc, auc in PUBLISHED_DERMAMNIST]
    best = rows[0]
    lines += ["", f"Highest test accuracy here: {best.metrics['accuracy']['pooled']:.3f} (AUROC "
              f"{best.metrics['auroc']['pooled']:.3f}), {best.backbone} / {best.pool} / {best.head}."]
    replace_block(REPO / "docs" / "results.md", "best-dermamnist", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
