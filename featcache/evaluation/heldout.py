"""Held-out evaluations: a trained run scored on a test set from its saved model, without fitting it again.

A run is named by what trained and cross-validated it (:func:`featcache.evaluation.runner.run_identity`); a
test set, its alignment (``--test-align``) and shift-weighted sets (``--conformal-shift``) name one held-out
evaluation of it, a folder inside the run (:func:`featcache.store.naming.heldout_path`). Scoring the same
model on the same test set aligned another way adds a folder; the cross-validation is not run again. The
evaluation reads the run's files (its model, its out-of-fold predictions, its prediction sets' calibration),
so what it writes is recomputable from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.evaluation.conformal import set_column, set_labels
from featcache.evaluation.conformal import summary as set_summary
from featcache.evaluation.evidence import (
    Batch,
    Calibration,
    Evidence,
    Known,
    batch_evidence,
    grouped_sets,
    plan_alignment,
)
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.metrics import MAIN_METRICS, score_with_ci
from featcache.evaluation.model_card import model_card
from featcache.evaluation.neighbours import COLUMNS as NEIGHBOUR_COLUMNS
from featcache.evaluation.neighbours import DEFAULT_K, agreement
from featcache.evaluation.protocol import Protocol
from featcache.evaluation.shift import CORAL_NEAR_MOMENTS, shift_audit, shift_warning
from featcache.progress import Reporter
from featcache.store.hashing import rows_hash
from featcache.store.model_files import load_model
from featcache.store.naming import heldout_path
from featcache.store.runs import is_finished, read_metrics, read_predictions, write_heldout


def heldout_identity(run_dir: Path, test: LabeledFeatures, protocol: Protocol) -> dict:
    """Everything that sets a held-out evaluation's numbers besides its run: the test rows and the held-out
    settings (defaults left out, as in a run's identity)."""
    return {"run": Path(run_dir).name, "test_data_sha256": test.identity(), **protocol.heldout_config()}


def heldout_dir_for(run_dir: Path, test: LabeledFeatures, protocol: Protocol, test_name: str) -> Path:
    """The folder :func:`evaluate_heldout` writes this evaluation to (finished or not)."""
    return heldout_path(run_dir, test_name, heldout_identity(run_dir, test, protocol))


def evaluate_heldout(run_dir: Path, data: LabeledFeatures, test: LabeledFeatures, protocol: Protocol,
                     test_name: str, source: str | None, reporter: Reporter, force: bool = False) -> Path:
    """Score the finished run ``run_dir`` (trained on ``data``, read from ``source``) on ``test`` from its saved
    model and write the evaluation folder; an identical evaluation already written is reused (``force``: scored
    again)."""
    identity = heldout_identity(run_dir, test, protocol)
    folder = heldout_path(run_dir, test_name, identity)
    result = read_metrics(run_dir)
    head = result["config"]["head"]
    if is_finished(folder) and not force:
        reporter.info(f"{head}: identical held-out evaluation already finished, reusing {folder} (--force to redo)")
        tested = read_metrics(folder).get("test") or {}
        shift, choice = tested.get("shift"), tested.get("test_align_choice")
        warning = shift_warning(shift, choice["chosen"] if choice else protocol.test_align, choice) if shift else None
        if warning:  # a reused evaluation says what it said when it was made
            reporter.warn(f"{head}: {warning}")
        return folder
    saved = load_model(run_dir)
    conformal = result.get("conformal")
    if conformal is not None and protocol.conformal_shift == "weighted":  # predict weighs a batch's sets the same way
        conformal = {**conformal, "shift": "weighted"}
    scored, heldout = _out_of_fold(run_dir, data)
    scores, test_rows, sets, rows = score_test(saved["pipeline"], data, test, protocol, reporter, conformal, heldout,
                                               scored, head)
    config = {**result["config"], "protocol": protocol.config(), "heldout": identity,
              "test_data_sha256": identity["test_data_sha256"], "test_ids_sha256": rows_hash([i] for i in test.ids),
              "test_dataset": test_name}
    evaluated = {**result, "config": config, "test": scores}
    if conformal is not None:  # with --conformal-shift weighted, the sets say so
        evaluated["conformal"] = conformal
    facts = {k: v for k, v in saved.items() if k != "pipeline"}
    facts |= {"config": config, "test_paths": dict(zip(test.ids, test.paths, strict=True)) if test.paths else None}
    written = None
    if conformal is not None:
        written = {"column": set_column(protocol.conformal)}
        written |= {k: set_labels(v, data.classes) for k, v in sets.items()}
    card = model_card(evaluated, source=source,
                      n_groups=None if data.groups is None else len(set(data.groups.tolist())))
    write_heldout(folder, config, evaluated, facts, data.classes, test_rows, written, (NEIGHBOUR_COLUMNS, rows), card)
    return folder


def _out_of_fold(run_dir: Path, data: LabeledFeatures) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Which training rows seed 0 scored out of fold, and (their probabilities, their labels), in the rows'
    order, read back from the run's ``oof_predictions.csv`` (written in full, so exactly as fitted)."""
    oof = read_predictions(run_dir, "oof")
    by_id = {image_id: row for row, (image_id, seed) in enumerate(zip(oof.ids, oof.seeds, strict=True)) if seed == 0}
    scored = np.array([image_id in by_id for image_id in data.ids], dtype=bool)
    rows = [by_id[image_id] for image_id, keep in zip(data.ids, scored, strict=True) if keep]
    return scored, (oof.proba[rows], data.y[scored])


def score_test(model, data: LabeledFeatures, test: LabeledFeatures, protocol: Protocol,  # noqa: ANN001
                reporter: Reporter, conformal: dict | None = None,
                heldout: tuple[np.ndarray, np.ndarray] | None = None,
                calibration: np.ndarray | None = None, name: str = "") -> tuple[dict, tuple, dict, list]:
    """The held-out set scored by the refit model (its features aligned first with ``--test-align``, the
    unaligned scores kept beside), its prediction sets' coverage (as it is, under shift too), and the shift
    audit of its features against the training features (``heldout``: the out-of-fold probabilities and labels,
    for the label-shift estimate that needs a confusion matrix and for the sets' calibration scores;
    ``calibration``: which training rows they are; ``name``: the run's head, which begins each warning)."""

    def warn(message: str) -> None:  # each warning names the run that gave it
        reporter.warn(f"{name}: {message}" if name else message)

    groups = test.groups
    known = Known(data.X, data.ids, data.y.tolist(), None if data.groups is None else data.groups.tolist(),
                  data.classes, bool(data.meta_spec))
    alignment = plan_alignment(data.X, test.X, protocol.test_align)
    method, choice, shrunk = alignment.method, alignment.choice, alignment.shrunk
    weighted = conformal is not None and protocol.conformal_shift == "weighted"
    found = batch_evidence(model, known, Batch(test.X, test.ids, test.meta, test.strata), alignment, conformal,
                           Calibration(data.X[calibration], heldout[0], np.searchsorted(data.classes, heldout[1]),
                                       [i for i, keep in zip(data.ids, calibration, strict=True) if keep])
                           if weighted else None, DEFAULT_K, unaligned_sets=protocol.test_align != "none")
    proba, plain = found.proba, found.plain
    scores = score_with_ci(test.y, proba, data.classes, groups)
    scores["n_images"] = len(test.y)
    sets = {}
    if conformal is not None:
        y_idx = np.searchsorted(data.classes, test.y)
        if found.set_warning:
            warn(found.set_warning)
        sets["test"] = found.sets
        scores["conformal"] = set_summary(sets["test"], y_idx)
        if weighted:
            scores["conformal"]["weights"] = found.set_weights
            scores["conformal"]["unweighted"] = set_summary(grouped_sets(proba, conformal, None)[0], y_idx)
        if conformal.get("by"):
            scores["conformal"]["by"] = _coverage_by_group(sets["test"], y_idx, test.strata, found.unseen)
            if found.unseen:
                warn(f"--conformal-by {conformal['by']['column']}: {found.unseen} of {len(test.y)} test images belong "
                     "to groups the training images do not have (or to none): their sets use the threshold "
                     "calibrated on all training images")
    scores["neighbours"] = _neighbour_summary(found, data, test)
    if protocol.test_align != "none":
        unaligned = score_with_ci(test.y, plain, data.classes, groups)
        scores["unaligned"] = {k: unaligned[k] for k in (*MAIN_METRICS, "ci95") if k in unaligned}
        if conformal is not None:
            sets["test_unaligned"] = found.plain_sets
            scores["unaligned"]["conformal"] = set_summary(sets["test_unaligned"], y_idx)
        scores["test_align"] = protocol.test_align
        if choice is not None:
            scores["test_align_choice"] = choice.record()
    if method == "coral":  # how far each side's covariance was shrunk, and what that means
        scores["coral_shrinkage"] = {"test": shrunk[0], "train": shrunk[1]}
        if shrunk[0] >= CORAL_NEAR_MOMENTS:
            warn(f"--test-align coral: {len(test.y)} test images cannot estimate the covariance of "
                 f"{test.X.shape[-1]} feature dimensions, so it was shrunk {shrunk[0]:.2f} of the way "
                 "to its diagonal (Ledoit-Wolf): coral is close to moments here")
    scores["shift"] = shift_audit(data.X, test.X, proba, data.classes, data.y, test.y, heldout, method)
    warning = shift_warning(scores["shift"], method, choice)
    if warning:  # with auto, it says what was chosen and why
        warn(warning)
    elif choice is not None:
        reporter.info(f"{name}: --test-align auto chose {method}: {choice.reason}", once=True)
    if scores["shift"]["prevalence_degenerate"]:
        warn(f"label shift: {scores['shift']['prevalence_degenerate']} (metrics.json test.shift holds EM's "
             "and BBSE's estimates with their intervals)")
    predictions = (test.ids, test.y, proba) + ((plain,) if protocol.test_align != "none" else ())
    return scores, predictions, sets, found.neighbours


def _neighbour_summary(found: Evidence, data: LabeledFeatures, test: LabeledFeatures) -> dict:
    """How often each test image's similar training cases agree with its prediction: overall, when right, when
    wrong."""
    agree = agreement(found.neighbours, test.ids)
    predicted = np.array([data.classes[i] for i in found.proba.argmax(axis=1)])
    return {"k": found.neighbour_k, "space": found.neighbour_space, "mean_agreement": float(np.mean(agree)),
            "agreement_when_right": _mean_where(agree, predicted == test.y),
            "agreement_when_wrong": _mean_where(agree, predicted != test.y)}


def _coverage_by_group(sets: np.ndarray, y_idx: np.ndarray, strata: np.ndarray | None, unseen: int) -> dict:
    """Coverage and set size of the test images of each group (what --conformal-by promises), and how many
    images took the overall threshold."""
    if strata is None:
        return {"groups": {}, "overall_threshold_images": int(len(y_idx))}
    groups = {str(v): {"n": int((strata == v).sum()), **set_summary(sets[strata == v], y_idx[strata == v])}
              for v in np.unique(strata)}
    return {"groups": groups, "overall_threshold_images": unseen}


def _mean_where(values: list[float], where: np.ndarray) -> float | None:
    return float(np.mean(np.asarray(values)[where])) if where.any() else None


