"""What the whole-command benchmarks share: their images (ham70's 600x450 photographs copied under N
distinct names, one class folder) and timing a command in a fresh process."""

from __future__ import annotations

import shutil
import subprocess
import time
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


def run_command(command: list[str], stderr: bool = False) -> tuple[float, str]:
    """Run ``command`` (it must succeed): its wall seconds and its standard output (and error, with
    ``stderr``)."""
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, done.stdout + (done.stderr if stderr else "")
