"""Committing features: shards written whole, the manifest, stop signals that keep what was committed."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.data.sources import ImageRecord, ImageSource
from featcache.errors import CacheError, FeatcacheError
from featcache.progress import Reporter
from featcache.store.entries import (
    ENTRY_KEYS,
    MANIFEST,
    SHARD_GLOB,
    CacheEntry,
    ShardRows,
    shard_summary,
    write_json_atomic,
    write_shard,
)

# what a manifest says of its entry whatever the dataset: the fingerprint and what made it (the rest of a
# manifest names the dataset and sums up the shards)
ENTRY_DESCRIPTION = ("fingerprint", "fingerprint_inputs", "format_version", "backbone", "pools", "dims", "dtype",
                     "provenance", "views")


class ExtractionInterrupted(FeatcacheError):
    """Ctrl-C / SIGTERM: committed shards are kept; a rerun resumes."""


def interrupted(committed: int, entry_dir: Path) -> ExtractionInterrupted:
    """The one message of a single-entry extraction stopped by Ctrl-C or SIGTERM (full and lean paths)."""
    return ExtractionInterrupted(f"Interrupted: {committed} new images were committed to {entry_dir}; rerun the "
                                 "same command to resume from there")


@contextmanager
def disk_errors(entry_dir: Path) -> Iterator[None]:
    """Disk full, drive gone, quota: one line, and what was committed stays valid."""
    try:
        yield
    except OSError as exc:
        raise CacheError(
            f"writing to {entry_dir} failed ({exc}); shards committed before the failure are "
            "kept: free space or fix the drive, then rerun the same command to resume") from None


def _writable(entry_dir: Path) -> bool:
    """Whether the entry (or the nearest folder that exists above it) can be written."""
    try:
        entry_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    existing = next(p for p in (entry_dir, *entry_dir.parents) if p.exists())
    return os.access(existing, os.W_OK)


def _write_manifest(entry_dir: Path, manifest: dict, source: ImageSource, complete: bool) -> CacheEntry:
    listed = {r.id for r in source.records}
    payload = {**manifest, "complete": complete}
    if (entry_dir / MANIFEST).exists():
        entry = CacheEntry(entry_dir)
        payload |= shard_summary(entry)
        payload["complete"] = complete and listed <= set(entry.state())
    write_json_atomic(entry_dir / MANIFEST, payload)
    return CacheEntry(entry_dir)


class _StopRequested:
    """SIGTERM behaves like Ctrl-C: stop after the current batch, keep what was committed."""

    def __enter__(self) -> _StopRequested:
        self._old = signal.getsignal(signal.SIGTERM)
        if _in_main_thread():
            signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(*_: object) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if _in_main_thread():
            signal.signal(signal.SIGTERM, self._old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class ShardSink:
    """Collects rows in source order and commits them as shards of ``shard_size`` (the unit of
    resume), numbered after the entry's existing shards."""

    def __init__(self, entry_dir: Path, manifest: dict, dims: dict[str, int], shard_size: int):
        self.entry_dir, self.dims, self.shard_size = entry_dir, dims, shard_size
        self.dtype, self.pools, self.views = manifest["dtype"], tuple(manifest["pools"]), len(manifest["views"])
        self.attrs = {"fingerprint": manifest["fingerprint"], "format_version": 1,
                      "provenance": manifest["provenance"], "backbone": manifest["backbone"],
                      "entry": {k: manifest[k] for k in ENTRY_KEYS}}
        existing = sorted(entry_dir.glob(SHARD_GLOB))
        self.next_shard = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.rows = ShardRows(self.pools, self.views)

    @property
    def pending(self) -> int:
        """Extracted rows not committed yet."""
        return len(self.rows.ids)

    def add(self, image_id: str, sha: str, size: int, mtime: int, feats: dict[str, np.ndarray]) -> None:
        self.rows.add(image_id, sha, size, mtime, feats)

    def add_failed(self, image_id: str, sha: str, size: int, mtime: int, reason: str) -> None:
        self.rows.add_failed(image_id, sha, size, mtime, reason)

    def commit_full(self) -> None:
        if len(self.rows) >= self.shard_size:
            self.commit()

    def commit(self) -> None:
        if len(self.rows):
            write_shard(self.entry_dir, self.next_shard, self.rows, self.dims, self.dtype, self.attrs)
            self.next_shard, self.rows = self.next_shard + 1, ShardRows(self.pools, self.views)


def commit_items(records: list[ImageRecord], items: list[dict], feats: dict[str, np.ndarray], sink: ShardSink,
                 dtype: str, reporter: Reporter) -> int:
    """Add a batch to ``sink``: each item's features (rows of ``feats`` follow the items that decoded, in
    order), or the reason it has none (unreadable, or non-finite features). Returns how many were added."""
    feats = {p: feats[p].astype(dtype) for p in sink.pools} if feats else {}  # float16 may overflow
    added = n = 0
    for record, item in zip(records, items, strict=True):
        args = (record.id, item["sha"], item["size"], item["mtime"])
        if item["error"]:
            reporter.warn(f"skipped {record.id}: {item['error']}")
            sink.add_failed(*args, item["error"])
            continue
        row = {p: feats[p][n] for p in sink.pools}
        n += 1
        if not all(np.isfinite(v).all() for v in row.values()):
            reason = f"non-finite features (NaN/Inf) for {record.path}"
            reporter.warn(f"skipped {record.id}: {reason}")
            sink.add_failed(*args, reason)
            continue
        sink.add(*args, row)
        added += 1
    return added


@dataclass(frozen=True)
class Batch:
    """What an extraction driver hands the commit loop: a batch's ``records`` and their ``items`` (file state,
    SHA-256, error), the ``features`` of those that decoded (a row each, in order), which sink (``entry``, in
    the order given to :func:`commit_batches`) they go to, and how many images the progress moves on after it."""

    records: list[ImageRecord]
    items: list[dict]
    features: dict[str, np.ndarray]
    advance: int
    entry: int = 0


def commit_batches(batches: Iterable[Batch], sinks: Sequence[ShardSink], reporter: Reporter, description: str,
                   total: int, on_interrupt: Callable[[], None] | None = None) -> list[int]:
    """The one commit loop of extraction: every driver (one backbone, several from one decode, the lean path on
    an exported engine, Ray) yields :class:`Batch` es, and each is committed here to its entry's shard sink, a
    shard written whenever one is full and the rest at the end. Ctrl-C or SIGTERM stops after the batch in hand:
    what was committed is kept and said (``on_interrupt`` runs first: a driver's workers quieted), and the same
    command resumes. Returns how many new images each sink took."""
    extracted = [0] * len(sinks)
    task = reporter.task(description, total=total)
    try:
        with _StopRequested():
            for batch in batches:
                sink = sinks[batch.entry]
                extracted[batch.entry] += commit_items(batch.records, batch.items, batch.features, sink, sink.dtype,
                                                       reporter)
                sink.commit_full()
                task.advance(batch.advance)
            for sink in sinks:
                sink.commit()
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        committed = [count - sink.pending for count, sink in zip(extracted, sinks, strict=True)]
        if len(sinks) == 1:
            raise interrupted(committed[0], sinks[0].entry_dir) from None
        done = ", ".join(f"{sink.attrs['backbone']} {count}" for sink, count in zip(sinks, committed, strict=True))
        raise ExtractionInterrupted(f"Interrupted: new images committed per backbone: {done}; rerun the same "
                                    "command to resume each entry from there") from None
    finally:
        task.close()
    return extracted

