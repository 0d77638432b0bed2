"""The report's gallery: the images a reviewer should look at, with their evidence and their similar cases.

For a leading run: its most confident errors and its most uncertain images, out of fold and on the test set,
each as a thumbnail, the thumbnail under its heatmap and its three most similar training images with their
labels. What is shown is what the gallery's evidence wrote into the run's folder
(:mod:`featcache.evaluation.gallery`, made by the report workflow before the page); this module renders it and
loads no backbone. Thumbnails are small JPEGs inside the page; the gallery stops where the page would pass its
size limit (5 MB by default, ``--max-mb`` for more) and says so.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from featcache.evaluation.gallery import photo_rgb, thumbnail_jpeg


def _photo_jpeg(path: Path) -> str | None:
    """The photo's thumbnail, base64 for the page; None when it cannot be read any more (shown without it)."""
    try:
        return base64.b64encode(thumbnail_jpeg(photo_rgb(path))).decode()
    except OSError:
        return None


def _img(data: str, alt: str) -> str:
    return f'<img class="thumb" alt="{html.escape(alt)}" src="data:image/jpeg;base64,{data}">'


def _case(item: dict, folder: Path, method: str) -> tuple[str, int] | None:
    """One image's row and the bytes its images take; None when its photo cannot be read any more."""
    photo = _photo_jpeg(Path(item["path"]))
    if photo is None:
        return None
    under = base64.b64encode((folder / item["map"]).read_bytes()).decode()
    images, cases = [photo, under], []
    for other, other_label, similarity, path in item["similar"]:
        thumb = _photo_jpeg(Path(path)) if path else None
        if thumb is not None:
            images.append(thumb)
            cases.append(f"<figure>{_img(thumb, other)}<figcaption>{html.escape(other_label)} "
                         f"({similarity:.2f})</figcaption></figure>")
    predicted, image_id = item["predicted"], item["id"]
    return (f"<div class='case'><figure>{_img(photo, image_id)}<figcaption>{html.escape(item['why'])}: true "
            f"{html.escape(item['label'])}, predicted {html.escape(predicted)} ({item['confidence']:.2f})"
            "</figcaption></figure>"
            f"<figure>{_img(under, 'heatmap ' + image_id)}<figcaption>evidence for {html.escape(predicted)} "
            f"({method})</figcaption></figure>{''.join(cases)}</div>", sum(len(i) for i in images))


def gallery_section(run_dir: Path, budget_bytes: int) -> tuple[str, int]:
    """The gallery of the run in ``run_dir`` as HTML and the bytes its images take (at most ``budget_bytes``)."""
    from featcache.store.runs import read_gallery

    found = read_gallery(run_dir)
    if found is None:
        return ("<p class='muted'>No gallery: none was made for this run (`featcache report` makes the galleries "
                "of the runs it shows).</p>", 0)
    record, folder = found
    if record.get("reason"):
        return f"<p class='muted'>No gallery: {html.escape(record['reason'])}</p>", 0
    parts, spent, cut = [], 0, False
    for part in record["parts"]:
        shown = []
        for item in part["items"]:
            case = _case(item, folder, record["method"])
            if case is None:
                continue
            if spent + case[1] > budget_bytes:
                cut = True
                break
            spent += case[1]
            shown.append(case[0])
        parts.append(f"<h4>{html.escape(part['title'])}</h4>"
                     f"{''.join(shown) or '<p class=muted>no images to show</p>'}")
        if cut:
            break
    if cut:
        parts.append("<p class='warn'>The gallery stops here: more images would pass the page's size limit "
                     "(featcache report --max-mb for more).</p>")
    intro = ("<p class='muted'>Each row: the image, the image under its heatmap, and its most similar training "
             "images with their labels and cosine similarity in the run's space.</p>")
    return "<h4>Gallery</h4>" + intro + "".join(parts), spent
