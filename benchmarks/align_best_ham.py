"""The label-free test alignments on the best-ham study's runs: none, moments and coral side by side.

    python benchmarks/align_best_ham.py [--cache cache] [--align none,moments,coral]

Each run of `docs/best-ham.toml` (4 views, each backbone's best pooling, and the fusion; refit on all of
HAM10000) predicts the 1,512 official ISIC 2018 test images through `Run.predict` with each
``--test-align``: the statistics come from the test batch itself, no test label is used. Only the scoring
reads the labels. Nothing is refit, so this takes minutes once the study has run
(`python benchmarks/best_ham.py`). The `none` and `moments` columns must equal each run's own test scores
(`test.unaligned` and `test` of its metrics.json, fit with `test_align = "moments"`); the script checks that
before it writes the `align-best` block of docs/results.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from docs_blocks import replace_block

import featcache as fc
from featcache.data.sources import open_source
from featcache.evaluation.metrics import score_with_ci

REPO = Path(__file__).resolve().parents[1]
ISIC_TEST = REPO.parent / "shared" / "data" / "isic2018_task3_test_224" / "labels.csv"
STUDY = REPO / "docs" / "best-ham.toml"


def frame_scores(run: fc.Run, frame, labels: dict[str, str]) -> tuple[float, list[float]]:  # noqa: ANN001
    """Balanced accuracy (and its bootstrap interval) of ``run``'s predict ``frame`` against ``labels``."""
    frame = frame[frame["failed"].fillna("") == ""]  # an image that could not be read has no prediction
    columns = [f"p_{c}" for c in run.classes]
    y = np.array([labels[i] for i in frame.index])
    keep = np.isin(y, run.classes)
    scores = score_with_ci(y[keep], frame[columns].to_numpy()[keep], run.classes)
    return scores["balanced_accuracy"], scores["ci95"]["balanced_accuracy"]


def test_scores(run: fc.Run, method: str, labels: dict[str, str]) -> tuple[float, list[float]]:
    """Balanced accuracy (and its bootstrap interval) of ``run`` on the test images aligned by ``method``."""
    return frame_scores(run, run.predict(str(ISIC_TEST), test_align=method), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / "cache"))
    parser.add_argument("--align", default="none,moments,coral")
    args = parser.parse_args()
    methods = args.align.split(",")
    started = time.perf_counter()
    study = fc.run_study(STUDY, cache=args.cache)
    runs = sorted((fc.Run(p) for p in study.runs), key=lambda r: -r.metrics["pooled"]["balanced_accuracy"])
    labels = {r.id: r.label for r in open_source(ISIC_TEST).records}
    rows, gains = [], {m: [] for m in methods if m != "none"}
    for run in runs:
        scored = {m: test_scores(run, m, labels) for m in methods}
        recorded = {"none": run.metrics["test"]["unaligned"]["balanced_accuracy"],
                    "moments": run.metrics["test"]["balanced_accuracy"]}
        for method, value in recorded.items():  # the same model and alignment as the fit's own test score
            if method in scored and abs(scored[method][0] - value) > 1e-6:
                raise SystemExit(f"{run.path}: predict with test_align {method} gives {scored[method][0]:.4f}, "
                                 f"its metrics.json {value:.4f}")
        name = f"{run.config['backbone']} / {run.config['pool']} / {run.head}"
        cells = [f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" for v, ci in scored.values()]
        if "none" in scored:
            for method in gains:
                gains[method].append(scored[method][0] - scored["none"][0])
            cells = [cells[0]] + [f"{c} ({scored[m][0] - scored['none'][0]:+.3f})"
                                  for c, m in zip(cells[1:], methods[1:], strict=True)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    minutes = (time.perf_counter() - started) / 60
    lines = ["## The test alignments on the best-ham runs (4 views, best poolings, fused)", "",
             f"Command: `python benchmarks/align_best_ham.py --align {args.align}` ({minutes:.0f} min here). "
             "Each run of `docs/best-ham.toml`, refit on all of HAM10000, predicts the 1,512 ISIC 2018 test images "
             "with `Run.predict(..., test_align=...)`, the statistics taken from the test batch itself. "
             "Balanced accuracy [95 % CI]; in brackets after it, the change from `none`. The `none` and "
             "`moments` columns equal the runs' own `test.unaligned` and `test` scores (checked).", "",
             "| run | " + " | ".join(f"--test-align {m}" for m in methods) + " |",
             "|---|" + "---|" * len(methods), *rows, ""]
    for method, values in gains.items():
        values = np.array(values)
        lines.append(f"`{method}`: {np.sum(values >= 0.02)} of {len(values)} runs gain >= 0.02; change from "
                     f"{values.min():+.3f} to {values.max():+.3f}, median {np.median(values):+.3f}.")
    replace_block(REPO / "docs" / "results.md", "align-best", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
