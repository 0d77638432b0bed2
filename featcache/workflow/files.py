"""What the doors write and read beside the cache, and where: prediction and explanation files, model cards, the
cache's check, the backbones on offer. The command line asks here, never the stages; the store's naming module
stays the one that names things on disk (its path functions are this module's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.store.naming import card_beside, entry_of_run, free_predictions_path, neighbours_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["backbone_availability", "card_beside", "entry_of_run", "free_predictions_path", "neighbours_path",
           "verify", "write_explanations", "write_predictions"]


def write_predictions(frame: pd.DataFrame, out: Path) -> list[Path]:
    """``predict``'s table at ``out``, and each image's similar training cases beside it when there are any."""
    from featcache.evaluation.predict import write_predictions as write  # it imports the whole stack

    return write(frame, out)


def write_explanations(found: list, out: Path) -> list[Path]:
    """``explain``'s heatmaps and similar cases under ``out``."""
    from featcache.evaluation.explain import write_explanations as write

    return write(found, out)


def verify(where: Path, data: str | None, repair: bool, check_files: bool, break_lock: bool) -> Iterator:
    """Each entry under ``where`` (an entry or a cache root) checked: ``(entry folder, repairs made, findings)``."""
    from featcache.store.verify import verify_cache

    return verify_cache(where, data, repair=repair, check_files=check_files, break_lock=break_lock)


def backbone_availability() -> list[tuple[Any, str, int]]:
    """Every registered backbone with where its weights would come from here, and how usable it is (0: its weights
    are on this machine, 1: a download or an install away, 2: not loadable), usable first."""
    from featcache.backbones.catalog import NOT_LOADABLE, REGISTRY, weights_available

    found = []
    for spec in REGISTRY.values():
        where = weights_available(spec)
        found.append((spec, where, 2 if where == NOT_LOADABLE else 1 if where.startswith(("download", "pip install"))
                      else 0))
    return sorted(found, key=lambda item: item[2])
