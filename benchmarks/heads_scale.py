"""Heads at scale: fit time and peak memory of every head on synthetic features of 10k to 1M rows.

Each (head, rows) cell runs in a fresh process: synthetic features (d = 1,280, 7 classes with HAM10000's
class shares, Gaussian clusters; groups of two rows, as lesions photographed twice), then exactly the
cross-validation ``fit`` runs on them (featcache.evaluation.runner: lesion-grouped stratified 5-fold, the
standardizing pipeline, the folds and the final refit on joblib workers, 2 cores). Time: the folds and
the refit, without start-up or making the data. Peak memory: the largest proportional set size (PSS:
shared pages counted once) of the process and its workers together, sampled every 0.2 s, including the
features themselves (4 bytes x 1,280 x rows: 5.1 GB at 1M). A cell over ``--budget``
seconds is stopped and reported as such.

Writes the block `heads-scale` of docs/benchmarks.md.

Run: python benchmarks/heads_scale.py [--rows 10000,100000,1000000] [--heads logreg,...] [--budget 1800]
[--block heads-scale]; python benchmarks/heads_scale.py --rules-check 1000000 (svm-linear and mlp with and
without their scale rules, block heads-scale-rules)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEADS = ("logreg", "svm-linear", "knn", "mlp", "svm-rbf", "xgboost")  # fast, then all's extras
SHARES = np.array([6705, 1113, 1099, 514, 327, 142, 115]) / 10015  # HAM10000's classes


def synthetic(rows: int, dim: int = 1280, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of ``rows`` images in 7 overlapping Gaussian classes, and groups of two rows."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(SHARES), size=rows, p=SHARES)
    centres = rng.standard_normal((len(SHARES), dim)).astype(np.float32) * 0.08
    X = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 65536):  # in chunks: no float64 copy of the whole
        stop = min(rows, start + 65536)
        X[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32) + centres[y[start:stop]]
    groups = np.arange(rows) // 2
    y = y[groups * 2]  # both rows of a group share its label
    return X, y.astype(str), groups.astype(str)


def cell(head: str, rows: int) -> dict:
    """One head's CV on ``rows`` synthetic rows, in this process (the worker side of main)."""
    from featcache.evaluation.features import LabeledFeatures
    from featcache.evaluation.protocol import Protocol
    from featcache.evaluation.runner import _run_tasks
    from featcache.evaluation.splits import make_folds

    X, y, groups = synthetic(rows)
    data = LabeledFeatures(X, y, groups, None, [str(i) for i in range(rows)], sorted(set(y)))
    protocol = Protocol()
    started = time.perf_counter()
    folds = make_folds(y, groups, protocol.cv, 0)
    fold_seconds = time.perf_counter() - started
    tasks = [(0, train, test) for train, test in folds] + [(0, np.arange(rows), None)]
    results = _run_tasks(head, protocol, data, X, tasks, None)
    seconds = time.perf_counter() - started
    oof = np.empty(rows, dtype=object)
    classes = sorted(set(y))
    for (_, _, test), (_, proba) in zip(tasks, results, strict=False):
        if test is not None:
            oof[test] = np.array(classes)[proba.argmax(1)]
    recall = [np.mean(oof[y == c] == c) for c in classes]
    return {"seconds": seconds, "fold_seconds": fold_seconds, "balanced_accuracy": float(np.mean(recall))}


def rules_check(rows: int) -> list[dict]:
    """svm-linear and mlp on one 80/20 split of ``rows`` synthetic rows (in this process, 2 threads), with their
    scale rules (fewer SGD passes, validation checks every MLP_PASS_ROWS rows) and without them: time and
    held-out balanced accuracy, so what the rules cost in accuracy is measured, not assumed."""
    from featcache.evaluation import heads
    from featcache.evaluation.head_registry import make_pipeline

    X, y, _ = synthetic(rows)
    cut = (rows * 4 // 5) // 2 * 2  # groups are pairs of rows: none is split
    classes = sorted(set(y))
    out = []
    for head in ("svm-linear", "mlp"):
        for rules in (True, False):
            limits = {"SGD_FULL_EPOCHS_ROWS": heads.SGD_FULL_EPOCHS_ROWS, "MLP_PASS_ROWS": heads.MLP_PASS_ROWS}
            if not rules:
                for name in limits:
                    setattr(heads, name, 10**12)
            started = time.perf_counter()
            est = make_pipeline(head).fit(X[:cut], y[:cut])
            seconds = time.perf_counter() - started
            predicted = np.array(classes)[est.predict_proba(X[cut:]).argmax(1)]
            recall = [np.mean(predicted[y[cut:] == c] == c) for c in classes]
            for name, value in limits.items():
                setattr(heads, name, value)
            out.append({"head": head, "rules": rules, "seconds": seconds, "balanced_accuracy": float(np.mean(recall))})
            print(out[-1], flush=True)
    return out


def _pss(process) -> int:  # noqa: ANN001 - a psutil.Process
    """Proportional set size: shared pages (the features memory-mapped into the fold workers) counted once
    over the processes sharing them, so the sum is the memory really taken."""
    import psutil

    try:
        return process.memory_full_info().pss
    except (psutil.Error, AttributeError):
        return 0


def measured(head: str, rows: int, budget: float) -> dict:
    """:func:`cell` in a fresh process, its peak memory (with its workers) sampled meanwhile."""
    return {"head": head, "rows": rows, **measured_process([__file__, "--cell", head, str(rows)], budget)}


def measured_process(argv: list[str], budget: float) -> dict:
    """``python argv`` in a fresh process: the JSON object its last line prints, with ``peak_gb``, the largest PSS
    of the process and its children together (sampled every 0.2 s); ``stopped`` past ``budget`` seconds, or
    ``failed`` with the exit status."""
    import psutil

    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True)
    parent, peak, started = psutil.Process(proc.pid), 0, time.perf_counter()
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(_pss(p) for p in tree))
        except psutil.Error:
            pass
        if time.perf_counter() - started > budget:
            for p in [*parent.children(recursive=True), parent]:
                p.kill()
            proc.wait()
            return {"stopped": budget, "peak_gb": peak / 1e9}
        time.sleep(0.2)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not out:
        return {"failed": proc.returncode, "peak_gb": peak / 1e9}
    return {**json.loads(out[-1]), "peak_gb": peak / 1e9}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--cell":
        print(json.dumps(cell(sys.argv[2], int(sys.argv[3]))))
        return
    from docs_blocks import replace_block

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds per cell")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--block", default="heads-scale", help="the docs block written (a partial rerun: another)")
    parser.add_argument("--rules-check", type=int, metavar="ROWS",
                        help="instead: svm-linear and mlp with and without their scale rules on one split of ROWS "
                             "rows (block heads-scale-rules)")
    args = parser.parse_args()
    if args.rules_check:
        found = rules_check(args.rules_check)
        lines = ["## Heads at scale: what the scale rules cost {#heads-scale-rules}", "",
                 f"`python benchmarks/heads_scale.py --rules-check {args.rules_check}`: one 80/20 split of "
                 f"{args.rules_check:,} synthetic rows (as above), one fit in this process (2 threads); with the "
                 "rules: svm-linear's SGD makes as many passes as give the updates of 15 passes over 100,000 rows, "
                 "the MLP checks its validation loss every 100,000 rows; without: 15 passes, a check per epoch.", "",
                 "| head | rules | fit time (s) | held-out balanced accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['head']} | {'on' if r['rules'] else 'off'} | {r['seconds']:.1f} | "
                  f"{r['balanced_accuracy']:.3f} |" for r in found]
        for head in ("svm-linear", "mlp"):
            on, off = (next(r for r in found if r["head"] == head and r["rules"] is v) for v in (True, False))
            lines.append(f"\n{head}: the rules take **{on['seconds'] / off['seconds']:.2f}x** the time, balanced "
                         f"accuracy {on['balanced_accuracy'] - off['balanced_accuracy']:+.3f}.")
        replace_block(args.out, "heads-scale-rules", "\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    sizes = [int(r) for r in args.rows.split(",")]
    rows = []
    for head in args.heads.split(","):
        for n in sizes:
            rows.append(measured(head, n, args.budget))
            print(rows[-1], flush=True)
            if "seconds" not in rows[-1]:
                break  # a larger size would not finish either
    title = "Heads at scale" if args.block == "heads-scale" else f"Heads at scale: {args.heads} again"
    lines = [f"## {title} {{#{args.block}}}", "",
             f"`python benchmarks/heads_scale.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + ": synthetic features (d = 1,280, 7 classes in HAM10000's shares, groups of two rows), "
             "lesion-grouped stratified 5-fold CV and the final refit exactly as `fit` runs them, 2 cores; "
             "time without start-up; peak = the memory of the process and its fold workers together (PSS, sampled "
             "every 0.2 s), the features included.", "",
             "| head | rows | fit time (s) | of it: making the folds | peak memory (GB) | balanced accuracy | "
             "time ratio to the size before | n log n would give |", "|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(rows):
        before = rows[k - 1] if k and rows[k - 1]["head"] == r["head"] and "seconds" in rows[k - 1] else None
        if "seconds" not in r:
            what = f"stopped after {r['stopped']:.0f} s" if "stopped" in r else f"failed (exit {r['failed']})"
            lines.append(f"| {r['head']} | {r['rows']:,} | {what} | | {r['peak_gb']:.1f} | | | |")
            continue
        growth = expected = ""
        if before:
            growth = f"{r['seconds'] / before['seconds']:.1f}x"
            expected = f"{r['rows'] * np.log(r['rows']) / (before['rows'] * np.log(before['rows'])):.1f}x"
        lines.append(f"| {r['head']} | {r['rows']:,} | {r['seconds']:.1f} | {r['fold_seconds']:.1f} | "
                     f"{r['peak_gb']:.1f} | {r['balanced_accuracy']:.3f} | {growth} | {expected} |")
    replace_block(args.out, args.block, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
