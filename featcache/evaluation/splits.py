"""Train / held-out splits: grouped stratified k-fold, a source's official split, DermaMNIST's 7:1:2."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from featcache.errors import RunError
from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.protocol import Protocol
from featcache.store.hashing import stable_hash

_FOLDS_MEMO: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}


def make_folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold, grouped when ``groups`` is given (no group in two folds).

    Memoized by the content of ``y`` and ``groups``: StratifiedGroupKFold takes ~2 s on 10k images
    (its search is in Python), which every head of a grid would otherwise pay again.
    """
    key = stable_hash([np.asarray(y, dtype=str).tolist(),
                       None if groups is None else np.asarray(groups, dtype=str).tolist(), k, seed])
    if key not in _FOLDS_MEMO:
        _FOLDS_MEMO[key] = _make_folds(y, groups, k, seed)
    return [(train.copy(), test.copy()) for train, test in _FOLDS_MEMO[key]]


def too_small_classes(counts: dict[str, int], k: int) -> str:
    """Why ``k``-fold CV cannot run on classes of these ``counts``, naming the classes and what to do."""
    small = sorted((n, name) for name, n in counts.items() if n < k)
    listed = ", ".join(f"{name!r} has {n} image{'s' if n != 1 else ''}" for n, name in small)
    others = [name for name, n in counts.items() if n >= k]
    if small[0][0] < 2:  # no number of folds helps: a class must be on both sides of a split
        fix = "a label typo? fix it in the data (`featcache audit` lists such labels)"
    else:
        fix = f"use --cv {small[0][0]}"
    if len(others) >= 2:
        fix += f", or leave {'it' if len(small) == 1 else 'them'} out with --classes {','.join(others)}"
    return f"--cv {k}: every class needs at least {k} images, and {listed}; {fix}"


def _make_folds(y: np.ndarray, groups: np.ndarray | None, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    names, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        raise RunError(too_small_classes(dict(zip(names.tolist(), counts.tolist(), strict=True)), k))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y, groups))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


VALIDATION_SPLITS = ("val", "valid", "validation", "dev")


def official_split(splits: np.ndarray | None) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """Train on the rows marked train (or anything but test and validation), test on ``test``.
    Validation rows are left out: heads choose their settings by inner CV on the training part."""
    if splits is None:
        raise RunError("--split official: this source has no split column (or npz splits)")
    lowered = np.char.lower(splits.astype(str))
    test = lowered == "test"
    val = np.isin(lowered, VALIDATION_SPLITS)
    if not test.any() or (test | val).all():
        raise RunError("--split official: need rows with split 'test' and rows with a training split; "
                       f"found {', '.join(sorted(set(lowered.tolist())))}")
    train = ~(test | val)
    counts = {"train": int(train.sum()), "val": int(val.sum()), "test": int(test.sum())}
    return [(np.flatnonzero(train), np.flatnonzero(test))], counts


def random_712_split(y: np.ndarray, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """Image-level stratified random split 70 / 10 / 20 (DermaMNIST's protocol): train on the 70 %,
    test on the 20 %; the 10 % validation part is left unused. Lesions are *not* kept together,
    which is the point of running it: it shows how much image-level splitting inflates scores."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=0.2, random_state=seed, stratify=y)
    train, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=y[rest])
    counts = {"train": len(train), "val": len(val), "test": len(test)}
    return [(np.sort(train), np.sort(test))], counts


Folds = list[tuple[np.ndarray, np.ndarray]]


def split_plan(data: LabeledFeatures, protocol: Protocol, seed: int) -> tuple[Folds, dict]:
    """The (train, held-out) index pairs of one seed, and the part sizes of a single split."""
    if protocol.split == "official":
        return official_split(data.splits)
    if protocol.split == "random712":
        return random_712_split(data.y, seed)
    return make_folds(data.y, data.groups, protocol.cv, seed), {}
