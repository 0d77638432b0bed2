"""What the leakage audit found, as numbers for metrics.json and as a sentence for the user."""

from __future__ import annotations

import numpy as np

from featcache.evaluation.features import LabeledFeatures
from featcache.evaluation.leakage import (
    held_out_with_duplicate,
)


def leakage_summary(data: LabeledFeatures, folds: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """What the duplicate audit found in ``data``, and how many held-out images of ``folds`` have an
    identical or near-identical image on the training side."""
    pairs = data.duplicates
    if pairs is None:
        return {}
    leaking = held_out_with_duplicate(pairs, folds, len(data.y))
    held_out = int(sum(len(test) for _, test in folds))
    return {"exact_duplicate_pairs": pairs.n_exact, "near_duplicate_pairs": pairs.n_near,
            "threshold": pairs.threshold, "threshold_calibrated": pairs.calibrated, "search": pairs.search,
            "held_out_with_duplicate_in_train": leaking, "held_out": held_out}


def leakage_message(leak: dict, grouping: dict) -> tuple[str, bool]:
    """A sentence for the user about ``leak`` and whether it is a warning (scores likely inflated)."""
    if not leak:
        return "", False
    calibrated = "" if leak["threshold_calibrated"] else (
        " (threshold not calibrated for this backbone; set --near-dup-threshold)")
    search = "" if leak.get("search", "exact") == "exact" else f", by an {leak['search']}"
    found = (f"leakage audit: {leak['exact_duplicate_pairs']} identical and {leak['near_duplicate_pairs']} "
             f"near-identical image pairs (cosine >= {leak['threshold']:.2f}{search}){calibrated}")
    n, total = leak["held_out_with_duplicate_in_train"], leak["held_out"]
    if not n:
        return found + "; no held-out image has one on its training side", False
    found += f"; {n} of {total} held-out images have one on their training side"
    if grouping.get("grouped"):
        return found + f" despite the groups ({grouping['by']}): check that the groups are right", True
    return (found + ": scores are likely inflated. Pass --group-col NAME if the data has a patient or lesion "
            "column, or --groups near-duplicates to keep such images together"), True


# below this many groups (patients, lesions) a class's grouped folds each hold out one or two of them: its recall
# rests on a handful of cases and its interval is wide (the clinical set's herpes simplex: 16 photos of 5 cases)
FEW_GROUPS = 10


def groups_per_class(data: LabeledFeatures) -> dict[str, int] | None:
    """How many groups (patients, lesions) stand behind each class; None for ungrouped rows."""
    if data.groups is None or not data.grouping.get("grouped"):
        return None
    return {str(c): len({g for g, y in zip(data.groups.tolist(), data.y.tolist(), strict=True) if y == c})
            for c in data.classes}


def few_groups_message(data: LabeledFeatures, folds: int) -> str | None:
    """The warning of classes with fewer than :data:`FEW_GROUPS` groups, naming each with its counts, and what
    that does to its scores; None when every class has enough."""
    counts = groups_per_class(data)
    few = {c: n for c, n in (counts or {}).items() if n < FEW_GROUPS}
    if not few:
        return None
    images = {c: int((data.y == c).sum()) for c in few}
    by = data.grouping.get("by", "groups")
    named = "; ".join(f"{c}: {images[c]} images of {n} groups" for c, n in few.items())
    fewest = min(few, key=few.get)
    return (f"few groups behind {'a class' if len(few) == 1 else 'some classes'} ({by}): {named}. Each of the "
            f"{folds} grouped folds holds out only a few of them ({fewest}: about {few[fewest] / folds:.1f} a fold), "
            "so their recall and AUROC rest on a handful of cases and their intervals are wide; images of more "
            "patients narrow them")
