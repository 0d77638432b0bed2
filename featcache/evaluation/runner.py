"""Fitting one head under a protocol: the folds and the final refit as parallel tasks, then the run folder."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import joblib
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from featcache.errors import RunError
from featcache.evaluation.head_registry import (
    ZERO_SHOT,
    calibrated_grid,
    grid_of,
    head_spec,
    make_pipeline,
    scale_rules,
    training_sample,
)
from featcache.evaluation.heads import HEADS_VERSION, ViewEnsemble, XGBHead
from featcache.progress import Reporter
from featcache.recipes import FitPlan
from featcache.store.entries import CacheEntry
from featcache.store.hashing import rows_hash
from featcache.store.naming import run_path
from featcache.store.runs import is_finished, is_reusable, write_run
from featcache.version import __version__

if TYPE_CHECKING:
    from featcache.extraction.ray import RayCluster
from featcache.evaluation.audit import groups_per_class, leakage_summary
from featcache.evaluation.conformal import (
    by_group,
    cross_conformal,
    out_of_fold_sets,
    set_column,
    set_labels,
    uninformative,
)
from featcache.evaluation.features import LabeledFeatures, Layout, with_meta
from featcache.evaluation.heldout import evaluate_heldout, heldout_dir_for
from featcache.evaluation.metrics import MAIN_METRICS, _align, _summarise, compute_metrics, score_parts, score_with_ci
from featcache.evaluation.model_card import model_card
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.search import BudgetedSearch
from featcache.evaluation.splits import split_plan

# loky says this when a fold worker it keeps between heads was stopped by its idle timeout; every task's result
# came back all the same, so it is noise under fit's output, not a problem the user can act on
warnings.filterwarnings("ignore", message="A worker stopped while some jobs were given to the executor",
                        category=UserWarning)


# Features larger than this are cross-validated one fold at a time on all cores instead of a fold per core:
# each fold holds a copy of its training rows (0.8x the features, more while it predicts), so folds side by
# side would need that once per core.
PARALLEL_FOLDS_MAX_BYTES = 1 << 30
# Training rows larger than this are standardized in place with statistics gathered in chunks
# (_fit_standardized_in_place); smaller ones go through the pipeline's own fit, as always.
CHUNKED_SCALING_MIN_BYTES = 1 << 28


def build_estimator(head: str, protocol: Protocol, seed: int = 0, layout: Layout | None = None,
                    groups_for_inner: bool = False):
    """The whole model for one fit: pipeline, view handling, and the tuning search around them."""
    layout = layout or Layout(0)
    model = make_pipeline(head, protocol.class_weight, protocol.pca, seed, protocol.standardize,
                          layout.image_dim, layout.meta_numeric, layout.meta_categorical, protocol.calibrate,
                          protocol.zero_shot if head == ZERO_SHOT else None)
    grid = calibrated_grid(grid_of(head), model.named_steps["head"])
    prefix = ""
    if layout.views:
        model = ViewEnsemble(model, train_views="first" if protocol.views == "first" else "all",
                             test_views="all" if protocol.views == "all" else "first")
        prefix = "estimator__"
    if protocol.tune and grid:
        inner = StratifiedGroupKFold(3, shuffle=True, random_state=seed) if groups_for_inner \
            else StratifiedKFold(3, shuffle=True, random_state=seed)
        grid = {prefix + key: values for key, values in grid.items()}
        return BudgetedSearch(model, grid, cv=inner, budget_s=protocol.tune_budget_s)
    return model


def _fit(estimator, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None):
    if isinstance(estimator, BudgetedSearch):
        return estimator.fit(X, y, groups=groups)
    return estimator.fit(X, y)


def _fit_standardized_in_place(pipeline: Pipeline, rows: np.ndarray, y: np.ndarray) -> None:
    """Fit ``pipeline`` (a scaler first) on ``rows``, the caller's own copy, holding no other copy of them:
    the scaler's statistics gathered chunk by chunk (``fit`` computes the variance through a float64
    temporary twice the rows' size: 8 GB at 800k x 1,280), the rows standardized in place, then the
    remaining steps fitted on them. The fitted pipeline is the one ``fit`` makes, its statistics equal to
    float32 rounding."""
    scaler = pipeline.steps[0][1]
    for start in range(0, len(rows), 65536):
        scaler.partial_fit(rows[start:start + 65536])
    scaler.transform(rows, copy=False)
    Pipeline(pipeline.steps[1:]).fit(rows, y)  # fits the same step objects: ``pipeline`` is fitted


def _fit_task(head: str, protocol: Protocol, layout: Layout, X: np.ndarray, y: np.ndarray,
              groups: np.ndarray | None, train: np.ndarray, test_idx: np.ndarray | None, seed: int, threads: int):
    """One fold (or the final refit when ``test_idx`` is None) in a worker with ``threads`` threads."""
    from threadpoolctl import threadpool_limits

    if head_spec(head).torch:
        import torch

        torch.set_num_threads(threads)
    with threadpool_limits(threads):
        est = build_estimator(head, protocol, seed, layout, groups is not None)
        for step in est.get_params().values():  # XGBoost's OpenMP pool is not one threadpoolctl reaches
            if isinstance(step, XGBHead):
                step.set_params(n_jobs=threads)
        train = training_sample(head, train, y, seed)
        rows = X[train]  # this task's own copy
        if isinstance(est, Pipeline) and isinstance(est.steps[0][1], StandardScaler) \
                and rows.nbytes > CHUNKED_SCALING_MIN_BYTES:
            _fit_standardized_in_place(est, rows, y[train])
        else:
            _fit(est, rows, y[train], None if groups is None else groups[train])
        del rows
        proba = None if test_idx is None else est.predict_proba(X[test_idx])
    return est, proba


def _fit_shared(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, head: str, protocol: Protocol,
                layout: Layout, train: np.ndarray, test_idx: np.ndarray | None, seed: int, threads: int):
    """:func:`_fit_task` with the arrays every task shares first (they travel once, as Ray objects)."""
    return _fit_task(head, protocol, layout, X, y, groups, train, test_idx, seed, threads)


def _run_tasks(head: str, protocol: Protocol, data: LabeledFeatures, X: np.ndarray, tasks: list,
               jobs: int | None, cluster: RayCluster | None = None) -> list:
    if cluster is not None:  # one CPU and one thread per task, as the local path gives each when busy
        calls = [(head, protocol, Layout.of(data), train, test_idx, seed, 1) for seed, train, test_idx in tasks]
        return cluster.run_tasks(_fit_shared, (X, data.y, data.groups), calls)
    cores = os.cpu_count() or 1
    if X.nbytes > PARALLEL_FOLDS_MAX_BYTES and jobs is None:
        jobs = 1  # each fold worker copies its training rows and their standardized copy: one at a time
    jobs = max(1, min(jobs or cores, len(tasks)))
    threads = max(1, cores // jobs)
    layout = Layout.of(data)
    calls = [joblib.delayed(_fit_task)(head, protocol, layout, X, data.y, data.groups, train, test_idx,
                                       seed, threads) for seed, train, test_idx in tasks]
    return joblib.Parallel(n_jobs=jobs)(calls)  # n_jobs=1 runs in this process


def estimator_params(estimator) -> dict:
    """The plain-valued parameters of an estimator, so a run is named by everything that made it."""
    return {k: v for k, v in sorted(estimator.get_params(deep=True).items())
            if v is None or isinstance(v, (str, int, float, bool))}


def run_identity(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol) -> dict:
    """Everything that trained and cross-validated a run; its hash names the run (see :func:`fit_head`). The
    held-out settings are not in it: they name each held-out evaluation of the run (featcache.evaluation.heldout).
    ``test_data_sha256`` stays, always None, so that runs keep the names they had when it named the test set."""
    identity = {"head": head, "heads_version": HEADS_VERSION, "pool": pool, "protocol": protocol.training_config(),
                "classes": data.classes, "feature_fingerprint": entry.fingerprint,
                "estimator": estimator_params(build_estimator(head, protocol, 0, Layout.of(data))),
                "data_sha256": data.identity(), "test_data_sha256": None,
                "views": int(data.X.shape[1]) if data.X.ndim == 3 else 1, "meta_spec": data.meta_spec,
                **({"zero_shot": protocol.zero_shot.identity()} if head == ZERO_SHOT and protocol.zero_shot else {})}
    for rule, (limit, _) in _scale_rules(data, head, protocol).items():
        identity[rule] = limit  # names the run: past the limit its numbers come from the rule
    return identity


def _views_seen(data: LabeledFeatures, protocol: Protocol) -> int:
    """How many views of each image a head trains on: every view unless --use-views first."""
    return data.X.shape[1] if data.X.ndim == 3 and protocol.views != "first" else 1


def _scale_rules(data: LabeledFeatures, head: str, protocol: Protocol) -> dict[str, tuple[int, str]]:
    """The head's rules at the scale of ``data``."""
    return scale_rules(head, len(data.y), len(data.y) * _views_seen(data, protocol))


def run_dir_for(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol,
                test: HeldOut | None = None) -> Path:
    """The folder :func:`fit_head` returns for this fit (finished or not): the run, or with ``test`` its held-out
    evaluation."""
    run_dir = run_path(entry.path, head, pool, run_identity(data, entry, head, pool, protocol))
    return run_dir if test is None else heldout_dir_for(run_dir, test.data, protocol, test.name)


def _check_neighbours(params: dict, smallest_train: int, head: str, tune: bool) -> None:
    """A neighbour count larger than a training part fails deep inside scikit-learn; say it here."""
    wanted = max((v for k, v in params.items() if k.endswith("n_neighbors")), default=0)
    tuned = max((max(v) for k, v in grid_of(head).items() if k.endswith("n_neighbors")), default=0)
    inner_train = smallest_train * 2 // 3  # --tune's inner 3-fold CV trains on two thirds
    if wanted > smallest_train:
        raise RunError(f"{head}: {wanted} neighbours, but a training part has only {smallest_train} rows; "
                       "use fewer --cv folds, more images, or another head")
    if tune and tuned > inner_train:
        raise RunError(f"{head} --tune tries up to {tuned} neighbours, but its inner training parts have about "
                       f"{inner_train} images; drop --tune or use fewer --cv folds")


def _without_copies(data: LabeledFeatures, folds: list, oof: np.ndarray) -> dict | None:
    """Seed 0's scores on the held-out images that have no identical or near-identical copy on their training
    side (None when none has one): what an official split, whose parts cannot be regrouped, scores on images
    it has not in effect seen."""
    from featcache.evaluation.leakage import copied_in_training

    if data.duplicates is None or not len(data.duplicates):
        return None
    copied = copied_in_training(data.duplicates, folds, len(data.y))
    scored = ~np.isnan(oof).any(axis=1)
    kept = scored & ~copied
    if not copied.any() or len(np.unique(data.y[kept])) < 2:
        return None
    scores = score_with_ci(data.y[kept], oof[kept], data.classes, None if data.groups is None else data.groups[kept])
    return {**{k: scores[k] for k in (*MAIN_METRICS, "ci95") if k in scores},
            "n_images": int(kept.sum()), "n_left_out": int((scored & copied).sum())}


def _calibrate_sets(data: LabeledFeatures, protocol: Protocol, head: str, fold_plan: list, seed0: np.ndarray,
                    reporter: Reporter) -> tuple[dict | None, dict | None]:
    """With --conformal: the prediction sets' calibration from seed 0's out-of-fold probabilities ``seed0`` (within
    each group of --conformal-by), and the out-of-fold sets to write, in the order write_run meets seed 0's rows;
    (None, None) without."""
    if protocol.conformal is None:
        return None, None
    fold_of = np.full(len(data.y), -1)
    for seed, fold, _, test_idx in fold_plan:
        if seed == 0:
            fold_of[test_idx] = fold
    scored = fold_of >= 0
    y_idx = np.searchsorted(data.classes, data.y)
    oof_sets = np.zeros((len(data.y), len(data.classes)), dtype=bool)
    if data.strata is not None:  # --conformal-by: calibrated within each group of the column
        conformal, oof_sets[scored] = by_group(seed0[scored], y_idx[scored], fold_of[scored],
                                               protocol.conformal, protocol.conformal_mode, data.strata[scored],
                                               protocol.conformal_by)
    else:
        conformal = cross_conformal(seed0[scored], y_idx[scored], fold_of[scored], protocol.conformal,
                                    protocol.conformal_mode)
        oof_sets[scored] = out_of_fold_sets(seed0[scored], y_idx[scored], fold_of[scored],
                                            protocol.conformal, protocol.conformal_mode)
    as_text = set_labels(oof_sets, data.classes)
    if uninformative(conformal["mean_set_size"], len(data.classes)):
        reporter.warn(f"{head}: the {protocol.conformal:g} prediction sets hold {conformal['mean_set_size']:.2f} "
                      f"of {len(data.classes)} classes on average (out of fold): they say little about an image. "
                      "A better head or backbone gives smaller sets; a lower --conformal level does too")
    # in the order write_run meets seed 0's out-of-fold rows
    sets_written = {"column": set_column(protocol.conformal),
                    "oof": [as_text[i] for seed, _, _, test_idx in fold_plan if seed == 0 for i in test_idx]}
    return conformal, sets_written


@dataclass(frozen=True)
class HeldOut:
    """A held-out set's features, and the dataset name its evaluations are filed under."""

    data: LabeledFeatures
    name: str = "test"

    @classmethod
    def of(cls, data: LabeledFeatures | None, name: str | None = None) -> HeldOut | None:
        """``data`` as a held-out set (None: none)."""
        return None if data is None else cls(data, name or "test")


def fit_head(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol,
             source_name: str, label_desc: str = "", test: HeldOut | None = None, plan: FitPlan = FitPlan(),
             reporter: Reporter | None = None) -> Path:
    """Cross-validate one head, refit it on all training rows, and write a run directory; with ``test``, score
    the run on it (see :func:`featcache.evaluation.heldout.evaluate_heldout`) and return that evaluation's
    folder.

    The run is named by the hash of everything that trained it: the head's code version and every estimator
    parameter, the protocol, the feature fingerprint and pooling, and every training row used (id, image
    SHA-256, label, group, split, metadata). A change to any of these makes a new run; an identical fit reuses
    the finished one, and a new held-out setting on it is scored from its saved model. ``plan``: how it runs
    (:class:`featcache.recipes.FitPlan`: redo, fold workers, a Ray cluster); it changes no number.
    """
    reporter = reporter or Reporter(quiet=True)
    meta_names = [c["name"] for c in data.meta_spec]
    if test is not None and [c["name"] for c in test.data.meta_spec] != meta_names:
        raise RunError(f"the test data must carry the same --meta columns as the training data "
                       f"({','.join(meta_names) or 'none'}); pass the same --meta for both")
    identity = run_identity(data, entry, head, pool, protocol)
    for rule, (_, what) in _scale_rules(data, head, protocol).items():
        reporter.warn(f"{head}: {what} (recorded in the run as {rule})")
    run_dir = run_path(entry.path, head, pool, identity)
    if is_reusable(run_dir) and not plan.force:
        reporter.info(f"{head}: identical run already finished, reusing {run_dir} (--force to redo)"
                      + (" and scoring its saved model on the held-out set" if test is not None else ""))
    else:
        if is_finished(run_dir) and not plan.force:
            reporter.info(f"{head}: {run_dir} was made by featcache before 0.3 and its model is a pickle: fitting "
                          "it again, without pickles")
        config = {**identity, "dataset": source_name, "labels": label_desc, "backbone": entry.manifest["backbone"],
                  "grouping": data.grouping,
                  # which images were scored: runs whose predictions line up image by image (ensembles)
                  "ids_sha256": rows_hash([i] for i in data.ids), "test_ids_sha256": None, "test_dataset": None}
        _cross_validate(data, entry, head, pool, protocol, config, run_dir, reporter, plan)
    if test is None:
        return run_dir
    return evaluate_heldout(run_dir, data, test.data, protocol, test.name, entry.manifest.get("source"),
                            reporter, plan.force)


def _cross_validate(data: LabeledFeatures, entry: CacheEntry, head: str, pool: str, protocol: Protocol,
                    config: dict, run_dir: Path, reporter: Reporter, plan: FitPlan) -> None:
    """The folds, the pooled out-of-fold scores, the prediction sets' calibration and the final refit,
    written as the run folder ``run_dir``."""
    started = time.perf_counter()
    plans = [split_plan(data, protocol, seed) for seed in range(protocol.seeds)]
    split_counts = plans[0][1]
    fold_plan = [(seed, fold, train, test_idx) for seed, (folds, _) in enumerate(plans)
                 for fold, (train, test_idx) in enumerate(folds)]
    # Every fold and the final refit on all rows are independent tasks, run side by side in worker
    # processes of one BLAS/OpenMP/torch thread each: most head solvers are single-threaded, and
    # the small-matrix ones lose time to a second thread (logreg: 0.7 s on 1 thread, 1.7 s on 2).
    tasks = [(seed, train, test_idx) for seed, _, train, test_idx in fold_plan]
    tasks.append((0, np.arange(len(data.y)), None))  # the final refit on all rows
    smallest = _views_seen(data, protocol) * min(len(train) for _, train, _ in tasks)
    _check_neighbours(config["estimator"], smallest, head, protocol.tune)
    X = with_meta(data.X, data.meta)
    outputs = _run_tasks(head, protocol, data, X, tasks, plan.jobs, plan.cluster)
    final, cv_seconds = outputs[-1][0], time.perf_counter() - started
    fold_metrics, oof_rows, oof_by_seed = [], [], {}
    for (seed, fold, _, test_idx), (est, proba) in zip(fold_plan, outputs[:-1], strict=True):
        proba = _align(proba, list(est.classes_), data.classes)
        oof = oof_by_seed.setdefault(seed, np.full((len(data.y), len(data.classes)), np.nan))
        oof[test_idx] = proba
        fold_metrics.append(compute_metrics(data.y[test_idx], proba, data.classes))
        oof_rows.extend((seed, fold, data.ids[i], None if data.groups is None else data.groups[i], data.y[i],
                         proba[k]) for k, i in enumerate(test_idx))
    # Pooled over every seed: each seed's out-of-fold predictions scored, then averaged; the
    # interval resamples groups when there are groups.
    parts = []
    for seed in range(protocol.seeds):
        scored = ~np.isnan(oof_by_seed[seed]).any(axis=1)
        parts.append((data.y[scored], oof_by_seed[seed][scored],
                      None if data.groups is None else data.groups[scored]))
    pooled = score_parts(parts, data.classes)
    without_copies = _without_copies(data, plans[0][0], oof_by_seed[0])
    if without_copies:
        ba = without_copies["balanced_accuracy"]
        ci = without_copies["ci95"].get("balanced_accuracy", [ba, ba])
        reporter.info(f"{head}: without the {without_copies['n_left_out']} held-out images that have a copy on "
                      f"their training side, balanced accuracy {ba:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] on "
                      f"{without_copies['n_images']} images (with them {pooled['balanced_accuracy']:.3f})")
    conformal, sets_written = _calibrate_sets(data, protocol, head, fold_plan, oof_by_seed[0], reporter)
    model = final.best_estimator_ if hasattr(final, "best_estimator_") else final
    leak = leakage_summary(data, plans[0][0])
    result = {"config": config, "protocol": protocol.describe(data.grouping, split_counts),
              "grouping": data.grouping, "split_counts": split_counts, "leakage": leak,
              "n_images": len(data.y), "n_scored": len(parts[0][0]),  # an official split scores its test part
              "n_folds": len(plans[0][0]), "seeds": protocol.seeds,
              "folds": _summarise(fold_metrics), "pooled": pooled, "per_fold": fold_metrics,
              "cv_seconds": cv_seconds, "notes": data.notes, "featcache": __version__}
    if conformal is not None:
        result["conformal"] = conformal
    if groups_per_class(data) is not None:  # what the card says of classes with few patients behind them
        result["groups_per_class"] = groups_per_class(data)
    if without_copies:
        result["without_training_copies"] = without_copies
    if isinstance(final, BudgetedSearch):
        result["best_params"] = final.best_params_
        result["search"] = {"tried": final.cv_results_, "grid_size": final.n_candidates_,
                            "budget_s": protocol.tune_budget_s}
    head_est = model.named_steps["head"]
    if hasattr(head_est, "loss_curve_"):
        result["mlp_loss_curve"] = head_est.loss_curve_
        # epochs and rows of every fit (folds, then the final refit): what a training loop would redo
        result["mlp_fits"] = [{"epochs": out[0].named_steps["head"].n_epochs_, "rows": len(task[1])}
                              for out, task in zip(outputs, tasks, strict=True)
                              if hasattr(out[0], "named_steps")]
    payload = {"pipeline": model, "classes": data.classes, "feature_fingerprint": entry.fingerprint,
               "pool": pool, "backbone": config["backbone"], "config": config,
               "train_ids": data.ids, "train_sha256": data.sha256,  # for predict's duplicate check
              # and its similar cases: each training image's label and group
              "train_labels": data.y.tolist(), "train_groups": None if data.groups is None else data.groups.tolist(),
              # and the report's gallery: where each training image is (a held-out evaluation adds its own)
              "train_paths": data.paths,
               "fusion": entry.manifest.get("parts")}  # a fused run: which entries and poolings it read
    card = model_card(result, source=entry.manifest.get("source"),
                      n_groups=None if data.groups is None else len(set(data.groups.tolist())))
    write_run(run_dir, config, result, payload, data.classes, oof_rows, sets_written, card)
