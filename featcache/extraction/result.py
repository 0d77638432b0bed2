"""What an extraction did (kept free of PyTorch: the warm path of ``extract`` returns one too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from featcache.store.entries import CacheEntry


@dataclass
class ExtractResult:
    entry: CacheEntry
    extracted: int
    skipped: int
    failed: dict[str, str]
    seconds: float
    notes: list[str] = field(default_factory=list)
    reused: int = 0  # images whose features came from another entry with the same fingerprint
    # how a later extraction into this entry can run without PyTorch (featcache.extraction.lean), if it can
    lean: dict | None = None

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        reused = f"{self.reused} reused from other entries, " if self.reused else ""
        return (f"{self.extracted} extracted ({self.images_per_second:.1f} images/s), {reused}"
                f"{self.skipped} already cached, {len(self.failed)} failed -> {self.entry.path}")
