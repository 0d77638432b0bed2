"""Stand-ins shared by the tests."""

from __future__ import annotations

from pathlib import Path


class FakeEntry:
    """Just enough of a cache entry for ``fit_head``: where runs go, and what to name them by."""

    manifest = {"backbone": "test"}

    def __init__(self, path: Path, fingerprint: str = "f" * 16):
        self.path, self.fingerprint = path, fingerprint
