"""Leakage audit from the cached features: identical and near-identical images.

Two photos of one lesion (or one patient) in the training and the test side of a split make a
score look better than it is. Without a group column nothing says which images belong together,
but the features do: identical files share a SHA-256, and near-identical images (the same lesion
shot twice, a crop, a re-save) have features far more alike than two different lesions. The
threshold on that similarity is calibrated on HAM10000, where ``lesion_id`` says which images
show the same lesion (``benchmarks/leakage_audit.py``, docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Cosine similarity of centred, L2-normalised features above which two images count as near
# duplicates, per backbone and pooling: the lowest threshold at which at least 90 % of the pairs
# found on HAM10000 show the same lesion (benchmarks/leakage_audit.py). Other backbones use
# DEFAULT_THRESHOLD, and the audit says that it is uncalibrated for them.
CALIBRATED_THRESHOLDS: dict[tuple[str, str], float] = {
    ("efficientnet_lite0", "gap"): 0.91,  # precision 0.95, recall 0.017 of same-lesion pairs
    ("squeezenet1_1", "gap"): 0.965,  # precision 0.92, recall 0.004
}
DEFAULT_THRESHOLD = 0.91
BLOCK_ROWS = 2048
# Up to this many images every pair is compared (100k x 1280: about 2 minutes on 2 cores, and growing with the
# square of the images: hours at a million, with blocks of 8 GB). Past it, an approximate search: a faiss
# inverted-file index of sqrt(n) cells, each image compared with the images of its APPROXIMATE_PROBES nearest
# cells; its recall of the exact pairs is measured in docs/benchmarks.md (`leakage-scale`).
EXACT_MAX_IMAGES = 100_000
APPROXIMATE_PROBES = 8


@dataclass
class DuplicatePairs:
    """Pairs of rows ``(first[k], second[k])`` with ``first < second``; ``similarity`` is 1.0 for
    byte-identical files."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray  # bool: same SHA-256
    threshold: float
    calibrated: bool
    search: str = "exact"  # or how the approximate search was made (it may miss pairs)

    def __len__(self) -> int:
        return len(self.first)

    @property
    def n_exact(self) -> int:
        return int(self.exact.sum())

    @property
    def n_near(self) -> int:
        return int((~self.exact).sum())


def threshold_for(backbone: str, pool: str, threshold: float | None = None) -> tuple[float, bool]:
    """The near-duplicate threshold for features of ``backbone``/``pool`` and whether it was
    calibrated for them (an explicit ``threshold`` counts as calibrated by the user)."""
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"--near-dup-threshold {threshold}: give a cosine similarity in (0, 1]")
        return float(threshold), True
    if (backbone, pool) in CALIBRATED_THRESHOLDS:
        return CALIBRATED_THRESHOLDS[(backbone, pool)], True
    return DEFAULT_THRESHOLD, False


def normalised(X: np.ndarray, center: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows centred (by ``center``, default their mean) and scaled to unit length; the first view
    of multi-view features. Centring matters: CNN features are all positive, so plain cosines of
    any two images are high."""
    X = np.asarray(X[:, 0] if X.ndim == 3 else X, dtype=np.float32)
    center = X.mean(axis=0) if center is None else center
    Z = X - center
    Z /= np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
    return Z, center


def find_duplicates(X: np.ndarray, sha256: list[str], threshold: float, calibrated: bool = True,
                    exact_max: int | None = None) -> DuplicatePairs:
    """Every pair of rows that is byte-identical (same SHA-256) or whose features have a cosine
    similarity of at least ``threshold``. Computed block by block: 10k x 1280 takes about a second. Past
    ``exact_max`` rows (default :data:`EXACT_MAX_IMAGES`) the similar pairs come from an approximate search
    (:func:`approximate_pairs`), which ``search`` names; the identical files are still all found."""
    n = len(X)
    search = "exact"
    if n > (EXACT_MAX_IMAGES if exact_max is None else exact_max):
        first, second, sims, search = approximate_pairs(X, threshold)
    else:
        first, second, sims = _exact_pairs(X, threshold)
    by_sha: dict[str, list[int]] = {}
    for i, sha in enumerate(sha256):
        by_sha.setdefault(sha, []).append(i)
    exact_pairs = {(a, b) for rows in by_sha.values() if len(rows) > 1
                   for k, a in enumerate(rows) for b in rows[k + 1:]}
    pairs = dict(zip(zip(first.tolist(), second.tolist(), strict=True), sims.tolist(), strict=True))
    for pair in exact_pairs:
        pairs[pair] = 1.0
    ordered = sorted(pairs)
    return DuplicatePairs(np.array([a for a, _ in ordered], dtype=np.int64),
                          np.array([b for _, b in ordered], dtype=np.int64),
                          np.array([pairs[p] for p in ordered], dtype=np.float32),
                          np.array([p in exact_pairs for p in ordered], dtype=bool), threshold, calibrated, search)


def _exact_pairs(X: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (first < second) with a cosine of at least ``threshold``, and the cosines: all pairs compared."""
    Z, _ = normalised(X)
    first, second, sims = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    for start in range(0, len(Z), BLOCK_ROWS):
        block = Z[start:start + BLOCK_ROWS] @ Z[start:].T
        rows, cols = np.nonzero(block >= threshold)
        upper = cols > rows  # (the block's own diagonal, and each pair once)
        first.append(rows[upper] + start)
        second.append(cols[upper] + start)
        sims.append(block[rows[upper], cols[upper]])
    return np.concatenate(first), np.concatenate(second), np.concatenate(sims)


def approximate_pairs(X: np.ndarray, threshold: float, probes: int = APPROXIMATE_PROBES, seed: int = 0,
                      cells: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """:func:`_exact_pairs` by an approximate search, and how it was made: the centred unit rows in a faiss
    inverted-file index of about sqrt(n) cells (k-means on a seeded sample of 40 rows per cell), each row's
    range search at ``threshold`` over the rows of its ``probes`` nearest cells. Near-identical images lie close
    together, so they share a cell or a neighbouring one; a pair split across farther cells is missed. Rows are
    centred and normalised a block at a time: the index holds the only full copy. ``cells``: another number of
    cells (benchmarks/leakage_scale.py)."""
    import faiss  # imported here: only an audit past EXACT_MAX_IMAGES needs it

    rows = X[:, 0] if X.ndim == 3 else X
    n, dim = rows.shape
    center = np.zeros(dim)
    for start in range(0, n, 65536):  # the mean in float64, without a float64 copy of the rows
        center += rows[start:start + 65536].sum(axis=0, dtype=np.float64)
    center = (center / n).astype(np.float32)

    def unit(block: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(normalised(block, center)[0])

    cells = cells or max(1, int(np.sqrt(n)))
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 40 * cells), replace=False))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(unit(rows[sample]))
    for start in range(0, n, 65536):
        index.add(unit(rows[start:start + 65536]))
    index.nprobe = probes
    first, second, sims = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    for start in range(0, n, 16384):
        limits, found_sims, found = index.range_search(unit(rows[start:start + 16384]), threshold)
        query = np.repeat(np.arange(start, start + len(limits) - 1), np.diff(limits).astype(np.int64))
        other = found.astype(np.int64)
        keep = other != query  # a pair may be found from one side only: both sides kept, then made one
        first.append(np.minimum(query, other)[keep])
        second.append(np.maximum(query, other)[keep])
        sims.append(found_sims[keep])
    first_all, second_all, sims_all = (np.concatenate(a) for a in (first, second, sims))
    _, once = np.unique(first_all * n + second_all, return_index=True)
    return (first_all[once], second_all[once], sims_all[once],
            f"approximate (faiss IVF: {cells} cells, {probes} probed per image; it may miss pairs)")


def duplicate_groups(n: int, pairs: DuplicatePairs) -> np.ndarray:
    """Group labels: connected components of the duplicate graph (an image alone is its own group)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs.first, pairs.second)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return np.array([f"dup{label}" for label in labels])


def copied_in_training(pairs: DuplicatePairs, folds: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Per image: whether it is held out in a fold of ``folds`` whose training side holds a duplicate of it."""
    copied = np.zeros(n, bool)
    for train, test in folds:
        in_train, in_test = np.zeros(n, bool), np.zeros(n, bool)
        in_train[train], in_test[test] = True, True
        copied[pairs.first[in_test[pairs.first] & in_train[pairs.second]]] = True
        copied[pairs.second[in_test[pairs.second] & in_train[pairs.first]]] = True
    return copied


def held_out_with_duplicate(pairs: DuplicatePairs, folds: list[tuple[np.ndarray, np.ndarray]], n: int) -> int:
    """How many held-out images (summed over ``folds``) have a duplicate in their training side."""
    return int(copied_in_training(pairs, folds, n).sum())


def nearest_known(Z_new: np.ndarray, Z_known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each new row: the index of the most similar known row and that cosine similarity."""
    best = np.full(len(Z_new), -1, dtype=np.int64)
    sims = np.full(len(Z_new), -np.inf, dtype=np.float32)
    for start in range(0, len(Z_new), BLOCK_ROWS):
        block = Z_new[start:start + BLOCK_ROWS] @ Z_known.T
        best[start:start + len(block)] = block.argmax(axis=1)
        sims[start:start + len(block)] = block.max(axis=1)
    return best, sims
