"""``audit.html``: one self-contained page with a thumbnail of every suspect, its given and suggested label."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from featcache.data.sources import ImageSource
from featcache.errors import CacheError
from featcache.evaluation.dataset_audit import DatasetAudit

SHOWN = 60  # suspects shown with a thumbnail per section (every one is in the CSV files)


def _thumbnail(path: Path | None, size: int = 112) -> str:
    if path is None:
        return "–"
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError) as exc:
        return f"(cannot show: {html.escape(str(exc)[:80])})"
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/jpeg;base64,{data}">'


def write_audit_page(audit: DatasetAudit, source: ImageSource, path: Path) -> Path:
    paths = {r.id: r.path for r in source.records}
    sections = []
    for title, rows, columns in (
            ("Suspected label errors (most suspect first)", audit.label_issues, ("given", "suggested", "score")),
            ("Identical and near-identical images", audit.duplicates, ("other", "similarity", "identical")),
            ("Outliers (farthest from the other folds' images)", audit.outliers, ("label", "distance"))):
        head = "".join(f"<th>{c}</th>" for c in ("image", "id", *columns))
        body = "".join("<tr><td>" + _thumbnail(paths.get(row["id"])) + f"</td><td>{html.escape(str(row['id']))}</td>"
                       + "".join(f"<td>{html.escape(str(row[c]))}</td>" for c in columns) + "</tr>"
                       for row in rows[:SHOWN])
        more = f"<p>{len(rows) - SHOWN} more in the CSV file.</p>" if len(rows) > SHOWN else ""
        sections.append(f"<h2>{title}: {len(rows)}</h2><table><tr>{head}</tr>{body}</table>{more}")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>featcache audit</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}</style></head><body>"
            f"<h1>featcache audit: {html.escape(source.name)} ({audit.n_images} images)</h1>{''.join(sections)}"
            "</body></html>")
    try:
        path.write_text(page)
    except OSError as exc:
        raise CacheError(f"cannot write {path} ({exc.strerror or exc}); pass --out with a writable folder") from None
    return path
