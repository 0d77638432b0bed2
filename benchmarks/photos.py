"""Benchmark images: ham70's 600x450 photographs copied under N distinct names (one class folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

HAM70 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham70"


def ham70_copies(data: Path, count: int) -> list[Path]:
    """``data/photos/00000.jpg`` … : the photographs in turn, so that the page cache, not the decoder, repeats."""
    photos = sorted(HAM70.rglob("*.jpg"))
    (data / "photos").mkdir(parents=True)
    copies = []
    for i in range(count):
        copies.append(data / "photos" / f"{i:05d}.jpg")
        shutil.copyfile(photos[i % len(photos)], copies[-1])
    return copies
