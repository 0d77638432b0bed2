"""Backbone fusion: heads that see the features of several backbones of the same images at once.

``fit --backbone a+b`` reads each backbone's entry of the same source, aligns the rows by image id
(and the views by view), and concatenates the features; the pipeline's per-fold StandardScaler then
standardizes every column, so each backbone's block is standardized as if on its own. Runs are kept
with the first backbone's entry and named by the fingerprints and poolings of all parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import CacheError, RunError
from featcache.store.entries import CacheEntry, ImageState
from featcache.store.naming import cache_root_of_run, entry_of_run, fused_fingerprint


@dataclass
class FusedEntry:
    """Entries of the same images read as one: ``read`` concatenates each part's pooling."""

    parts: list[tuple[CacheEntry, str]]  # (entry, pooling), in the order given

    def __post_init__(self) -> None:
        views = {entry.views for entry, _ in self.parts}
        if len(views) > 1:
            names = ", ".join(f"{e.manifest['backbone']} ({e.views})" for e, _ in self.parts)
            raise RunError(f"--backbone {self.backbone}: the entries have different numbers of views ({names}); "
                           "extract them with the same --views")

    @property
    def backbone(self) -> str:
        return "+".join(entry.manifest["backbone"] for entry, _ in self.parts)

    @property
    def pool(self) -> str:
        return "+".join(pool for _, pool in self.parts)

    @property
    def path(self) -> Path:
        return self.parts[0][0].path

    @property
    def fingerprint(self) -> str:
        return fused_fingerprint([(entry.fingerprint, pool) for entry, pool in self.parts])

    @property
    def manifest(self) -> dict:
        first = self.parts[0][0].manifest
        return {**first, "backbone": self.backbone, "fingerprint": self.fingerprint,
                "parts": [{"entry": str(e.path), "pool": p, "fingerprint": e.fingerprint} for e, p in self.parts]}

    @property
    def views(self) -> int:
        return self.parts[0][0].views

    @property
    def failed(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for entry, _ in self.parts:
            out.update(entry.failed)
        return out

    def state(self) -> dict[str, ImageState]:
        return self.parts[0][0].state()

    def read(self, pool: str | None = None, ids: list[str] | None = None, dtype: str = "float32") -> np.ndarray:
        """Every part's features of ``ids`` side by side (``pool`` is ignored: each part has its own)."""
        ids = self.parts[0][0].ids if ids is None else ids
        return np.concatenate([entry.read(part_pool, ids, dtype) for entry, part_pool in self.parts], axis=-1)


def fused_from_manifest(parts: list[dict], cache_root: Path) -> FusedEntry:
    """A fused entry again from what a saved run recorded (``manifest()["parts"]``): each part's entry is found
    by its dataset and entry folder names in the run's own ``cache_root`` (the path recorded may be relative to
    where the fit ran, or the cache may have moved), and must still hold the features of the fingerprint recorded."""
    found = []
    for part in parts:
        recorded = Path(part["entry"])
        entry = CacheEntry(cache_root / recorded.parent.name / recorded.name)
        if part.get("fingerprint") and entry.fingerprint != part["fingerprint"]:
            raise CacheError(f"{entry.path}: holds features {entry.fingerprint}, but this fused run was fit on "
                             f"{part['fingerprint']}; fit the run again")
        found.append((entry, part["pool"]))
    return FusedEntry(found)


def trained_entry(run_dir: Path, saved: dict) -> CacheEntry | FusedEntry:
    """The features a saved run (``saved``: its model file's payload) was fit on: the entry it was written
    into, or for a fused run every backbone's entry and pooling it read."""
    if saved.get("fusion"):
        return fused_from_manifest(saved["fusion"], cache_root_of_run(Path(run_dir).resolve()))
    return CacheEntry(entry_of_run(Path(run_dir).resolve()))


def fused_pools(pool: str | None, backbones: list[str | None]) -> list[str | None]:
    """The pooling of each backbone of ``--backbone a+b``: ``pool`` for all of them, or one per backbone
    spelled like the backbones (``--pool penult+gap``); ``None`` leaves each entry's first pooling."""
    from featcache.options import OptionError

    parts = pool.split("+") if pool else [None]
    if len(parts) == 1:
        return parts * len(backbones)
    if len(parts) != len(backbones) or not all(parts):
        raise OptionError(f"--pool {pool}: give one pooling for all backbones, or one per backbone of --backbone "
                          f"{'+'.join(b or '?' for b in backbones)} in the same order ({len(backbones)} joined by +)")
    return parts

