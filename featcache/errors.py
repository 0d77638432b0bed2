"""Errors meant for people: each says what was wrong, where, and what to do next."""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class; the CLI prints ``str(error)`` as one line, without a traceback."""


class SourceError(FeatcacheError):
    """The data source (folder, CSV or .npz) cannot be used as given."""


class WeightsUnavailable(FeatcacheError):
    """No usable weights for a backbone (offline, wrong file, hash mismatch)."""


class CacheError(FeatcacheError):
    """A cache entry is locked, damaged or does not match what was asked."""


class EntryLocked(CacheError):
    """Another live process is writing the same cache entry."""


class RunError(FeatcacheError):
    """A fit/predict run cannot go ahead (missing features, bad labels, wrong model)."""
