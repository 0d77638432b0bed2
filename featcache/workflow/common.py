"""What every workflow needs: the cache root, the source opened with its notes said, the reporter, a Ray
cluster, a count of similar cases checked where it enters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.options import OptionError
from featcache.progress import Reporter

if TYPE_CHECKING:
    from featcache.data.sources import ImageSource
    from featcache.extraction.ray import RayCluster


def similar_cases_count(value: Any, name: str) -> int:
    """A count of similar cases, checked where it enters."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"{name}={value!r}: give a whole number of similar cases, 0 or more")
    return value


def reporter_for(quiet: bool, reporter: Reporter | None) -> Reporter:
    return reporter or Reporter(quiet=quiet)


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache``, else ``$FEATCACHE_CACHE``, else ``./cache``."""
    from featcache.store.naming import default_cache_root

    return Path(cache) if cache else default_cache_root()


def ray_cluster(address: str | None, reporter: Reporter, actors: int | None = None) -> RayCluster | None:
    """The Ray cluster asked for with ``ray`` (None without it)."""
    if not address:
        if actors:
            raise OptionError("--ray-actors needs --ray (from Python: ray_actors= needs ray=)")
        return None
    from featcache.extraction.ray import RayCluster

    cluster = RayCluster(address, actors=actors)
    reporter.info(f"--ray: {cluster.describe()}")
    return cluster


def open_data(data: str, images: str | None, image_col: str | None, label_col: str | None, group_col: str | None,
              reporter: Reporter, labels_required: bool = True, groups: str = "auto") -> ImageSource:
    """The source, with its notes and where its groups come from said once (``labels_required=False``:
    extraction, which needs no labels; ``groups``: the grouping asked for, which a group-column hint serves
    only when it is ``auto``)."""
    from featcache.data.sources import open_source

    source = open_source(data, images and Path(images), image_col, label_col, group_col, labels_required)
    for note in source.notes[:10]:
        reporter.warn(note)
    if source.group_column:
        n = len({r.group for r in source.records if r.group})
        reporter.info(f"groups: column {source.group_column!r} ({n} groups of {len(source.records)} images)",
                      once=True)
    elif source.suspect_group_columns and groups == "auto":
        reporter.warn(f"no group column recognised in {source.location}, but "
                      f"{', '.join(map(repr, source.suspect_group_columns))} looks like one (ids shared by "
                      "several images): pass --group-col NAME, or --no-groups if the images are independent")
    return source
