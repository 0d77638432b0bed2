"""Features copied, not recomputed: an image whose file already has features under the same fingerprint
in another entry of the cache (a moved, relabelled or subset CSV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.data.sources import ImageRecord, file_state, read_record
from featcache.errors import CacheError
from featcache.extraction.writer import ShardSink
from featcache.progress import Reporter
from featcache.store.entries import MANIFEST, CacheEntry
from featcache.store.naming import cache_root_of_entry


def reuse_known_images(todo: list[ImageRecord], entry_dir: Path, manifest: dict, dims: dict[str, int],
                       shard_size: int, reporter: Reporter) -> tuple[list[ImageRecord], int]:
    """Commit, without running the backbone, the images of ``todo`` whose file (same SHA-256) already
    has features under the same fingerprint in another entry of the cache (another dataset name: a
    moved, relabelled or subset CSV). Returns the images still to extract and how many were reused.
    The features are copied byte for byte, so they equal a fresh extraction's."""
    paths = [p for p in sorted(cache_root_of_entry(entry_dir).glob(f"*/*-{manifest['fingerprint']}"))
             if p != entry_dir and (p / MANIFEST).is_file()]
    if not todo or not paths:
        return todo, 0
    known: dict[str, tuple[CacheEntry, str]] = {}
    for path in paths:
        try:  # a damaged entry is never copied from: its images are extracted afresh instead
            other = CacheEntry(path)
            for image_id, state in other.state().items():
                if state.failed is None:
                    known.setdefault(state.sha256, (other, image_id))
        except CacheError as exc:
            reporter.warn(f"not reusing features from {path}: {exc}")
    hits, rest, npz_cache = [], [], {}
    for record in todo:
        try:
            sha = read_record(record, npz_cache)[1]
        except (OSError, ValueError, KeyError):  # the extraction itself reports unreadable files
            rest.append(record)
            continue
        if sha in known:
            hits.append((record, sha, *known[sha]))
        else:
            rest.append(record)
    if not hits:
        return todo, 0
    sink = ShardSink(entry_dir, manifest, dims, shard_size)
    damaged: set[Path] = set()
    for start in range(0, len(hits), shard_size):
        chunk = [h for h in hits[start:start + shard_size] if h[2].path not in damaged]
        features: dict[tuple[Path, str], dict[str, np.ndarray]] = {}
        for other in {id(h[2]): h[2] for h in chunk}.values():
            wanted = [h[3] for h in chunk if h[2] is other]
            try:  # every shard read is checked against its checksum: damaged values are never copied
                arrays = {p: other.read(p, wanted, dtype=manifest["dtype"]) for p in sink.pools}
            except CacheError as exc:
                reporter.warn(f"not reusing features from {other.path}: {exc}")
                damaged.add(other.path)
                continue
            for k, image_id in enumerate(wanted):
                features[(other.path, image_id)] = {p: arrays[p][k] for p in sink.pools}
        chunk = [h for h in chunk if h[2].path not in damaged]
        for record, sha, other, image_id in chunk:
            size, mtime = file_state(record)
            sink.add(record.id, sha, size, mtime, features[(other.path, image_id)])
        sink.commit()
    rest += [h[0] for h in hits if h[2].path in damaged]
    hits = [h for h in hits if h[2].path not in damaged]
    if hits:
        sources = ", ".join(sorted({h[2].path.parent.name for h in hits}))
        reporter.info(f"{len(hits)} images reused from other entries with the same fingerprint ({sources}): "
                      "same file contents, features copied, not recomputed")
    return rest, len(hits)
