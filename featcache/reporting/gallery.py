"""The report's gallery: the images a reviewer should look at, with their evidence and their similar cases.

For a leading run: its most confident errors and its most uncertain images, out of fold and on the test set,
each as a thumbnail, the thumbnail under its heatmap (:mod:`featcache.evaluation.explain`) and its three most
similar training images with their labels (an out-of-fold image's are searched among the other training
images, never itself or its own group). Thumbnails are small JPEGs inside the page; the gallery stops where
the page would pass its size limit (5 MB by default, ``--max-mb`` for more) and says so.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from featcache.errors import FeatcacheError

PER_KIND = 4  # images per kind (confident errors, uncertain) and part (out of fold, test)
NEIGHBOURS = 3
THUMB = 120  # pixels, the longer side


def _jpeg(rgb: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=72)
    return base64.b64encode(buffer.getvalue()).decode()


def _photo(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def _img(data: str, alt: str) -> str:
    return f'<img class="thumb" alt="{html.escape(alt)}" src="data:image/jpeg;base64,{data}">'


def picks(labels: np.ndarray, proba: np.ndarray, classes: list[str]) -> list[tuple[int, str]]:
    """Row indices to show, with why: the most confident errors (highest probability on a wrong class), then
    the most uncertain images (the smallest margin between the two likeliest classes)."""
    predicted = proba.argmax(axis=1)
    wrong = np.flatnonzero(np.asarray(classes)[predicted] != labels)
    confident = wrong[np.argsort(-proba[wrong].max(axis=1), kind="stable")][:PER_KIND]
    top2 = np.sort(proba, axis=1)[:, -2:]
    uncertain = [i for i in np.argsort(top2[:, 1] - top2[:, 0], kind="stable") if i not in set(confident)][:PER_KIND]
    return [(int(i), "confident error") for i in confident] + [(int(i), "uncertain") for i in uncertain]


def _test_items(run_dir: Path, saved: dict, item: Callable) -> tuple[list[str], bool]:
    """The gallery's test images (what ``item`` makes of each, with the similar cases fit wrote for it), and
    whether the page's size limit cut them short."""
    from featcache.store.runs import read_neighbours, read_predictions

    test_paths = {i: Path(p) for i, p in (saved.get("test_paths") or {}).items()}
    test = read_predictions(run_dir, "test")
    near = {}
    for row in read_neighbours(run_dir) or []:
        near.setdefault(row["id"], []).append((row["neighbour"], row["label"], float(row["similarity"])))
    shown = []
    for row, why in picks(test.labels, test.proba, test.classes):
        image_id = test.ids[row]
        if image_id not in test_paths:
            continue
        html_item = item(test_paths[image_id], image_id, test.labels[row], test.proba[row], why,
                         near.get(image_id, [])[:NEIGHBOURS])
        if html_item is None:
            return shown, True
        shown.append(html_item)
    return shown, False


def gallery_section(run_dir: Path, budget_bytes: int) -> tuple[str, int]:
    """The gallery of the run in ``run_dir`` as HTML and the bytes its images take (at most ``budget_bytes``)."""
    from featcache.evaluation.explain import explain_image, heat_rgb, method_for
    from featcache.evaluation.neighbours import nearest, run_space
    from featcache.extraction.extract import backbone_of
    from featcache.store.fusion import FusedEntry, trained_entry
    from featcache.store.model_files import load_model
    from featcache.store.runs import has_test_predictions, read_metrics, read_predictions

    try:
        saved = load_model(run_dir)
        entry = trained_entry(run_dir, saved)
    except FeatcacheError as exc:  # a run folder copied without its entry
        return (f"<p class='muted'>No gallery: {html.escape(str(exc))}</p>", 0)
    if isinstance(entry, FusedEntry) or saved["config"].get("meta_spec"):
        return ("<p class='muted'>No gallery: heatmaps take a run of one backbone without --meta.</p>", 0)
    if not saved.get("train_paths"):
        return ("<p class='muted'>No gallery: this run folder does not say where its images are (it predates "
                "featcache keeping them); fit it again (--force) for one.</p>", 0)
    try:
        model = backbone_of(entry)
    except (FeatcacheError, OSError, KeyError) as exc:
        return (f"<p class='muted'>No gallery: {html.escape(str(exc))}</p>", 0)
    paths = {i: Path(p) for i, p in zip(saved["train_ids"], saved["train_paths"], strict=True)}
    config = read_metrics(run_dir)["config"]
    method = method_for(saved)
    train_ids = saved.get("train_ids") or []
    labels = dict(zip(train_ids, saved.get("train_labels") or [], strict=False))
    groups = dict(zip(train_ids, saved.get("train_groups") or [""] * len(train_ids), strict=False))
    space = run_space(saved["pipeline"])
    Z = space.transform(entry.read(saved["pool"], train_ids)) if train_ids else None
    parts, spent, cut = [], 0, False

    def item(path: Path, image_id: str, label: str, proba_row: np.ndarray, why: str,
             similar: list[tuple[str, str, float]]) -> str | None:
        nonlocal spent
        predicted = config["classes"][int(np.argmax(proba_row))]
        heat = explain_image(model, saved, path, predicted, method)
        photo = _photo(path)
        under = np.where(np.isnan(heat)[..., None], photo * 0.35, 0.4 * photo + 0.6 * heat_rgb(heat))
        images = [_jpeg(photo), _jpeg(under)]
        cases = []
        for other, other_label, similarity in similar:
            if other in paths:
                images.append(_jpeg(_photo(paths[other])))
                cases.append(f"<figure>{_img(images[-1], other)}<figcaption>{html.escape(other_label)} "
                             f"({similarity:.2f})</figcaption></figure>")
        size = sum(len(i) for i in images)
        if spent + size > budget_bytes:
            return None
        spent += size
        return (f"<div class='case'><figure>{_img(images[0], image_id)}<figcaption>{html.escape(why)}: true "
                f"{html.escape(label)}, predicted {html.escape(predicted)} ({proba_row.max():.2f})"
                "</figcaption></figure>"
                f"<figure>{_img(images[1], 'heatmap ' + image_id)}<figcaption>evidence for {html.escape(predicted)} "
                f"({method})</figcaption></figure>{''.join(cases)}</div>")

    oof = read_predictions(run_dir)
    first = oof.seeds == oof.seeds.min()
    ids = [i for i, k in zip(oof.ids, first, strict=True) if k]
    chosen = picks(oof.labels[first], oof.proba[first], oof.classes)
    shown = []
    for row, why in chosen:
        image_id = ids[row]
        similar = []
        if Z is not None and image_id in labels:  # among the other training images, never its own group
            q = space.transform(entry.read(saved["pool"], [image_id]))
            order, sims = nearest(Z, q, NEIGHBOURS + 20)
            own = groups.get(image_id) or None
            similar = [(train_ids[j], labels[train_ids[j]], float(s)) for j, s in zip(order[0], sims[0], strict=True)
                       if train_ids[j] != image_id and (own is None or groups.get(train_ids[j]) != own)][:NEIGHBOURS]
        html_item = item(paths[image_id], image_id, oof.labels[first][row], oof.proba[first][row], why, similar) \
            if image_id in paths else None
        if html_item is None and image_id in paths:
            cut = True
            break
        if html_item:
            shown.append(html_item)
    parts.append(f"<h4>Out of fold</h4>{''.join(shown) or '<p class=muted>no images to show</p>'}")
    if has_test_predictions(run_dir) and not cut and config.get("test_dataset"):
        shown, cut = _test_items(run_dir, saved, item)
        parts.append(f"<h4>Test set ({html.escape(config['test_dataset'])})</h4>"
                     f"{''.join(shown) or '<p class=muted>no images to show</p>'}")
    if cut:
        parts.append("<p class='warn'>The gallery stops here: more images would pass the page's size limit "
                     "(featcache report --max-mb for more).</p>")
    intro = ("<p class='muted'>Each row: the image, the image under its heatmap, and its most similar training "
             "images with their labels and cosine similarity in the run's space.</p>")
    return "<h4>Gallery</h4>" + intro + "".join(parts), spent
