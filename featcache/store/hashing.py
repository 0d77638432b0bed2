"""The one way featcache names things by their content: cache entries, runs and data tables.

Every name is a SHA-256 of a canonical JSON text (keys sorted), so the same inputs always give the
same name and any change to them gives another (the Hugging Face datasets fingerprint idea).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np


def canonical_json(payload: object) -> str:
    """The text that is hashed: JSON with sorted keys (the default separators keep old names valid)."""
    return json.dumps(payload, sort_keys=True, default=_plain)


def stable_hash(payload: object, length: int = 64) -> str:
    """Hex SHA-256 of :func:`canonical_json` of ``payload``, cut to ``length`` characters."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:length]


def rows_hash(rows: Iterable[Iterable[object]]) -> str:
    """SHA-256 of a table given row by row; each row is hashed as a JSON list, so a comma or a
    newline inside a value can never make two different tables hash alike."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(list(row), default=_plain).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def bytes_hash(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes in C order (a shard's feature checksum)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
