"""The results page: featcache's accuracy on HAM10000 / ISIC 2018 against published frozen-feature numbers.

One command writes docs/results.md (its `best` and other blocks are kept):

    python benchmarks/accuracy.py

Stages (each reuses what the cache already holds, so a rerun only does what is missing), all through
featcache's public API as a user would run them:
1. extraction: the entries of ``docs/best-ham.toml``'s ``[extract]`` table (EfficientNet-Lite0, SqueezeNet
   1.1, EfficientNet-Lite1 and EfficientNet-Lite2 with their offline ImageNet weights, colour constancy,
   4 views per image, poolings gap / penult / multi, every image decoded once for all four) over HAM10000
   (10,015) and the ISIC 2018 test set (1,512), so that this page and the `best` block measure the same
   features; plus EfficientNet-Lite0 with the whole image (``full``, ``pad``) instead of the centre crop,
   1 view, for the resize comparison;
2. heads under three protocols: (a) HAM10000, lesion-grouped 5-fold; (b) HAM10000, image-level random
   7:1:2 split (the DermaMNIST protocol of the published table); (c) train on all of HAM10000, test
   on the official ISIC 2018 test set;
3. the page: tables with 95 % intervals, the effect of each option on the same folds, and the
   published numbers beside them.

Needs ../shared/data/ham10000_200x150 and ../shared/data/isic2018_task3_test_224.
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import numpy as np
from docs_blocks import blocks, keep_blocks

import featcache as fc
from featcache.data.sources import open_source
from featcache.errors import RunError
from featcache.evaluation.fitting import EntrySelection, find_entry
from featcache.evaluation.heads import CALIBRATIONS
from featcache.evaluation.metrics import compute_metrics
from featcache.progress import Reporter
from featcache.reporting.compare import collect_runs, ensemble_rows, head_label
from featcache.store.runs import has_test_predictions, read_predictions

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HAM = DATA / "ham10000_200x150" / "labels.csv"
ISIC_TEST = DATA / "isic2018_task3_test_224" / "labels.csv"
STUDY_EXTRACT = tomllib.loads((REPO / "docs" / "best-ham.toml").read_text())["extract"]
BACKBONES = tuple(STUDY_EXTRACT["backbones"])
LAYER_POOLS = tuple(STUDY_EXTRACT["pools"])
FILTERS = tuple(STUDY_EXTRACT["preprocess"])
VIEWS = STUDY_EXTRACT["views"]
GROUP_COL = "lesion_id"
RESIZE_VARIANTS = ("full", "pad")  # EfficientNet-Lite0, 1 view, gap
HEADLINE_BLOCKS = ("best", "best-dermamnist")  # written by best_ham.py, kept above this script's tables


def _has_entry(cache: Path, path: Path, backbone: str, views: int, resize: str) -> bool:
    try:
        selection = EntrySelection(backbone, preprocess=FILTERS, views=views, resize=resize)
        return find_entry(cache, open_source(path), selection).manifest["complete"]
    except RunError:
        return False


def run_extractions(cache: Path) -> dict:
    """Extract (or find) every entry; returns {"dataset/what": seconds} for what was extracted here (kept
    in the cache beside the entries, so a rerun still reports them)."""
    timings_file = cache / "accuracy_extraction_seconds.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    jobs = [(f"{len(BACKBONES)} backbones, {VIEWS} views (one decode)", ",".join(BACKBONES), VIEWS, "crop",
             LAYER_POOLS)]
    jobs += [(f"{BACKBONES[0]}, 1 view, resize {r}", BACKBONES[0], 1, r, ("gap",)) for r in RESIZE_VARIANTS]
    for what, backbone, views, resize, pools in jobs:
        for path in (HAM, ISIC_TEST):
            key = f"{open_source(path).name}: {what}"
            done = all(_has_entry(cache, path, b, views, resize) for b in backbone.split(","))
            started = time.perf_counter()
            fc.extract(data=str(path), backbone=backbone, pools=",".join(pools), views=views, resize=resize,
                       preprocess=",".join(FILTERS), cache=str(cache))
            if not done:
                timings[key] = time.perf_counter() - started
                timings_file.write_text(json.dumps(timings, indent=1))
    return timings


PUBLISHED_DERMAMNIST = [  # MedMNIST+ linear probes on DermaMNIST at 224 px: accuracy, AUROC (%)
    ("DINO ViT-B/16 (linear probe)", 84.4, 96.8), ("DINO ViT-B/16 (kNN, k=11)", 78.4, None),
    ("AlexNet", 78.9, 94.0), ("DenseNet-121", 77.1, 93.2), ("VGG16", 76.0, 92.0),
    ("EfficientNet-B4", 73.2, 90.5), ("ResNet-18", 71.2, 88.4)]
PUBLISHED_ISIC = [("DINOv3-L/16 (linear probe)", 0.748), ("PanDerm (linear probe)", 0.782)]
MAIN_HEADS = ("svm-rbf", "mlp", "logreg")
CALIBRATED_HEADS = ("logreg", "mlp", "xgboost", "svm-rbf")


class Runner:
    """Fits (or finds) runs through `featcache.fit` and returns their metrics."""

    def __init__(self, cache: Path, reporter: Reporter):
        self.cache, self.reporter = cache, reporter

    def run(self, backbone: str, pool: str, head: str, *, views: int = VIEWS, use_views: str = "all",
            resize: str = "crop", split: str = "cv", tune: bool = False, meta: str = "",
            test: bool = True, class_weight: str = "balanced", calibrate: str = "") -> dict:
        test = test and split == "cv" and not meta  # the ISIC 2018 test CSV carries no metadata
        started = time.perf_counter()
        (run,) = fc.fit(data=str(HAM), group_col=GROUP_COL, test_data=str(ISIC_TEST) if test else None,
                        backbone=backbone, pool=pool, heads=head, views=views, use_views=use_views, resize=resize,
                        preprocess=",".join(FILTERS), split=split, tune=tune, tune_budget=120.0, meta=meta or None,
                        class_weight=class_weight, calibrate=calibrate or None, cache=str(self.cache), quiet=True)
        result = run.metrics
        self.reporter.info(f"{backbone}/{pool}/{head} views={views}:{use_views} resize={resize} split={split} "
                           f"tune={tune} meta={meta or '-'} calibrate={calibrate or '-'}: "
                           f"bal acc {result['pooled']['balanced_accuracy']:.3f} "
                           f"({time.perf_counter() - started:.0f} s)")
        return {"run": run.path, "result": result, "backbone": backbone, "pool": pool, "head": head,
                "views": views, "use_views": use_views, "resize": resize, "split": split, "tune": tune,
                "meta": meta, "class_weight": class_weight, "calibrate": calibrate}


def _ci(block: dict, metric: str) -> str:
    value, ci = block.get(metric), block.get("ci95", {}).get(metric)
    if value is None:
        return "–"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _label(r: dict) -> str:
    """As `featcache compare` labels the run."""
    return f"{r['backbone']} / {r['pool']} / {head_label(r['result']['config'], r['resize'])}"


def _table(rows: list[dict], with_test: bool) -> list[str]:
    header = "| setting | CV balanced acc. [95 % CI] | CV AUROC | CV accuracy |"
    header += " ISIC 2018 test balanced acc. [95 % CI] | test AUROC |" if with_test else ""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        pooled, test = r["result"]["pooled"], r["result"].get("test") or {}
        line = (f"| {_label(r)} | {_ci(pooled, 'balanced_accuracy')} | {pooled['auroc']:.3f} | "
                f"{pooled['accuracy']:.3f} |")
        if with_test:
            line += f" {_ci(test, 'balanced_accuracy')} | {test['auroc']:.3f} |" if test else " – | – |"
        lines.append(line)
    return lines


def _effect(name: str, rows: list[dict], baseline: dict) -> list[str]:
    base = baseline["result"]["pooled"]["balanced_accuracy"]
    out = [f"**{name}**", "", "| setting | CV balanced acc. [95 % CI] | change | CV AUROC | test balanced acc. |",
           "|---|---|---|---|---|"]
    for r in rows:
        pooled, test = r["result"]["pooled"], r["result"].get("test") or {}
        change = pooled["balanced_accuracy"] - base
        out.append(f"| {_label(r)} | {_ci(pooled, 'balanced_accuracy')} | {change:+.3f} | {pooled['auroc']:.3f} | "
                   f"{_ci(test, 'balanced_accuracy') if test else '–'} |")
    return out + [""]


def _ensemble_lines(cache: Path, protocol_word: str, members: list[dict]) -> tuple[list[str], object]:
    """Soft-vote of the top 3 of ``members`` (same images, same protocol), as `compare --ensemble top3`."""
    wanted = {r["run"].resolve() for r in members}
    rows = [row for row in collect_runs(cache) if row.run.resolve() in wanted]
    ensembles = [e for e in ensemble_rows(rows, "top3") if protocol_word in e.protocol]
    if not ensembles:
        return ["(no ensemble: fewer than three comparable runs)"], None
    e = ensembles[0]
    m = e.metrics
    ci = m["balanced_accuracy"]["ci"]
    line = (f"| ensemble {e.head} | {m['balanced_accuracy']['pooled']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
            f"{m['auroc']['pooled']:.3f} | {m['accuracy']['pooled']:.3f} |")
    if e.test:
        tci = e.test["ci95"]["balanced_accuracy"]
        line += f" {e.test['balanced_accuracy']:.3f} [{tci[0]:.3f}, {tci[1]:.3f}] | {e.test['auroc']:.3f} |"
    return [line], e


def _calibration_lines(rows: list[dict]) -> list[str]:
    """Probability quality of each run, computed from its saved out-of-fold (and test) predictions,
    so that runs made before these metrics existed are scored the same way."""
    out = ["**3c. Probability calibration** (`fit --calibrate`; EfficientNet-Lite0, best pooling, 4 views + TTA). "
           "Log-loss and ECE (top-label expected calibration error, 15 bins) are lower-is-better. *Balanced* "
           "log-loss weighs every class equally: it is the yardstick for the class-balanced probabilities "
           "that every head here is trained (and calibrated) to give; the plain log-loss and ECE measure "
           "them against the data's own prevalence, where a class-balanced model is under-confident for "
           "the majority class by design.", "",
           "| setting | CV balanced acc. | CV balanced log-loss | CV log-loss | CV ECE | CV Brier | "
           "test balanced acc. | test balanced log-loss | test ECE |", "|---|---|---|---|---|---|---|---|---|"]
    scored = {}
    for r in rows:
        oof = read_predictions(r["run"], "oof")
        seed0 = oof.seeds == 0
        labels, proba, classes = oof.labels[seed0], oof.proba[seed0], oof.classes
        cv = compute_metrics(labels, proba, classes)
        scored.setdefault(r["head"], []).append((r, cv))
        line = (f"| {_label(r)} | {cv['balanced_accuracy']:.3f} | {cv['log_loss_balanced']:.3f} | "
                f"{cv['log_loss']:.3f} | {cv['ece']:.3f} | {cv['brier']:.3f} |")
        if has_test_predictions(r["run"]):
            test_predictions = read_predictions(r["run"], "test")
            labels, proba = test_predictions.labels, test_predictions.proba
            keep = np.isin(labels, classes)
            test = compute_metrics(labels[keep], proba[keep], classes)
            line += f" {test['balanced_accuracy']:.3f} | {test['log_loss_balanced']:.3f} | {test['ece']:.3f} |"
        else:
            line += " – | – | – |"
        out.append(line)
    best = []
    for head, runs in scored.items():
        (_, plain), (r, cv) = runs[0], min(runs[1:], key=lambda x: x[1]["log_loss_balanced"])
        since = "its default sigmoid -> " if head.startswith("svm") else ""
        best.append(f"{head}: {since}{r['calibrate']} ({plain['log_loss_balanced']:.3f} -> "
                    f"{cv['log_loss_balanced']:.3f}, "
                    f"balanced accuracy {cv['balanced_accuracy'] - plain['balanced_accuracy']:+.3f})")
    out += ["", "Lowest CV balanced log-loss per head (uncalibrated -> calibrated): " + "; ".join(best) + ". "
            "Temperature scaling keeps each view's predicted class; the small changes in its balanced accuracy "
            "come from averaging the rescaled probabilities over the 4 views. The one-vs-rest maps (sigmoid, "
            "isotonic) can move decisions, for better or worse."]
    return out + [""]


def _verdict(pooled: dict, accuracy: float, auroc: float | None) -> str:
    ours_accuracy, ours_auroc = 100 * pooled["accuracy"], 100 * pooled["auroc"]
    if ours_accuracy <= accuracy:
        return f"behind by {accuracy - ours_accuracy:.1f} accuracy points"
    return "behind in AUROC" if auroc is not None and ours_auroc <= auroc else "beats it"


def write_page(out: Path, timings: dict, main_rows: list[dict], pool_rows: dict, view_rows: list[dict],
               view_rows_mlp: list[dict], tune_rows: list[dict], meta_rows: list[dict], resize_rows: list[dict],
               calibration_rows: list[dict], random_rows: list[dict], random_grouped: dict, runner: Runner) -> None:
    def best(rows: list[dict], key=lambda r: r["result"]["pooled"]["balanced_accuracy"]) -> dict:
        return max(rows, key=key)

    main_sorted = sorted(main_rows, key=lambda r: -r["result"]["pooled"]["balanced_accuracy"])
    ensemble_main, ens_a = _ensemble_lines(runner.cache, "grouped", main_rows)
    random_sorted = sorted(random_rows, key=lambda r: -r["result"]["pooled"]["accuracy"])
    ensemble_random, ens_b = _ensemble_lines(runner.cache, "random", random_rows)
    every = {str(r["run"]): r for r in [*main_rows, *view_rows, *view_rows_mlp, *tune_rows, *meta_rows,
                                        *resize_rows, *calibration_rows, *random_rows,
                                        *[x for v in pool_rows.values() for x in v]]}
    n_runs = len(every)
    fit_minutes = sum(r["result"]["cv_seconds"] for r in every.values()) / 60
    extracted = [f"| {key} | {value:.0f} s = {value / 60:.1f} min |" for key, value in sorted(timings.items())]
    lines = [
        "# Results: frozen offline backbones on HAM10000 and ISIC 2018",
        "",
        f"Written by `python benchmarks/accuracy.py` ({time.strftime('%Y-%m-%d')}, 2 CPU cores, no GPU; finished "
        f"runs in the cache are reused; the {n_runs} runs below took {fit_minutes:.0f} min of head fitting in "
        "all, 5 folds + refit each). Backbones: EfficientNet-Lite0, "
        "SqueezeNet 1.1, EfficientNet-Lite1 and EfficientNet-Lite2 with their offline ImageNet weights (see the "
        "README), run by the default engine (OpenVINO here). Every image goes through colour constancy (Shades "
        "of Gray) first, as in `docs/best-ham.toml`, whose entries these are. Every number is a balanced metric "
        "unless it says accuracy; intervals are 95 % bootstrap intervals, resampled by lesion under "
        "lesion-grouped CV and by image on the ISIC 2018 test set (its CSV names no lesions).",
        "",
        # the headline blocks of best_ham.py stay on top (keep_blocks would move them to the end)
        *[block + "\n" for name, block in blocks(out.read_text() if out.exists() else "").items()
          if name in HEADLINE_BLOCKS],
        "## Extraction",
        "",
        f"The entries of `docs/best-ham.toml`: {', '.join(BACKBONES)}, {VIEWS} views per image (identity, both "
        f"mirrors, half turn), poolings {', '.join(LAYER_POOLS)} in the same forward, each image decoded once "
        "for all four backbones, HAM10000 (10,015) + ISIC 2018 test (1,512); plus EfficientNet-Lite0 with "
        "`--resize full` and `--resize pad` (1 view). Wall time of each `extract` call that did the work here "
        "(entries found in the cache are not timed again; `python benchmarks/best_ham.py` reports the "
        "study's own extraction time in the `best` block above):",
        "",
        "| extraction | wall time |",
        "|---|---|",
        *(extracted or ["| (every entry was in the cache) | – |"]),
        "",
        "## (a) HAM10000, lesion-grouped 5-fold CV, and (c) the refit tested on the official ISIC 2018 test set",
        "",
        "Each row is one run: 5-fold CV on HAM10000 with folds grouped by lesion (no lesion in two folds), "
        "then the same model refit on all of HAM10000 and scored on the 1,512 ISIC 2018 test images.",
        "",
        *_table(main_sorted, with_test=True),
        *ensemble_main,
        "",
        "## What each option changes (same folds, same images)",
        "",
        *_effect("1. Augmented views cached at extraction (EfficientNet-Lite0, gap, svm-rbf)", view_rows, view_rows[0]),
        *_effect("1b. The same with the MLP head", view_rows_mlp, view_rows_mlp[0]),
        *[line for b, rows in pool_rows.items()
          for line in _effect(f"2. Poolings, {b} (svm-rbf, {VIEWS} views + TTA)", rows, rows[0])],
        *_effect("3. Tuning: logistic regression, C swept over 13 decades-spaced values by inner grouped CV "
                 "(EfficientNet-Lite0, gap, original view)", tune_rows, tune_rows[0]),
        *_effect("4. Tabular metadata (age, sex, site; imputed and encoded inside the pipeline). The ISIC 2018 "
                 "test CSV here carries no metadata, so this is CV only", meta_rows, meta_rows[0]),
        *_effect("5. Resize policy (EfficientNet-Lite0, gap, svm-rbf, 1 view)", resize_rows, resize_rows[0]),
        "On the ISIC 2018 test column of item 5: the test images in `../shared` are already 224x224 squares, "
        "so `full` and `pad` change only the training images (HAM10000 is 200x150). With `pad` the model learns "
        "black bands above and below every lesion and then meets test images without them; that mismatch, not "
        "the policy, is what the test score of `pad` measures. Within HAM10000 (the CV column) nothing is "
        "cropped away by `pad`, and it gains a little.",
        "",
    ]
    if ens_a is not None:
        single = best(main_rows)
        gain = ens_a.metrics["balanced_accuracy"]["pooled"] - single["result"]["pooled"]["balanced_accuracy"]
        lines += ["**3b. Soft-vote ensemble of the top 3 runs** (`featcache compare --ensemble top3`), against "
                  f"the best single run ({_label(single)}): {gain:+.3f} CV balanced accuracy. For each fold its "
                  "members are the three runs that score best on the other folds' images, so its CV score carries "
                  "no choice made on the images it scores; the best single run's does (it is the best of "
                  f"{len(main_rows)}).", ""]
    lines += _calibration_lines(calibration_rows)
    best_b = random_sorted[0]
    pooled_b = best_b["result"]["pooled"]
    lines += [
        "## (b) HAM10000, image-level random 7:1:2 split (the DermaMNIST protocol)",
        "",
        "Train on 70 % of the images, test on 20 % (the 10 % validation part is unused: no model selection "
        "on it), split at random by image and stratified by class. Lesions with several images land on both "
        "sides, as in DermaMNIST. Our split is drawn with seed 0, not DermaMNIST's own indices, and the images "
        "are HAM10000's 200x150 JPEGs rather than DermaMNIST's 224 px arrays.",
        "",
        "| setting | test accuracy | test AUROC | test balanced acc. [95 % CI] |",
        "|---|---|---|---|",
        *[f"| {_label(r)} | {r['result']['pooled']['accuracy']:.3f} | {r['result']['pooled']['auroc']:.3f} | "
          f"{_ci(r['result']['pooled'], 'balanced_accuracy')} |" for r in random_sorted],
    ]
    if ens_b is not None:
        m = ens_b.metrics
        lines.append(f"| ensemble {ens_b.head} | {m['accuracy']['pooled']:.3f} | {m['auroc']['pooled']:.3f} | "
                     f"{m['balanced_accuracy']['pooled']:.3f} |")
    lines += [
        "",
        "Published frozen-feature results on DermaMNIST at 224 px (MedMNIST+ linear probes; accuracy / AUROC "
        "in %). **Different backbones** from ours (none of them is offline here), same protocol family:",
        "",
        "| published model (linear probe unless noted) | accuracy | AUROC | featcache's highest-accuracy row above "
        "(chosen on this split) |",
        "|---|---|---|---|",
        *[f"| {name} | {acc:.1f} | {auc if auc is not None else '–'} | "
          f"{100 * pooled_b['accuracy']:.2f} / {100 * pooled_b['auroc']:.2f} ({_verdict(pooled_b, acc, auc)}) |"
          for name, acc, auc in PUBLISHED_DERMAMNIST],
        "",
    ]
    keyed = [((r["backbone"], r["pool"], r["head"]), r) for r in random_rows
             if r.get("class_weight", "balanced") == "balanced"]
    pairs = [(r, random_grouped[key]) for key, r in keyed if key in random_grouped]
    if pairs:
        gaps = {m: [rb["result"]["pooled"][m] - ra["result"]["pooled"][m] for rb, ra in pairs]
                for m in ("balanced_accuracy", "accuracy", "auroc")}
        lines += [f"Random image-level split vs lesion-grouped CV, same setting, over the {len(pairs)} settings run "
                  "both ways (mean difference, random minus grouped): "
                  + ", ".join(f"{m.replace('_', ' ')} {np.mean(v):+.3f} (range {min(v):+.3f} to {max(v):+.3f})"
                              for m, v in gaps.items())
                  + ". The two protocols also test on different images (a 20 % split vs all of HAM10000 out of "
                  "fold), so part of the difference is sampling.", ""]
    test_rows = [r for r in main_rows if r["result"].get("test")]
    if test_rows:
        t = best(test_rows)  # by CV, as a user would choose it; never by the test score it then reports
        lines += [
            "## (c) against published ISIC 2018 test results", "",
            "| model | ISIC 2018 test balanced accuracy |", "|---|---|",
            *[f"| {name} (published; dermatology foundation model, far larger backbone) | {value:.3f} |"
              for name, value in PUBLISHED_ISIC],
            f"| featcache, the best single run by CV above: {_label(t)} | "
            f"{_ci(t['result']['test'], 'balanced_accuracy')} |"]
        if ens_a is not None and ens_a.test:
            lines.append(f"| featcache top-3 soft-vote ensemble (members chosen on the CV scores, not on the test) | "
                         f"{_ci(ens_a.test, 'balanced_accuracy')} |")
        lines += ["| featcache, the best model of `docs/best-ham.toml` (the `best` block above) | see there |", ""]
    out.write_text(keep_blocks(out, "\n".join(lines)))  # other scripts' blocks (the leakage audit) stay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache")
    parser.add_argument("--stage", choices=("extract", "all"), default="all")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="Fit only these (no page is written).")
    parser.add_argument("--skip-extraction", action="store_true", help="Use what the cache holds.")
    args = parser.parse_args()
    reporter = Reporter()
    timings_file = args.cache / "accuracy_extraction_seconds.json"
    timings = json.loads(timings_file.read_text()) if args.skip_extraction and timings_file.exists() \
        else {} if args.skip_extraction else run_extractions(args.cache)
    if args.stage == "extract":
        return
    runner = Runner(args.cache, reporter)
    backbones = [b for b in BACKBONES if b in args.backbones.split(",")]
    lite0 = "efficientnet_lite0"
    rows = {}
    for b in backbones:  # backbone by backbone, so a partial run (--backbones) is useful later
        # (a) + (c): lesion-grouped 5-fold CV on HAM10000, the refit on all of it scored on ISIC 2018 test
        rows.setdefault("main", []).extend(runner.run(b, "gap", h) for h in MAIN_HEADS)
        rows.setdefault("pools", {})[b] = [runner.run(b, p, "svm-rbf") for p in LAYER_POOLS]
        best_pool = max(rows["pools"][b], key=lambda r: r["result"]["pooled"]["balanced_accuracy"])["pool"]
        if best_pool != "gap":
            rows["main"].extend(runner.run(b, best_pool, h) for h in MAIN_HEADS)
        if b == lite0:
            rows["views"] = [runner.run(b, "gap", "svm-rbf", use_views=u) for u in ("first", "train", "all")]
            rows["views_mlp"] = [runner.run(b, "gap", "mlp", use_views=u) for u in ("first", "all")]
            rows["tune"] = [runner.run(b, "gap", "logreg", use_views="first", tune=t) for t in (False, True)]
            rows["meta"] = [runner.run(b, "gap", "svm-rbf", meta=m) for m in ("", "age,sex,localization")]
            rows["resize"] = [rows["views"][0]] + [runner.run(b, "gap", "svm-rbf", views=1, resize=r)
                                                   for r in ("full", "pad")]
            # calibration on the best pooling, 4 views + TTA; the SVM always calibrates (sigmoid by default)
            rows["calibration"] = [runner.run(b, best_pool, h, calibrate=c) for h in CALIBRATED_HEADS
                                   for c in ("", *CALIBRATIONS) if not (h.startswith("svm") and c == "sigmoid")]
        # (b): image-level random 7:1:2 split, the DermaMNIST protocol
        rows.setdefault("random", []).extend(runner.run(b, best_pool, h, split="random712") for h in MAIN_HEADS)
        # the published probes are plain (unweighted) logistic regressions, which optimise accuracy
        rows["random"].append(runner.run(b, best_pool, "logreg", split="random712", class_weight="none"))
    if backbones != list(BACKBONES):
        reporter.info("partial run (--backbones): runs are in the cache; rerun without it to write the page")
        return
    grouped = {(r["backbone"], r["pool"], r["head"]): r for r in rows["main"]}
    write_page(args.out, timings, rows["main"], rows["pools"], rows["views"], rows["views_mlp"], rows["tune"],
               rows["meta"], rows["resize"], rows["calibration"], rows["random"], grouped, runner)
    reporter.info(f"written {args.out}")


if __name__ == "__main__":
    main()
