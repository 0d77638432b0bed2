"""Loading cached features from the store, from the page cache: GB/s of stored feature bytes.

Reads every feature of a cache entry four ways: ``CacheEntry.read`` in the stored dtype and as float32
(ids in entry order; ``fit`` uses float32), ``CacheEntry.read`` of a shuffled id list, and the raw
per-shard memory maps. Each is
repeated and the best kept (the first pass warms the page cache). Target (issue 6): >= 1 GB/s.

Run: python benchmarks/store_load.py [ENTRY]   (default: the HAM10000 EfficientNet-Lite0 entry in cache/)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from featcache.store.entries import CacheEntry, find_entries

REPO = Path(__file__).resolve().parents[1]


def best_seconds(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    if len(sys.argv) > 1:
        entry = CacheEntry(sys.argv[1])
    else:
        entry = next(e for e in find_entries(REPO / "cache") if e.manifest["dataset"] == "ham10000_200x150")
    pool = entry.pools[0]
    ids = entry.ids
    shuffled = list(np.random.default_rng(0).permutation(ids))
    stored = sum(m.nbytes for m in entry.memmaps(pool))
    print(f"{entry.path}: {len(ids)} x {entry.manifest['dims'][pool]} {entry.manifest['dtype']}, "
          f"{stored / 1e6:.1f} MB stored in {len(entry.shard_paths())} shards")
    entry.read(pool)  # warm the page cache and the id index
    print("| read | seconds | GB/s of stored bytes |")
    print("|---|---|---|")
    for label, fn in [
        ("CacheEntry.read (entry order, stored float16)", lambda: entry.read(pool, ids, dtype="float16")),
        ("CacheEntry.read (entry order, as float32)", lambda: entry.read(pool, ids)),
        ("CacheEntry.read (shuffled ids, as float32)", lambda: entry.read(pool, shuffled)),
        ("memory maps, concatenated (stored dtype)", lambda: np.concatenate(entry.memmaps(pool))),
    ]:
        seconds = best_seconds(fn)
        print(f"| {label} | {seconds:.3f} | **{stored / seconds / 1e9:.2f}** |")


if __name__ == "__main__":
    main()
