"""The gallery's evidence: for a run (or one held-out evaluation of it), the images a reviewer should look at, each
with the heatmap of its predicted class (:mod:`featcache.evaluation.explain`) and its most similar training
images, written into the run's folder (:func:`featcache.store.runs.write_gallery`). The report renders what is
written here; it loads no backbone.

The images: the most confident errors and the most uncertain images, out of fold (seed 0) and on the test set. An
out-of-fold image's similar cases are searched among the other training images, never itself or its own group; a
test image's are the ones fit wrote (``test_neighbours.csv``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError
from featcache.progress import Reporter

PER_KIND = 4  # images per kind (confident errors, uncertain) and part (out of fold, test)
NEIGHBOURS = 3
THUMB = 120  # pixels, the longer side of a map's thumbnail


def picks(labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> list[tuple[int, str]]:
    """Row indices to show, with why: the most confident errors (highest probability on a wrong class), then
    the most uncertain images (the smallest margin between the two likeliest classes)."""
    predicted = proba.argmax(axis=1)
    wrong = np.flatnonzero(np.asarray(classes)[predicted] != labels)
    confident = wrong[np.argsort(-proba[wrong].max(axis=1), kind="stable")][:PER_KIND]
    top2 = np.sort(proba, axis=1)[:, -2:]
    uncertain = [i for i in np.argsort(top2[:, 1] - top2[:, 0], kind="stable") if i not in set(confident)][:PER_KIND]
    return [(int(i), "confident error") for i in confident] + [(int(i), "uncertain") for i in uncertain]


def make_gallery(run_dir: Path, reporter: Reporter | None = None) -> dict:
    """Work out and write the gallery of ``run_dir``; its record (``reason`` says why a run has none)."""
    from featcache.store.fusion import FusedEntry, trained_entry
    from featcache.store.model_files import load_model
    from featcache.store.runs import write_gallery

    reporter = reporter or Reporter(quiet=True)
    try:
        saved = load_model(run_dir)
        entry = trained_entry(run_dir, saved)
    except FeatcacheError as exc:  # a run folder copied without its entry
        return _none(run_dir, str(exc))
    if isinstance(entry, FusedEntry) or saved["config"].get("meta_spec"):
        return _none(run_dir, "heatmaps take a run of one backbone without --meta.")
    if not saved.get("train_paths"):
        return _none(run_dir, "this run folder does not say where its images are (it predates featcache keeping "
                              "them); fit it again (--force) for one.")
    from featcache.evaluation.explain import method_for
    from featcache.extraction.extract import backbone_of

    try:
        model = backbone_of(entry)
    except (FeatcacheError, OSError, KeyError) as exc:
        return _none(run_dir, str(exc))
    images: dict[str, bytes] = {}
    method = method_for(saved)
    task = reporter.task(f"gallery of {Path(run_dir).name}", total=2 * 2 * PER_KIND, unit="image")
    try:
        parts = [{"title": "Out of fold", "items": _oof_items(run_dir, saved, entry, model, method, images, task)}]
        test = _test_items(run_dir, saved, model, method, images, task)
        if test is not None:
            parts.append(test)
    finally:
        task.close()
    record = {"method": method, "parts": parts}
    write_gallery(run_dir, record, images)
    return record


def _none(run_dir: Path, reason: str) -> dict:
    from featcache.store.runs import write_gallery

    record = {"reason": reason}
    write_gallery(run_dir, record, {})
    return record


def _item(model, saved: dict, path: Path, image_id: str, label: str, proba_row: np.ndarray, why: str,  # noqa: ANN001
          similar: list, method: str, images: dict[str, bytes]) -> dict:
    """One image of the gallery: its prediction, the thumbnail of its map (written into ``images``), its cases."""
    from featcache.evaluation.explain import explain_image, heat_rgb

    predicted = saved["config"]["classes"][int(np.argmax(proba_row))]
    heat = explain_image(model, saved, path, predicted, method)
    photo = photo_rgb(path)
    under = np.where(np.isnan(heat)[..., None], photo * 0.35, 0.4 * photo + 0.6 * heat_rgb(heat))
    name = f"{len(images)}-map.jpg"
    images[name] = thumbnail_jpeg(under)
    return {"id": image_id, "path": str(path), "label": str(label), "predicted": predicted,
            "confidence": float(proba_row.max()), "why": why, "map": name,
            "similar": [list(case) for case in similar]}


def _oof_items(run_dir: Path, saved: dict, entry, model, method: str, images: dict, task) -> list[dict]:  # noqa: ANN001
    from featcache.evaluation.neighbours import nearest, run_space
    from featcache.store.runs import read_predictions

    paths = {i: Path(p) for i, p in zip(saved["train_ids"], saved["train_paths"], strict=True)}
    train_ids = saved.get("train_ids") or []
    labels = dict(zip(train_ids, saved.get("train_labels") or [], strict=False))
    groups = dict(zip(train_ids, saved.get("train_groups") or [""] * len(train_ids), strict=False))
    space = run_space(saved["pipeline"])
    Z = space.transform(entry.read(saved["pool"], train_ids)) if train_ids else None
    oof = read_predictions(run_dir)
    first = oof.seeds == oof.seeds.min()
    ids = [i for i, k in zip(oof.ids, first, strict=True) if k]
    items = []
    for row, why in picks(oof.labels[first], oof.proba[first], oof.classes):
        image_id = ids[row]
        if image_id not in paths:
            continue
        similar = []
        if Z is not None and image_id in labels:  # among the other training images, never its own group
            q = space.transform(entry.read(saved["pool"], [image_id]))
            order, sims = nearest(Z, q, NEIGHBOURS + 20)
            own = groups.get(image_id) or None
            similar = [(train_ids[j], labels[train_ids[j]], float(s), str(paths.get(train_ids[j], "")))
                       for j, s in zip(order[0], sims[0], strict=True)
                       if train_ids[j] != image_id and (own is None or groups.get(train_ids[j]) != own)][:NEIGHBOURS]
        items.append(_item(model, saved, paths[image_id], image_id, oof.labels[first][row], oof.proba[first][row],
                           why, similar, method, images))
        task.advance(1)
    return items


def _test_items(run_dir: Path, saved: dict, model, method: str, images: dict, task) -> dict | None:  # noqa: ANN001
    """The test part of an evaluation's gallery, with the similar cases fit wrote; None without a test set."""
    from featcache.store.runs import has_test_predictions, read_metrics, read_neighbours, read_predictions

    name = read_metrics(run_dir)["config"].get("test_dataset")
    if not has_test_predictions(run_dir) or not name:
        return None
    train_paths = dict(zip(saved["train_ids"], saved["train_paths"], strict=True))
    test_paths = {i: Path(p) for i, p in (saved.get("test_paths") or {}).items()}
    test = read_predictions(run_dir, "test")
    near: dict[str, list] = {}
    for row in read_neighbours(run_dir) or []:
        near.setdefault(row["id"], []).append((row["neighbour"], row["label"], float(row["similarity"]),
                                               str(train_paths.get(row["neighbour"], ""))))
    items = []
    for row, why in picks(test.labels, test.proba, test.classes):
        image_id = test.ids[row]
        if image_id in test_paths:
            items.append(_item(model, saved, test_paths[image_id], image_id, test.labels[row], test.proba[row], why,
                               near.get(image_id, [])[:NEIGHBOURS], method, images))
            task.advance(1)
    return {"title": f"Test set ({name})", "items": items}


def photo_rgb(path: Path) -> np.ndarray:
    """The photo at ``path`` as RGB floats (height x width x 3, 0-255)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def thumbnail_jpeg(rgb: np.ndarray) -> bytes:
    """``rgb`` as a small JPEG (:data:`THUMB` pixels on its longer side), as the gallery shows it."""
    from PIL import Image

    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=72)
    return buffer.getvalue()
