"""The one evidence path: what a trained run says of a batch of features, in the order it is worked out.

A held-out set scored at fit (:func:`featcache.evaluation.heldout.score_test`) and new images predicted
(:func:`featcache.evaluation.predict.predict_frame`) go through :func:`batch_evidence`: the batch's features aligned
to the training features (``--test-align``), the head's probabilities (and without the alignment, beside), the
prediction sets (by group with ``--conformal-by``, weighted for the batch with ``--conformal-shift weighted``) and
each image's most similar training images in the run's own space. What only one of them does comes after: the
scores and the shift audit where labels are known, the OOD flags and near-duplicates of a prediction. A new piece
of evidence is added here once, and both have it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.evaluation.conformal import group_limits, prediction_sets, shift_weighted
from featcache.evaluation.features import with_meta
from featcache.evaluation.metrics import _align
from featcache.evaluation.neighbours import DEFAULT_K, nearest, neighbour_rows, run_space
from featcache.evaluation.shift import MIN_ALIGN_IMAGES, AlignmentChoice, align, choose_alignment, coral_shrinkage


@dataclass(frozen=True)
class Known:
    """What a trained run knows of its training images, as its head reads them: features (views included), ids,
    labels (None for an image whose label a run made before featcache kept them all does not say), groups and
    classes. ``meta``: the run reads metadata columns too (they take no part in similarity). ``placed``: the head's
    probabilities placed under ``classes`` (as a held-out set is scored, in float64); False: as the head gives them
    (a prediction, whose classes are the head's own)."""

    X: np.ndarray
    ids: list[str]
    labels: list
    groups: list | None
    classes: list[str]
    meta: bool = False
    placed: bool = True


@dataclass(frozen=True)
class Batch:
    """The images a run is asked about: their features (views included), ids, metadata columns coded as at training
    (``--meta``) and each image's value of the column its sets are calibrated by (``--conformal-by``)."""

    X: np.ndarray
    ids: list[str]
    meta: np.ndarray | None = None
    strata: np.ndarray | list | None = None


@dataclass(frozen=True)
class Alignment:
    """How a batch's features are aligned to the training features before the head reads them (``--test-align``):
    the method applied (``auto`` resolved, with its choice), coral's shrinkage of each side, and the statistics of
    other images of the same clinic when given (``--align-from``)."""

    method: str = "none"
    choice: AlignmentChoice | None = None
    shrunk: tuple[float, float] | None = None
    domain: np.ndarray | None = None

    def apply(self, X: np.ndarray, train_X: np.ndarray) -> np.ndarray:
        return X if self.method == "none" else align(X, train_X, self.method, self.shrunk, domain=self.domain)


def plan_alignment(train_X: np.ndarray, batch_X: np.ndarray, method: str,
                   domain: np.ndarray | None = None) -> Alignment:
    """The alignment ``method`` means for this batch: ``auto`` chooses moments or none from evidence without labels;
    coral's shrinkages are estimated once. A batch too small to align is refused here, before any work."""
    choice = choose_alignment(train_X, batch_X, domain=domain) if method == "auto" else None
    if choice is not None:
        method = choice.method
    if method == "none":
        return Alignment("none", choice)
    source_X = batch_X if domain is None else domain
    enough = len(source_X.reshape(-1, source_X.shape[-1])) >= MIN_ALIGN_IMAGES  # else refused by align, below
    shrunk = (coral_shrinkage(source_X), coral_shrinkage(train_X)) if method == "coral" and enough else None
    align(source_X, train_X, method, shrunk)  # too few images: refused here
    return Alignment(method, choice, shrunk, domain)


@dataclass(frozen=True)
class Calibration:
    """The training rows a run's prediction sets were calibrated on (seed 0, out of fold): their features,
    probabilities, class indices and ids; what ``--conformal-shift weighted`` weighs for a batch."""

    X: np.ndarray
    proba: np.ndarray
    y: np.ndarray
    ids: list[str]


@dataclass
class Evidence:
    """What :func:`batch_evidence` found: the probabilities the head gave (``plain``: without the alignment), the
    features as it read them, the prediction sets (and without the alignment, when asked), the weights of
    shift-weighted sets with their warning, and the similar training cases (rows of
    :data:`featcache.evaluation.neighbours.COLUMNS`)."""

    proba: np.ndarray
    plain: np.ndarray
    aligned: np.ndarray
    sets: np.ndarray | None = None
    plain_sets: np.ndarray | None = None
    unseen: int = 0  # images of a --conformal-by group the calibration never saw (the overall thresholds)
    set_weights: dict | None = None
    set_warning: str | None = None
    neighbours: list[list] | None = None
    neighbour_space: str = ""
    neighbour_k: int = 0  # similar cases found per image (fewer than asked when there are fewer training images)


def batch_evidence(model, known: Known, batch: Batch, alignment: Alignment = Alignment(),  # noqa: ANN001
                   conformal: dict | None = None, calibration: Calibration | None = None, k: int = DEFAULT_K,
                   unaligned_sets: bool = False) -> Evidence:
    """The evidence ``model`` (a run's fitted pipeline) gives on ``batch``: see the module. ``conformal``: the run's
    set calibration (its thresholds); with ``calibration``, the sets are weighted for the batch. ``k``: similar
    cases per image (0: none). ``unaligned_sets``: the sets without the alignment too."""

    def predicted(X: np.ndarray) -> np.ndarray:
        proba = model.predict_proba(with_meta(X, batch.meta))
        return _align(proba, list(model.classes_), known.classes) if known.placed else proba

    plain = predicted(batch.X)
    aligned = alignment.apply(batch.X, known.X)
    found = Evidence(plain if alignment.method == "none" else predicted(aligned), plain, aligned)
    if conformal is not None:
        found.sets, found.unseen = grouped_sets(found.proba, conformal, batch.strata)
        plain_limits = None  # the grouped thresholds
        if calibration is not None:  # each image its own threshold (Tibshirani et al. 2019)
            limits, found.set_weights, found.set_warning = _weighted(calibration, aligned, conformal, batch.ids)
            found.sets = prediction_sets(found.proba, limits)
            aligned_apart = unaligned_sets and alignment.method != "none"
            plain_limits = _weighted(calibration, batch.X, conformal, batch.ids)[0] if aligned_apart else limits
        if unaligned_sets:
            found.plain_sets = grouped_sets(plain, conformal, batch.strata)[0] if plain_limits is None else \
                prediction_sets(plain, plain_limits)
    if k > 0:
        predicted_classes = [known.classes[i] for i in found.proba.argmax(axis=1)]
        found.neighbours, found.neighbour_space, found.neighbour_k = similar_cases(model, known, aligned, batch.ids,
                                                                                  predicted_classes, k)
    return found


def grouped_sets(proba: np.ndarray, conformal: dict, strata: np.ndarray | list | None) -> tuple[np.ndarray, int]:
    """The prediction sets of ``proba`` at a run's coverage, each image with its group's thresholds where the sets
    were calibrated by group (``--conformal-by``); and how many images belong to no group the calibration saw
    (they take the overall thresholds). What an exported model's predictions use too."""
    limits, unseen = group_limits(conformal, strata)
    return prediction_sets(proba, limits), unseen


def _weighted(calibration: Calibration, X: np.ndarray, conformal: dict,
              ids: list[str]) -> tuple[np.ndarray, dict, str | None]:
    return shift_weighted(calibration.X, calibration.proba, calibration.y, X, conformal,
                          calibration_ids=calibration.ids, test_ids=ids)


def similar_cases(model, known: Known, aligned: np.ndarray, ids: list[str], predicted: list[str],  # noqa: ANN001
                  k: int) -> tuple[list[list], str, int]:
    """Each image's ``k`` most similar training images (those whose label is known) in the run's own space, on the
    features as the head read them: rows of :data:`featcache.evaluation.neighbours.COLUMNS`, the space, and how
    many were found per image."""
    space = run_space(model, meta=known.meta)
    keep = [i for i, label in enumerate(known.labels) if label is not None]
    train_X = known.X if len(keep) == len(known.ids) else known.X[keep]
    index, similarity = nearest(space.transform(train_X), space.transform(aligned), k)
    groups = None if known.groups is None else [known.groups[i] for i in keep]
    rows = neighbour_rows(ids, predicted, index, similarity, [known.ids[i] for i in keep],
                          [known.labels[i] for i in keep], groups)
    return rows, space.description, int(index.shape[1])
