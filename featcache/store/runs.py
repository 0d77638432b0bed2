"""Run folders: the one place that writes and reads them.

A run lives in ``<entry>/runs/<head>-<pool>-<id>/``, where ``id`` is the hash of everything that
trained and cross-validated it (see :func:`featcache.evaluation.runner.fit_head`). It holds ``config.json``,
``metrics.json``, the model without pickles (``model.skops``, ``model.json`` and the side files of
:mod:`featcache.store.model_files`) and ``oof_predictions.csv``. Each held-out evaluation of it is a folder
in ``<run>/heldout/`` with its own ``config.json``, ``metrics.json`` (the run's, with the ``test`` scores),
``model.json`` and ``test_predictions.csv``; every reader here takes either folder. (A run of featcache
before 0.4 holds its one held-out evaluation's files itself.) Each is written to a hidden temporary folder
and renamed, so it is either complete or absent.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import RunError
from featcache.store.entries import write_json_atomic
from featcache.store.model_files import MODEL_JSON, holds_only_pickle, save_model
from featcache.store.naming import GALLERY, HELDOUT, METRICS, trained_run

CONFIG = "config.json"
OOF = "oof_predictions.csv"
TEST = "test_predictions.csv"
TEST_UNALIGNED = "test_predictions_unaligned.csv"  # with --test-align: the model's as-trained predictions
MODEL_CARD = "MODEL_CARD.md"  # what the run is, its data, scores, subgroups and limits (evaluation/model_card.py)
TEST_NEIGHBOURS = "test_neighbours.csv"  # each test image's most similar training images (evaluation/neighbours.py)


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / METRICS).is_file()


def is_reusable(run_dir: Path) -> bool:
    """Finished, with a model saved without pickles: fit keeps it, and refits a run of featcache before
    0.3 whose model is a pickle."""
    return is_finished(run_dir) and not holds_only_pickle(run_dir)


@dataclass
class Predictions:
    """One prediction CSV: a row per image (and per seed for out-of-fold predictions)."""

    ids: list[str]
    labels: np.ndarray
    proba: np.ndarray
    classes: list[str]
    seeds: np.ndarray
    folds: np.ndarray
    groups: list[str]  # "" where the run had no groups
    sets: list[str] | None = None  # with --conformal: each row's prediction set, `a|b` (oof: seed 0's rows)

    def group_array(self, rows: np.ndarray) -> np.ndarray | None:
        """The groups of the selected rows, or None when the run was not grouped."""
        chosen = np.asarray(self.groups, dtype=object)[rows]
        return None if not any(chosen) else chosen.astype(str)


def write_run(run_dir: Path, config: dict, result: dict, model_payload: dict, classes: list[str],
              oof_rows: list, oof_sets: dict | None = None, card: str | None = None) -> None:
    """Write a whole run folder atomically. ``oof_rows``: (seed, fold, id, group, label, proba) tuples;
    ``oof_sets`` (with ``--conformal``): ``column`` (e.g. ``set_90``) and ``oof`` (one set per seed-0
    out-of-fold row, in order, judged as metrics.json's coverage was), each set written as ``a|b``; ``card``:
    the text of ``MODEL_CARD.md``.

    Probabilities are written in full (the shortest text that reads back as the same float), so every
    score in metrics.json can be recomputed from these files exactly. CSVs go through the csv module, so an
    id holding a comma, a quote or a newline comes back as it was."""
    with _atomic_folder(run_dir) as tmp:
        write_json_atomic(tmp / CONFIG, config)
        save_model(tmp, model_payload)
        set_column = [oof_sets["column"]] if oof_sets else []
        with open(tmp / OOF, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seed", "fold", "id", "group", "label", *(f"p_{c}" for c in classes), *set_column])
            chosen_sets = iter(oof_sets["oof"]) if oof_sets else None
            for seed, fold, image_id, group, label, proba in oof_rows:
                chosen = [next(chosen_sets) if seed == 0 else ""] if chosen_sets is not None else []
                writer.writerow([seed, fold, image_id, group or "", label, *map(_exact, proba), *chosen])
        _finish(tmp, result, card)


def write_heldout(heldout_dir: Path, config: dict, result: dict, facts: dict, classes: list[str],
                  test_rows: tuple, sets: dict | None = None, neighbours: tuple[list[str], list[list]] | None = None,
                  card: str | None = None) -> None:
    """Write one held-out evaluation of a run atomically, inside the run (see
    :func:`featcache.store.naming.heldout_path`): its config and metrics (the run's, with the held-out
    settings and the ``test`` scores), the model's facts for it (``facts``: with its test images' paths),
    ``test_predictions.csv`` and with ``--test-align`` ``test_predictions_unaligned.csv``, each held-out image's
    most similar training images and the model card. ``test_rows``: (ids, labels, proba) or (ids, labels,
    proba, unaligned proba); ``sets``: ``column`` and ``test`` (and ``test_unaligned``), one set per image."""
    with _atomic_folder(heldout_dir) as tmp:
        write_json_atomic(tmp / CONFIG, config)
        write_json_atomic(tmp / MODEL_JSON, facts)
        probability_columns = [f"p_{c}" for c in classes]
        set_column = [sets["column"]] if sets else []
        ids, labels, *probas = test_rows
        for name, key, proba_rows in zip((TEST, TEST_UNALIGNED), ("test", "test_unaligned"), probas, strict=False):
            chosen = sets[key] if sets else [None] * len(ids)
            with open(tmp / name, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["id", "label", *probability_columns, *set_column])
                for image_id, label, proba, one in zip(ids, labels, proba_rows, chosen, strict=True):
                    writer.writerow([image_id, label, *map(_exact, proba), *([one] if sets else [])])
        if neighbours is not None:
            columns, rows = neighbours
            with open(tmp / TEST_NEIGHBOURS, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                writer.writerows([*row[:5], _exact(row[5]), row[6]] for row in rows)
        _finish(tmp, result, card)


@contextlib.contextmanager
def _atomic_folder(folder: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``folder``, renamed to it when the block ends without an error, so a
    run (or evaluation) is either complete or absent."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise RunError(f"cannot write the run to {folder.parent} ({exc.strerror}); the features are readable "
                       "but runs are saved next to them: copy the cache to a writable folder and pass "
                       "--cache") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        kept = folder / HELDOUT  # a run fitted again keeps the evaluations of the run it replaces
        if kept.is_dir() and not (tmp / HELDOUT).exists():
            os.replace(kept, tmp / HELDOUT)
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _finish(tmp: Path, result: dict, card: str | None) -> None:
    if card is not None:
        (tmp / MODEL_CARD).write_text(card)
    write_json_atomic(tmp / METRICS, result)  # last: a folder is finished once it has this file


def _exact(value: float) -> str:
    """A probability as the shortest text that reads back as the same float (6 places lost ties and AUROC)."""
    return repr(float(value))


def read_metrics(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / METRICS).read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{run_dir}: no readable {METRICS} ({exc}); pass a run folder written by "
                       "`featcache fit`") from None


def read_predictions(run_dir: Path, which: str = "oof") -> Predictions:
    """A run's out-of-fold (``oof``) or held-out (``test``) predictions; ``test_unaligned``: the held-out
    predictions before ``--test-align``. A held-out evaluation's out-of-fold predictions are its run's."""
    folder = trained_run(run_dir) if which == "oof" else Path(run_dir)
    path = folder / {"oof": OOF, "test": TEST, "test_unaligned": TEST_UNALIGNED}[which]
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        lines = list(reader)
    first = 5 if which == "oof" else 2  # seed,fold,id,group,label,p_… or id,label,p_… (then set_NN)
    last = first + sum(1 for c in header[first:] if c.startswith("p_"))
    sets = next((k for k, c in enumerate(header) if c.startswith("set_")), None)
    return Predictions(
        ids=[line[2] if which == "oof" else line[0] for line in lines],
        labels=np.array([line[first - 1] for line in lines]),
        proba=np.array([[float(v) for v in line[first:last]] for line in lines]).reshape(len(lines), -1),
        classes=[c.removeprefix("p_") for c in header[first:last]],
        seeds=np.array([int(line[0]) if which == "oof" else 0 for line in lines], dtype=np.int64),
        folds=np.array([int(line[1]) if which == "oof" else 0 for line in lines], dtype=np.int64),
        groups=[line[3] if which == "oof" else "" for line in lines],
        sets=None if sets is None else [line[sets] for line in lines])


def has_test_predictions(run_dir: Path, unaligned: bool = False) -> bool:
    """Whether the run scored a held-out set (``unaligned``: and kept its predictions before --test-align)."""
    return (Path(run_dir) / (TEST_UNALIGNED if unaligned else TEST)).is_file()


def read_neighbours(run_dir: Path) -> list[dict] | None:
    """The held-out images' most similar training images (``test_neighbours.csv``), or None when absent."""
    path = Path(run_dir) / TEST_NEIGHBOURS
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_model_card(run_dir: Path) -> str | None:
    """The run's ``MODEL_CARD.md``, or None for a run made before featcache wrote one."""
    path = Path(run_dir) / MODEL_CARD
    return path.read_text() if path.is_file() else None


def update_run(run_dir: Path, result: dict, card: str | None = None) -> None:
    """Rewrite a finished run's metrics.json (and its model card) with what was added to ``result`` after it was
    written, each file replaced whole (a kill leaves the old file or the new one, never half of either)."""
    if card is not None:
        tmp = Path(run_dir) / f".{MODEL_CARD}.tmp-{os.getpid()}"
        tmp.write_text(card)
        os.replace(tmp, Path(run_dir) / MODEL_CARD)
    write_json_atomic(Path(run_dir) / METRICS, result)


GALLERY_RECORD = "gallery.json"


def write_gallery(run_dir: Path, record: dict, images: dict[str, bytes]) -> Path:
    """The gallery of a run or evaluation (``record``, and the image files it names), written whole: a kill leaves
    the old gallery or the new one."""
    folder = Path(run_dir) / GALLERY
    tmp = folder.with_name(f".{GALLERY}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, content in images.items():
            (tmp / name).write_bytes(content)
        (tmp / GALLERY_RECORD).write_text(json.dumps(record, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def read_gallery(run_dir: Path) -> tuple[dict, Path] | None:
    """The gallery ``write_gallery`` wrote for a run or evaluation (its record and its folder), or None."""
    folder = Path(run_dir) / GALLERY
    try:
        return json.loads((folder / GALLERY_RECORD).read_text()), folder
    except (OSError, ValueError):
        return None
