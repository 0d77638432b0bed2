"""What is left to extract: images not in an entry yet, or whose file changed since."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from featcache.data.sources import ImageRecord, ImageSource, file_state, read_record
from featcache.store.entries import MANIFEST, CacheEntry


def read_item(record: ImageRecord, index: int, prepare: Callable[[bytes | np.ndarray], Any], npz_cache: dict) -> dict:
    """One image read for extraction: its file state, SHA-256 and ``prepare``d pixels (``image``), or the
    reason it has none (``error``: missing, unreadable, not an image)."""
    size, mtime = file_state(record)
    item = {"index": index, "size": size, "mtime": mtime, "sha": "", "image": None, "error": None}
    if size < 0:
        item["error"] = f"file not found: {record.path}"
        return item
    try:
        content, item["sha"] = read_record(record, npz_cache)
        item["image"] = prepare(content)
    except (ValueError, OSError, KeyError) as exc:
        item["error"] = f"{exc} ({record.path})"
    return item


def images_to_extract(source: ImageSource, entry_dir: Path, rehash: bool = False) -> tuple[list[ImageRecord], int]:
    """Records still to extract: not in the store, or whose file changed since it was stored (by size and
    modification time, or with ``rehash`` by content: a file rewritten in place can keep both)."""
    if not (entry_dir / MANIFEST).exists():
        return list(source.records), 0
    state = CacheEntry(entry_dir).state()
    todo, npz_cache = [], {}
    for record in source.records:
        known = state.get(record.id)
        if known is None:
            todo.append(record)
            continue
        if (known.size, known.mtime_ns) == file_state(record) and not rehash:
            continue
        try:  # touched but maybe unchanged (copied, re-saved): compare the content hash
            unchanged = read_record(record, npz_cache)[1] == known.sha256
        except (OSError, ValueError, KeyError):
            unchanged = False
        if not unchanged:
            todo.append(record)
    return todo, len(source.records) - len(todo)


def failed_before(source: ImageSource, entry_dir: Path, todo: list[ImageRecord]) -> int:
    """How many of the records that :func:`plan` does not redo failed when they were extracted (unreadable,
    not an image): they count as done, but have no features."""
    if not (entry_dir / MANIFEST).exists():
        return 0
    state, redo = CacheEntry(entry_dir).state(), {r.id for r in todo}
    return sum(1 for r in source.records if r.id not in redo and r.id in state and state[r.id].failed is not None)


def cached_line(source: ImageSource, entry_dir: Path, todo: list[ImageRecord]) -> str:
    """``38 of 40 images cached, 1 failed at extraction (see `featcache verify`), 1 to extract``: what the
    cache holds for ``source``, the failed images counted apart from the cached ones."""
    failed = failed_before(source, entry_dir, todo)
    total = len(source.records)
    parts = [f"{total - len(todo) - failed} of {total} images cached"]
    if failed:
        parts.append(f"{failed} failed at extraction (unreadable or not an image; `featcache verify` lists them)")
    if todo:
        parts.append(f"{len(todo)} to extract")
    return ", ".join(parts)
