"""Similar cases: the training images most like an image, in the run's own feature space.

A clinician checks a prediction against known cases: "this lesion looks most like these five, four of them
melanoma". The features are cached, so the search costs one matrix product: the training images' features
and the new ones are taken through the run's own steps before its head (the scaler fit on the training
rows, and its PCA), and compared by cosine similarity. The search is exact: a blocked matrix product
answers 10k training rows in milliseconds and 1M in about a second per batch of queries (docs/benchmarks.md,
``benchmarks/neighbours_speed.py``), below the cost of building an approximate index for the few images a
prediction asks about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featcache.errors import RunError

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_K = 5
BLOCK_ROWS = 4096  # queries per matrix product: bounds the (queries x training rows) block in memory
COLUMNS = ["id", "rank", "neighbour", "label", "group", "similarity", "agrees"]


@dataclass
class Space:
    """The run's feature space: how rows are taken into it, and what it is (said with every table)."""

    transform: object  # callable: features (n, dim) or (n, views, dim) -> (n, d) rows, unit length
    description: str


def run_space(pipeline, meta: bool = False) -> Space:  # noqa: ANN001 - a fitted featcache pipeline
    """The space of ``pipeline`` (a fitted head pipeline, or a :class:`~featcache.evaluation.heads.ViewEnsemble`):
    its steps before the head. With ``meta`` (a run fit with ``--meta``) only the image part's scaler is
    used: the metadata columns are not part of the similarity, and the description says so."""
    views = "all"
    if hasattr(pipeline, "estimator_"):
        views, pipeline = pipeline.test_views, pipeline.estimator_
    steps = [step for _, step in pipeline.steps[:-1] if step != "passthrough"]
    if meta:
        prep = pipeline.named_steps["prep"]
        image = prep.named_transformers_["image"]
        steps = [] if image == "passthrough" else [image]
        description = "the run's image scaler (its --meta columns and PCA are left out of the similarity)"
    else:
        names = [type(s).__name__ for s in steps]
        description = "the run's own " + (" + ".join(names) if names else "raw features") + ", cosine"

    def transform(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        chosen = X[:, :1] if X.ndim == 3 and views == "first" else X
        rows = chosen.reshape(-1, chosen.shape[-1])
        for step in steps:
            rows = step.transform(rows)
        rows = np.asarray(rows, dtype=np.float64)
        if X.ndim == 3:  # an image is the mean of its views, as its prediction is
            rows = rows.reshape(chosen.shape[0], chosen.shape[1], -1).mean(axis=1)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    return Space(transform, description)


def nearest(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar ``train`` rows of each ``query`` row (unit rows): indices and cosine
    similarities, best first; exact."""
    if len(train) == 0:
        raise RunError("no training rows to compare with")
    k = min(k, len(train))
    index = np.empty((len(query), k), dtype=np.int64)
    similarity = np.empty((len(query), k), dtype=np.float32)
    for start in range(0, len(query), BLOCK_ROWS):
        block = query[start:start + BLOCK_ROWS] @ train.T
        top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < block.shape[1] else \
            np.tile(np.arange(block.shape[1]), (len(block), 1))
        scores = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        index[start:start + len(block)] = np.take_along_axis(top, order, axis=1)
        similarity[start:start + len(block)] = np.take_along_axis(scores, order, axis=1)
    return index, similarity


def neighbour_rows(query_ids: list[str], predicted: list[str], index: np.ndarray, similarity: np.ndarray,
                   train_ids: list[str], train_labels: list[str], train_groups: list[str] | None) -> list[list]:
    """Rows of :data:`COLUMNS`: for each query, its neighbours best first, and whether each one's label is the
    query's predicted class."""
    rows = []
    for q, image_id in enumerate(query_ids):
        for rank, (i, s) in enumerate(zip(index[q], similarity[q], strict=True), start=1):
            label = train_labels[i]
            rows.append([image_id, rank, train_ids[i], label, (train_groups or [""] * len(train_ids))[i] or "",
                         float(s), label == predicted[q]])
    return rows


def agreement(rows: list[list], query_ids: list[str]) -> list[float]:
    """Per query: the share of its neighbours whose label is its predicted class."""
    votes: dict[str, list[bool]] = {}
    for row in rows:
        votes.setdefault(row[0], []).append(row[6])
    return [float(np.mean(votes[i])) if votes.get(i) else float("nan") for i in query_ids]


def as_frame(rows: list[list]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(rows, columns=COLUMNS)
