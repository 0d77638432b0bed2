"""Predicting with a saved run: extract new images through the cache, then apply the saved model."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featcache.data.sources import IMAGE_SUFFIXES, ImageRecord, ImageSource, column_key, open_source, slug
from featcache.errors import RunError
from featcache.evaluation.conformal import set_column, set_labels
from featcache.evaluation.evidence import Alignment, Batch, Calibration, Evidence, Known, batch_evidence, plan_alignment
from featcache.evaluation.features import encode_meta, with_meta
from featcache.evaluation.leakage import nearest_known, normalised, threshold_for
from featcache.evaluation.neighbours import DEFAULT_K, agreement, as_frame
from featcache.evaluation.shift import (
    DOMAIN_WARN_AUROC,
    MIN_ALIGN_IMAGES,
    OOD_QUANTILE,
    OOD_WARN_FRACTION,
    domain_auroc,
    ood_per_image,
)
from featcache.extraction.extract import extract_like
from featcache.progress import Reporter
from featcache.store.entries import CacheEntry
from featcache.store.fusion import FusedEntry, trained_entry
from featcache.store.model_files import load_model
from featcache.store.naming import neighbours_path
from featcache.store.runs import read_metrics, read_predictions

if TYPE_CHECKING:
    import pandas as pd

def predict_proba_from_entry(saved: dict, entry: CacheEntry, ids: list[str],
                             records: list[ImageRecord] | None = None, source_name: str = "",
                             transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Apply a saved head to features in ``entry``; refuses features made unlike its training ones.

    A head trained with ``--meta`` also needs the images' ``records`` (from a CSV with the same
    metadata columns). ``transform``: applied to the image features first (``--test-align``)."""
    if entry.fingerprint != saved["feature_fingerprint"]:
        raise RunError(
            f"the features in {entry.path} have fingerprint {entry.fingerprint} but this head was trained on "
            f"{saved['feature_fingerprint']} (other backbone, weights or preprocessing); extract the images "
            "with the same settings as the training data")
    X = entry.read(saved["pool"], ids)
    if transform is not None:
        X = transform(X)
    spec = saved["config"].get("meta_spec")
    if spec:
        if records is None:
            raise RunError("this head was trained with metadata (--meta "
                           f"{','.join(c['name'] for c in spec)}); predict from a CSV that has those columns")
        by_id = {r.id: r for r in records}
        meta, _ = encode_meta([by_id[i] for i in ids], [c["name"] for c in spec], spec, source_name)
        X = with_meta(X, meta)
    return saved["pipeline"].predict_proba(X)


def images_source(inputs: list[str], group_col: str | None = None, image_col: str | None = None) -> ImageSource:
    """A source of unlabelled images from file paths and/or folders (searched recursively)."""
    if len(inputs) == 1 and (Path(inputs[0]).suffix.lower() in (".csv", ".npz")
                             or (Path(inputs[0]) / "labels.csv").is_file()):
        return open_source(inputs[0], image_col=image_col, group_col=group_col, labels_required=False)
    for flag, column in (("--group-col", group_col), ("--image-col", image_col)):
        if column:
            raise RunError(f"{flag} {column}: only a CSV of images has columns; pass one CSV")
    records = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise RunError(f"{path}: no such file or folder")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
            if path.is_dir() else [path]
        records += [ImageRecord(id=str(f.resolve()), path=f) for f in files]
    if not records:
        raise RunError(f"no images found in {', '.join(inputs)}")
    return ImageSource(name=slug("predict-" + Path(inputs[0]).resolve().name), location=Path(inputs[0]),
                       kind="files", records=records)


def training_duplicates(saved: dict, known: Known | None, batch_X: np.ndarray, entry: CacheEntry,
                        ids: list[str]) -> list[tuple[str, float] | None]:
    """For each of ``ids`` (in ``entry``, their features ``batch_X``): the training image it is identical (same
    SHA-256, similarity 1.0) or nearly identical to, with the similarity; None when it is neither."""
    if known is None or not ids:
        return [None] * len(ids)
    train_ids = known.ids
    protocol = saved["config"]["protocol"]
    threshold, _ = threshold_for(saved["backbone"], saved["pool"], protocol.get("near_dup_threshold"))
    known_sha = {sha: i for i, sha in zip(train_ids, saved["train_sha256"], strict=True)}
    state = entry.state()
    Z_train, center = normalised(known.X)
    Z_new, _ = normalised(batch_X, center)
    nearest, similarity = nearest_known(Z_new, Z_train)
    found: list[tuple[str, float] | None] = []
    for k, image_id in enumerate(ids):
        if state[image_id].sha256 in known_sha:
            found.append((known_sha[state[image_id].sha256], 1.0))
        elif similarity[k] >= threshold:
            found.append((train_ids[nearest[k]], float(similarity[k])))
        else:
            found.append(None)
    return found


@dataclass(frozen=True)
class NewImages:
    """Images to predict and how to read them: ``inputs`` are image files, folders (searched recursively) or a CSV
    (with ``image_col`` and ``group_col`` when featcache does not find them by itself); their features go under
    ``cache_root``, made with the local ``weights`` file given at extraction, if any."""

    inputs: tuple[str, ...]
    cache_root: Path
    group_col: str | None = None
    image_col: str | None = None
    weights: str | None = None


@dataclass(frozen=True)
class PredictSettings:
    """How a saved run predicts a batch: ``test_align`` (``none``, ``moments``, ``coral``, ``auto``) with the
    statistics of the batch or of ``align_from`` (images from the same clinic), ``neighbours`` similar training
    cases per image (0: none), and ``trust_pickle`` to load a run made before featcache 0.3."""

    test_align: str = "none"
    align_from: str | None = None
    neighbours: int = DEFAULT_K
    trust_pickle: bool = False


def predict_frame(run_dir: Path, images: NewImages, settings: PredictSettings = PredictSettings(),
                  reporter: Reporter | None = None) -> pd.DataFrame:
    """Class probabilities of new images with a saved run, a row per image indexed by id: ``predicted``,
    ``p_<class>`` per class, ``near_duplicate_of`` and ``similarity`` (the training image it is identical or
    nearly identical to), ``neighbours_agree`` (the share of its ``settings.neighbours`` most similar training
    images labelled as predicted), ``ood_score`` and ``ood_percentile`` (how far it lies from the training images,
    and the share of held-out training images that lie closer) with ``ood`` (True above the 95th percentile: about
    5 % of images like the training ones are flagged too), ``group``, and ``failed`` (why an image has no
    prediction, else empty). The similar cases themselves (id, rank, neighbour, label, group, similarity, agrees)
    are ``frame.attrs["neighbours"]``."""

    reporter = reporter or Reporter(quiet=True)
    saved = load_model(run_dir, settings.trust_pickle)
    source = images_source(list(images.inputs), images.group_col, images.image_col)
    cache_root, weights = images.cache_root, images.weights
    train_entry = trained_entry(run_dir, saved)
    if isinstance(train_entry, FusedEntry):  # a fused run: the new images go through every backbone it read
        results = [extract_like(source, part, cache_root, weights, reporter) for part, _ in train_entry.parts]
        entry = FusedEntry([(r.entry, pool) for r, (_, pool) in zip(results, train_entry.parts, strict=True)])
        failed = {k: v for r in results for k, v in r.failed.items()}
    else:
        result = extract_like(source, train_entry, cache_root, weights, reporter)
        entry, failed = result.entry, result.failed
    asked = {r.id for r in source.records}  # the entry also remembers images of earlier calls that failed
    failed = {image_id: reason for image_id, reason in failed.items() if image_id in asked}
    ids = [r.id for r in source.records if r.id not in failed]
    for image_id, reason in failed.items():
        reporter.warn(f"no prediction for {image_id}: {reason}")
    if not ids:
        first, reason = next(iter(failed.items()))
        raise RunError(f"none of the {len(failed)} images could be read, so nothing was predicted (first: {first}: "
                       f"{reason}); check that they are images featcache reads (JPEG, PNG, …)")
    _check_features(saved, entry)
    known, legacy = _known(run_dir, saved, train_entry)
    batch_X = entry.read(saved["pool"], ids)
    alignment = _batch_alignment(saved, known, batch_X, train_entry, images, reporter, settings)
    conformal = read_metrics(run_dir).get("conformal")
    strata = batch_strata(conformal, source, ids, reporter) if conformal else None
    calibration, weights_record, too_few = None, None, ""
    if conformal and conformal.get("shift") == "weighted":
        calibration, weights_record, too_few = _batch_calibration(run_dir, saved, train_entry, ids)
    if settings.neighbours > 0 and known is None:
        raise RunError(f"{run_dir}: its model names no training images, so it has no similar cases; fit it again")
    found = batch_evidence(saved["pipeline"], known or _no_training(saved), Batch(batch_X, ids, _batch_meta(saved,
                           source, ids), strata), alignment, conformal or None, calibration, settings.neighbours)
    duplicates = training_duplicates(saved, known, batch_X, entry, ids)  # the features read once, above
    near = [(i, d) for i, d in zip(ids, duplicates, strict=True) if d]
    if near:
        image_id, (train_id, similarity) = near[0]
        reporter.warn(f"{len(near)} of {len(ids)} images are identical or nearly identical to a training image "
                      f"of this run (first: {image_id} ~ {train_id}, cosine {similarity:.3f}): their predictions "
                      "say little about new data; see the near_duplicate_of column")
    ood, percentile = out_of_distribution(known, batch_X, reporter)
    if legacy and settings.neighbours > 0:
        reporter.warn(legacy)
    frame = _frame(found, [str(c) for c in saved["pipeline"].classes_], source, ids, failed, duplicates,
                   (ood, percentile))
    if alignment.choice is not None:  # what --test-align auto chose for this batch, and why
        frame.attrs["test_align_choice"] = alignment.choice.record()
    if conformal:  # each image's prediction set, at the run's coverage (--conformal-by: its group's)
        if found.unseen and conformal.get("by") and strata is not None:
            reporter.warn(f"{found.unseen} of {len(ids)} images belong to no {conformal['by']['column']} group the "
                          "run was calibrated on: their sets use the threshold calibrated on all training images")
        if too_few:
            reporter.warn(too_few)
        if calibration is not None:
            weights_record = found.set_weights
            if found.set_warning:
                reporter.warn(found.set_warning)
            else:
                reporter.info(f"prediction sets weighted for this batch (--conformal-shift weighted): "
                              f"{weights_record['effective_calibration_images']:.0f} of "
                              f"{weights_record['calibration_images']} calibration images in effect, domain AUROC "
                              f"{weights_record['domain_auroc']:.2f}")
        if weights_record is not None:
            frame.attrs["conformal_weights"] = weights_record
        classes = [str(c) for c in saved["pipeline"].classes_]
        sets = set_labels(found.sets, classes)
        frame.insert(len(classes) + 1, set_column(conformal["level"]), [*sets, *[""] * (len(frame) - len(sets))])
    return frame


def _check_features(saved: dict, entry: CacheEntry) -> None:
    """Features made unlike the training features are refused."""
    if entry.fingerprint != saved["feature_fingerprint"]:
        raise RunError(
            f"the features in {entry.path} have fingerprint {entry.fingerprint} but this head was trained on "
            f"{saved['feature_fingerprint']} (other backbone, weights or preprocessing); extract the images "
            "with the same settings as the training data")


def _known(run_dir: Path, saved: dict, train_entry: CacheEntry) -> tuple[Known | None, str]:
    """What the run knows of its training images (None: a run made before featcache 0.2 records none), and, for a
    run made before its model kept every label, what its similar cases cannot search (said when they are asked)."""
    train_ids = saved.get("train_ids")
    if not train_ids:
        return None, ""
    labels, groups, legacy = saved.get("train_labels"), saved.get("train_groups"), ""
    if labels is None:  # a run made before its model kept the training labels: its out-of-fold rows have them
        oof = read_predictions(run_dir)
        by_id = {i: (label, group) for i, label, group in zip(oof.ids, oof.labels, oof.groups, strict=True)}
        labels = [by_id[i][0] if i in by_id else None for i in train_ids]
        groups = [by_id[i][1] if i in by_id else None for i in train_ids]
        kept = sum(label is not None for label in labels)
        if kept < len(train_ids):
            legacy = (f"this run folder keeps the labels of {kept} of its {len(train_ids)} training images (it "
                      "predates featcache keeping them all): similar cases are searched among those; fit it again "
                      "(--force) to search them all")
    return Known(train_entry.read(saved["pool"], train_ids), list(train_ids), list(labels), groups,
                 [str(c) for c in saved["pipeline"].classes_], bool(saved["config"].get("meta_spec")), False), legacy


def _no_training(saved: dict) -> Known:
    """A run that records no training images: its head alone (no alignment, no similar cases)."""
    return Known(np.empty((0, 0), np.float32), [], [], None, [str(c) for c in saved["pipeline"].classes_], False,
                 False)


def _batch_meta(saved: dict, source: ImageSource, ids: list[str]) -> np.ndarray | None:
    """The images' metadata columns coded as at training, for a head trained with ``--meta``."""
    spec = saved["config"].get("meta_spec")
    if not spec:
        return None
    by_id = {r.id: r for r in source.records}
    meta, _ = encode_meta([by_id[i] for i in ids], [c["name"] for c in spec], spec, str(source.location))
    return meta


def _frame(found: Evidence, classes: list[str], source: ImageSource, ids: list[str], failed: dict,
           duplicates: list, ood: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    """The prediction table: a row per image, failed ones last; the similar cases in ``attrs["neighbours"]``."""
    import pandas as pd

    cases = found.neighbours
    agree = agreement(cases, ids) if cases is not None else [np.nan] * len(ids)
    groups = {r.id: r.group or "" for r in source.records}
    rows = [{"id": image_id, "group": groups[image_id], "predicted": classes[int(np.argmax(p))],
             **{f"p_{c}": float(v) for c, v in zip(classes, p, strict=True)},
             "near_duplicate_of": dup[0] if dup else "", "similarity": dup[1] if dup else np.nan,
             "neighbours_agree": a, "ood_score": o, "ood_percentile": q, "ood": bool(q > OOD_PERCENTILE),
             "failed": ""}
            for image_id, p, dup, a, o, q in zip(ids, found.proba, duplicates, agree, *ood, strict=True)]
    rows += [{"id": image_id, "group": groups[image_id], "predicted": "",
              **{f"p_{c}": np.nan for c in classes}, "near_duplicate_of": "", "similarity": np.nan,
              "neighbours_agree": np.nan, "ood_score": np.nan, "ood_percentile": np.nan, "ood": False,
              "failed": reason}
             for image_id, reason in failed.items() if image_id in groups]
    columns = ["id", "predicted", *[f"p_{c}" for c in classes], "near_duplicate_of", "similarity",
               "neighbours_agree", "ood_score", "ood_percentile", "ood", "group", "failed"]
    frame = pd.DataFrame(rows, columns=columns).set_index("id")
    frame.attrs["neighbours"] = as_frame(cases or [])
    return frame


def _batch_calibration(run_dir: Path, saved: dict, train_entry: CacheEntry,
                       ids: list[str]) -> tuple[Calibration | None, dict | None, str]:
    """A run fit with --conformal-shift weighted: the rows its sets were calibrated on (seed 0, out of fold), which
    the batch's sets are weighted against; none, and why, when the batch is too small for a domain classifier."""
    if len(ids) < MIN_ALIGN_IMAGES:
        return None, {"method": "none", "reason": f"{len(ids)} images, fewer than {MIN_ALIGN_IMAGES}"}, (
            f"this run's prediction sets are weighted for the batch they are given (--conformal-shift weighted), and "
            f"{len(ids)} images are too few to weigh them (at least {MIN_ALIGN_IMAGES}): their sets use the "
            "unweighted thresholds; predict a larger batch of the same clinic")
    oof = read_predictions(run_dir)
    first = oof.seeds == 0
    cal_ids = [i for i, keep in zip(oof.ids, first, strict=True) if keep]
    classes = [str(c) for c in saved["pipeline"].classes_]
    cal_y = np.array([classes.index(str(label)) for label in oof.labels[first]])
    return Calibration(train_entry.read(saved["pool"], cal_ids), oof.proba[first], cal_y, cal_ids), None, ""


def batch_strata(conformal: dict, source: ImageSource, ids: list[str], reporter: Reporter) -> list[str] | None:
    """Each image's value of the column a run's sets were calibrated by (--conformal-by), from the CSV it was
    given in; None (the overall threshold for all, said) when the images come without that column."""
    by = conformal.get("by")
    if not by:
        return None
    found = {column_key(c): c for r in source.records[:1] for c in r.meta}
    column = found.get(column_key(by["column"]))
    if column is None:
        reporter.warn(f"this run's prediction sets are calibrated within each {by['column']!r}; these images come "
                      f"without that column (predict from a CSV that has it), so their sets use the threshold "
                      "calibrated on all training images")
        return None
    values = {r.id: r.meta.get(column, "") for r in source.records}
    return [values[i] for i in ids]


OOD_PERCENTILE = 100 * OOD_QUANTILE  # flagged: farther from the training images than 95 % of held-out ones are


def out_of_distribution(known: Known | None, batch_X: np.ndarray,
                        reporter: Reporter) -> tuple[np.ndarray, np.ndarray]:
    """Each image's OOD score against the run's training images (on the features as extracted, before any
    --test-align: alignment would hide the very difference measured) and its percentile among held-out training
    images' scores; NaN for a run that does not record its training images. Says so when far more images are
    flagged than the 5 % an image like the training images would be."""
    if known is None or not len(batch_X):
        return np.full(len(batch_X), np.nan), np.full(len(batch_X), np.nan)
    scores, percentile = ood_per_image(known.X, batch_X)
    flagged = float(np.mean(percentile > OOD_PERCENTILE))
    if len(batch_X) >= 20 and flagged >= OOD_WARN_FRACTION:
        reporter.warn(f"{flagged:.0%} of these images lie farther from the run's training images than 95 % of "
                      "held-out training images do (the ood column; about 5 % would for images like the training "
                      "ones): their probabilities are less trustworthy, and the set may come from another clinic, "
                      "device or modality")
    return scores, percentile


def predict_ensemble_frame(run_dirs: list[Path], spec: str, images: NewImages,
                           settings: PredictSettings = PredictSettings(),
                           reporter: Reporter | None = None) -> pd.DataFrame:
    """Class probabilities of new images with an ensemble of saved runs, as ``featcache compare --ensemble``
    scored it: ``topN`` averages the runs' probabilities, ``stack`` applies the meta-learner fit on all of
    their out-of-fold probabilities (:func:`featcache.evaluation.stacking.final_meta_learner`). Each run
    predicts as :func:`predict_frame`; an image any run could not read has no prediction."""
    from featcache.evaluation.stacking import final_meta_learner, stacked_proba
    from featcache.store.runs import read_predictions

    if len(run_dirs) < 2:
        raise RunError(f"an ensemble needs two or more runs; got {len(run_dirs)}")
    frames = [predict_frame(Path(run), images, settings, reporter) for run in run_dirs]
    columns = [c for c in frames[0].columns if c.startswith("p_")]
    for run, frame in zip(run_dirs, frames, strict=True):
        if [c for c in frame.columns if c.startswith("p_")] != columns:
            raise RunError(f"{run} predicts other classes than {run_dirs[0]}; an ensemble's runs must share classes")
    classes = [c.removeprefix("p_") for c in columns]
    failed = frames[0]["failed"].copy()
    for frame in frames[1:]:
        failed = failed.where(failed != "", frame["failed"])
    ok = failed[failed == ""].index
    probas = [frame.loc[ok, columns].to_numpy(dtype=float) for frame in frames]
    if spec == "stack":
        oof = [read_predictions(Path(run), "oof") for run in run_dirs]
        if any(o.ids != oof[0].ids or not np.array_equal(o.seeds, oof[0].seeds) for o in oof):
            raise RunError("these runs' out-of-fold predictions are not of the same images and folds, so no "
                           "meta-learner can be fit on them; stack runs fitted on the same data with the same --cv")
        meta = final_meta_learner([o.proba for o in oof], oof[0].labels, oof[0].classes, oof[0].seeds,
                                  oof[0].group_array(np.ones(len(oof[0].labels), dtype=bool)))
        proba = stacked_proba(meta, probas, len(classes))
    else:
        proba = np.mean(probas, axis=0)
    sets = [c for f in frames for c in f.columns if c.startswith("set_")]
    if sets and reporter is not None:  # each member's thresholds were calibrated on its own probabilities
        reporter.warn(f"no prediction sets ({sets[0]}) for the ensemble: its members' conformal thresholds do not "
                      "apply to the combined probabilities; predict with one of its runs for sets")
    frame = frames[0].drop(columns=[c for c in frames[0].columns if c.startswith("set_")])
    frame["failed"] = failed
    frame.loc[failed != "", columns] = np.nan
    frame.loc[failed != "", "predicted"] = ""
    frame.loc[ok, columns] = proba
    frame.loc[ok, "predicted"] = [classes[int(k)] for k in proba.argmax(axis=1)]
    return frame


def _batch_alignment(saved: dict, known: Known | None, batch_X: np.ndarray, train_entry: CacheEntry,
                     images: NewImages, reporter: Reporter, settings: PredictSettings) -> Alignment:
    """The shift audit of the new images against the training images (a warning when clear), and with
    ``--test-align`` how their features are aligned (statistics of the batch itself, or of ``align_from``, images
    of the same clinic); with ``auto``, also what it chose and why."""
    method, align_from = settings.test_align, settings.align_from
    if known is None:
        if method != "none":
            raise RunError(f"--test-align {method}: this run does not record its training images (made before "
                           "featcache 0.2); fit it again to align")
        return Alignment()
    if method == "none" and align_from:
        raise RunError("--align-from gives the statistics for --test-align: pass --test-align auto, moments or coral")
    domain = None
    if align_from:
        same_clinic = images_source([align_from])
        cache_root, weights, pool = images.cache_root, images.weights, saved["pool"]
        if isinstance(train_entry, FusedEntry):  # through every backbone of the fused run, each with its pooling
            domain = FusedEntry([(extract_like(same_clinic, part, cache_root, weights, reporter).entry, part_pool)
                                 for part, part_pool in train_entry.parts]).read()
        else:
            domain = extract_like(same_clinic, train_entry, cache_root, weights, reporter).entry.read(pool)
    alignment = plan_alignment(known.X, batch_X, method, domain)
    choice, shifted = alignment.choice, False
    if len(batch_X) >= MIN_ALIGN_IMAGES:
        auroc, interval = domain_auroc(known.X, batch_X)
        if auroc >= DOMAIN_WARN_AUROC:
            shifted = True
            advice = ("try --test-align auto (or moments)" if method == "none" else
                      f"--test-align auto chose {choice.method}, because {choice.reason}" if choice else
                      f"they are predicted with --test-align {method}, which corrects their features' statistics")
            reporter.warn(f"domain shift: a classifier tells these images' features from the training images' "
                          f"(AUROC {auroc:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]); the model's threshold may "
                          f"not fit them: {advice}")
    if choice is not None and not shifted:  # the warning above said it already; too few images to decide: a warning
        (reporter.info if choice.decided else reporter.warn)(f"--test-align auto chose {choice.method}: "
                                                             f"{choice.reason}")
    return alignment


def _cell(value: object) -> str:
    """A number in full (the shortest text that reads back as the same float), a flag as true/false, NaN empty."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    value = float(value)
    return "" if np.isnan(value) else repr(value)


def write_predictions(frame: pd.DataFrame, out: Path) -> list[Path]:
    """``predictions.csv``: a row per image (probabilities in full: the shortest text that reads back as the same
    float; an image that failed says ``FAILED: <why>`` in the ``predicted`` column), and, when the frame has
    them, its similar cases in :func:`neighbours_path`. Returns the files written."""
    classes = [c for c in frame.columns if c.startswith("p_")]
    sets = [c for c in frame.columns if c.startswith("set_")]
    extra = [c for c in ("neighbours_agree", "ood_score", "ood_percentile", "ood") if c in frame.columns]
    cases = frame.attrs.get("neighbours")
    written = [out]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "group", "predicted", *classes, *sets, "near_duplicate_of", "similarity", *extra])
            for image_id, row in frame.iterrows():
                if row["failed"]:
                    writer.writerow([image_id, row["group"], f"FAILED: {row['failed']}", *[""] * len(classes),
                                     *[""] * len(sets), "", "", *[""] * len(extra)])
                    continue
                similarity = "" if np.isnan(row["similarity"]) else f"{row['similarity']:.4f}"
                writer.writerow([image_id, row["group"], row["predicted"], *(repr(float(row[c])) for c in classes),
                                 *(row[c] for c in sets), row["near_duplicate_of"], similarity,
                                 *(_cell(row[c]) for c in extra)])
        if cases is not None and len(cases):
            written.append(neighbours_path(out))
            cases.to_csv(written[-1], index=False)
    except OSError as exc:
        raise RunError(f"cannot write {out} ({exc.strerror or exc}); pass --out with a writable path") from None
    return written
