"""What checking every shard's feature checksum on read costs, next to what fitting costs (issue 27).

    python benchmarks/checksum_cost.py [--images 10015] [--dim 1280]

Builds an entry of HAM10000's size (10,015 images x 1280 float16 features in shards of 1024, the layout
`featcache extract` writes, random values) and measures in one run: the first read of every feature by a
new `CacheEntry` (each shard's SHA-256 checked), a second read by the same entry (already checked), and a
5-fold logistic regression on those features, the cheapest head `fit` runs. Writes the `checksum-cost`
block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from docs_blocks import replace_block
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featcache.extraction.writer import ShardSink
from featcache.store.entries import MANIFEST, CacheEntry, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def build_entry(root: Path, images: int, dim: int) -> Path:
    entry_dir = root / "synthetic" / "efficientnet_lite0-0000000000000000"
    entry_dir.mkdir(parents=True)
    manifest = {"fingerprint": "0000000000000000", "fingerprint_inputs": {}, "format_version": 1,
                "dataset": "synthetic", "source": "", "source_kind": "csv", "backbone": "efficientnet_lite0",
                "pools": ["gap"], "dims": {"gap": dim}, "dtype": "float16", "provenance": {}, "views": ["identity"]}
    write_json_atomic(entry_dir / MANIFEST, manifest)
    rng = np.random.default_rng(0)
    sink = ShardSink(entry_dir, manifest, {"gap": dim}, 1024)
    for k in range(images):
        sink.add(f"img{k:05d}", f"{k:064x}", 1, 1, {"gap": rng.normal(size=dim).astype(np.float16)})
        sink.commit_full()
    sink.commit()
    return entry_dir


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10015)
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        entry_dir = build_entry(Path(tmp), args.images, args.dim)
        CacheEntry(entry_dir).read("gap")  # page cache and id index warm for both kinds of read
        first = best(lambda: CacheEntry(entry_dir).read("gap"))  # a new entry: every shard's checksum checked
        entry = CacheEntry(entry_dir)
        entry.read("gap")
        again = best(lambda: entry.read("gap"))  # the same entry: already checked
        X = entry.read("gap")
        y = np.arange(len(X)) % 7
        head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200))
        fit = best(lambda: cross_val_score(head, X, y, cv=5), repeats=1)
    check = first - again
    lines = [f"Command: `python benchmarks/checksum_cost.py --images {args.images} --dim {args.dim}` "
             f"({args.images} x {args.dim} float16 in shards of 1024, one run):", "",
             "| what | seconds |", "|---|---|",
             f"| first read of every feature, each shard's checksum checked | {first:.3f} |",
             f"| the same read, already checked | {again:.3f} |",
             f"| the checksums themselves (difference) | {check:.3f} |",
             f"| a 5-fold logistic regression on these features (cheapest head of `fit`) | {fit:.2f} |", "",
             f"Checking costs {check / fit:.1%} of the cheapest fit, once per entry read."]
    text = "\n".join(lines)
    print(text)
    replace_block(REPO / "docs" / "benchmarks.md", "checksum-cost",
                  "## Checksums checked on every read {#checksums}\n\n" + text)


if __name__ == "__main__":
    main()
