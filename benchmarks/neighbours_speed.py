"""How long the similar-cases search takes: featcache's exact search against faiss, at 10k and 1M rows (issue 34).

    python benchmarks/neighbours_speed.py [--rows 10000,1000000] [--dim 1280] [--queries 1,100]

Synthetic unit vectors (d = 1280, Lite0's gap width) with the structure features have (rows around 1,000
cluster centres, as images of one kind sit together; uniform random vectors would have no near neighbours to
find) as training rows; queries of 1 image (one `predict`) and
100 (a test set's batch). Measured in one run, each the best of 3: featcache's exact blocked search
(`featcache.evaluation.neighbours.nearest`), faiss's exact `IndexFlatIP` (the same answer, its own BLAS
kernel) and faiss's HNSW graph (approximate; its build time and its recall of the exact top 5 beside). Writes
the `neighbours-speed` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from docs_blocks import replace_block

from featcache.evaluation.neighbours import nearest

REPO = Path(__file__).resolve().parents[1]
K = 5


def _best(call, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def _measure(train: np.ndarray, queries: list[np.ndarray], hnsw_max_rows: int) -> list[str]:
    """One table row per query batch against ``train``."""
    import faiss

    rows, dim = train.shape
    flat = faiss.IndexFlatIP(dim)
    flat.add(train)
    hnsw = build = None
    if rows <= hnsw_max_rows:
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(train)
        build = time.perf_counter() - started
    lines = []
    for query in queries:
        ours = _best(lambda q=query: nearest(train, q, K))
        theirs = _best(lambda q=query: flat.search(q, K))
        exact = nearest(train, query, K)[0]
        assert np.array_equal(np.sort(exact, axis=1), np.sort(flat.search(query, K)[1], axis=1))
        if hnsw is not None:
            graph = _best(lambda q=query: hnsw.search(q, K))
            found = hnsw.search(query, K)[1]
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(exact, found, strict=True)])
            extra = f"{graph * 1e3:.2f} | {build:.1f} | {recall:.2f}"
        else:
            extra = f"– | – (over {hnsw_max_rows:,} rows: not built) | –"
        lines.append(f"| {rows:,} | {len(query)} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} | {extra} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="10000,1000000")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", default="1,100")
    parser.add_argument("--hnsw-max-rows", type=int, default=100_000, help="HNSW builds take minutes above this")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)

    def rows_of(count: int) -> np.ndarray:
        out = np.empty((count, args.dim), dtype=np.float32)
        for start in range(0, count, 100_000):  # in blocks: a second 1M x 1280 temporary would not fit beside
            n = min(100_000, count - start)
            block = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, args.dim), dtype=np.float32)
            out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    lines = ["| training rows | queries | featcache exact (ms) | faiss flat, exact (ms) | faiss HNSW (ms) | "
             "HNSW build (s) | HNSW recall@5 |", "|---|---|---|---|---|---|---|"]
    for rows in (int(r) for r in args.rows.split(",")):
        lines += _measure(rows_of(rows), [rows_of(int(q)) for q in args.queries.split(",")], args.hnsw_max_rows)
    text = "\n".join(["## Similar cases: exact search against faiss {#neighbours-speed}", "",
                      f"`python benchmarks/neighbours_speed.py` (d = {args.dim}, k = {K}, synthetic unit vectors, "
                      "around 1,000 cluster centres, 2 threads, best of 3; the exact searches give the same "
                      "neighbours, checked in the run):", "",
                      *lines])
    replace_block(REPO / "docs" / "benchmarks.md", "neighbours-speed", text)


if __name__ == "__main__":
    main()
