"""Labelled feature rows of a source: features, labels, groups, splits and metadata, with the leakage audit."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.data.sources import ImageSource, column_key, is_number
from featcache.errors import RunError
from featcache.evaluation.leakage import (
    DuplicatePairs,
    duplicate_groups,
    find_duplicates,
    threshold_for,
)
from featcache.options import BY_NAME, Grouping
from featcache.store.entries import CacheEntry
from featcache.store.hashing import bytes_hash, rows_hash


@dataclass
class LabeledFeatures:
    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None
    splits: np.ndarray | None
    ids: list[str]
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    meta: np.ndarray | None = None  # (n, numeric + categorical columns), NaN where missing
    meta_spec: list[dict] = field(default_factory=list)  # per column: name, kind, categories
    sha256: list[str] = field(default_factory=list)  # of each row's image file (or array)
    # how the groups were found: {"grouped": bool, "by": text, "mode": Grouping value, "column": name}
    grouping: dict = field(default_factory=lambda: {"grouped": False, "by": "no groups", "mode": "none"})
    duplicates: DuplicatePairs | None = None  # the leakage audit of these rows
    paths: list[str] = field(default_factory=list)  # each row's image file (for heatmaps and galleries)
    strata: np.ndarray | None = None  # each row's value of --conformal-by's column (its sets' calibration group)

    def identity(self) -> str:
        """Hash of every value of these rows that sets a run's numbers: ids, image SHA-256s,
        labels, groups, splits and metadata (features are named by the image hash and the entry's
        fingerprint)."""
        n = len(self.ids)
        groups = self.groups if self.groups is not None else [None] * n
        splits = self.splits if self.splits is not None else [None] * n
        meta = self.meta.tolist() if self.meta is not None else [None] * n
        # rows built without a cache entry (the Python API) are named by their exact feature bytes
        images = self.sha256 or [bytes_hash(self.X)] * n
        columns = [self.ids, images, self.y.tolist(), list(groups), list(splits), meta]
        if self.strata is not None:  # only then: runs made before --conformal-by keep their names
            columns.append(self.strata.tolist())
        return rows_hash(zip(*columns, strict=True))


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"akiec=malignant,mel=malignant,*=benign"`` -> mapping; ``*`` maps every other label."""
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        if "=" not in part:
            raise RunError(f"--label-map {text!r}: {part!r} is not OLD=NEW")
        old, new = (s.strip() for s in part.split("=", 1))
        mapping[old] = new
    return mapping


def label_counts(source: ImageSource, label_map: str | None = None, classes: str | None = None) -> Counter:
    """How many images of ``source`` carry each label once ``label_map`` and ``classes`` are applied."""
    mapping = parse_label_map(label_map)
    keep = {c.strip() for c in classes.split(",") if c.strip()} if classes else None
    counts: Counter = Counter()
    for record in source.records:
        if record.label is None:
            continue
        label = mapping.get(record.label, mapping.get("*", record.label)) if mapping else record.label
        if keep is None or label in keep:
            counts[label] += 1
    return counts


def check_test_classes(train: ImageSource, test: ImageSource, label_map: str | None = None,
                       classes: str | None = None) -> None:
    """Refuse a held-out set with classes the training set lacks: a model cannot predict them, and
    scoring only the rest would report a number on fewer images than were given."""
    trained, tested = label_counts(train, label_map, classes), label_counts(test, label_map, classes)
    unseen = {label: n for label, n in tested.items() if label not in trained}
    if not unseen:
        return
    listed = ", ".join(f"{label} ({n})" for label, n in sorted(unseen.items()))
    shared = sorted(set(tested) & set(trained))
    way_out = (f"pass --classes {','.join(shared)} to score only the shared classes" if shared else
               "no class is shared: check the label column of each (--label-col, --test-data's CSV)")
    raise RunError(f"{test.location}: {sum(unseen.values())} of {sum(tested.values())} test images belong to classes "
                   f"the training data ({train.location}) does not have: {listed}. The model cannot predict them; "
                   f"{way_out}, or merge labels with --label-map (e.g. 'mel=malignant,*=benign')")


def encode_meta(records: list, columns: list[str], spec: list[dict] | None = None,
                source_name: str = "") -> tuple[np.ndarray, list[dict]]:
    """Metadata columns as numbers: numeric ones as floats, categorical ones as codes into their
    sorted categories; empty cells are NaN (imputed later, inside the pipeline). Numeric columns
    come first. ``spec`` (from training data) fixes the categories, so test data is coded alike;
    a category unseen in training becomes missing."""
    names = [c["name"] for c in spec] if spec is not None else columns
    present = {column_key(c): c for c in records[0].meta}
    missing = [name for name in names if column_key(name) not in present]
    if missing:
        raise RunError(f"--meta {missing[0]}: {source_name} has no column {missing[0]!r}; it has "
                       f"{', '.join(records[0].meta) or 'no extra columns'}")
    actual = {name: present[column_key(name)] for name in names}  # any case, past stray spaces, as --label-col
    if spec is None:
        spec = []
        for name in columns:
            filled = [v for v in (r.meta.get(actual[name], "").strip() for r in records) if v]
            if all(is_number(v) for v in filled):
                spec.append({"name": name, "kind": "numeric"})
            else:
                spec.append({"name": name, "kind": "categorical", "categories": sorted(set(filled))})
        spec.sort(key=lambda c: c["kind"] != "numeric")
    out = np.full((len(records), len(spec)), np.nan)
    for j, column in enumerate(spec):
        codes = {c: float(i) for i, c in enumerate(column.get("categories", []))}
        for i, record in enumerate(records):
            value = record.meta.get(actual[column["name"]], "").strip()
            if value:
                out[i, j] = float(value) if column["kind"] == "numeric" else codes.get(value, np.nan)
    return out, spec


def labeled_features(source: ImageSource, entry: CacheEntry, pool: str, label_map: str | None = None,
                     classes: str | None = None, meta: str = "",
                     meta_spec: list[dict] | None = None, groups: str = "auto",
                     near_dup_threshold: float | None = None, audit: bool = True) -> LabeledFeatures:
    """Features of every labelled, successfully extracted image of ``source``, in source order.

    ``meta``: metadata columns to add (see :func:`encode_meta`); ``meta_spec`` codes them like
    the training data's. ``groups``: a :class:`Grouping` value. The leakage audit (identical and
    near-identical images) is run on the rows and kept in ``duplicates`` (``audit=False`` skips it
    for a held-out set, unless its groups come from it)."""
    from featcache.extraction.resume import images_to_extract

    groups = BY_NAME["groups"].checked(groups)
    for part in getattr(entry, "parts", [(entry, pool)]):  # a fused entry: every backbone's
        stale, _ = images_to_extract(source, part[0].path)
        if stale:
            raise RunError(
                f"{len(stale)} images of {source.location} are not in {part[0].path} or changed since "
                f"extraction (first: {stale[0].id}); run `featcache extract` on this data first")
    mapping = parse_label_map(label_map)
    keep = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if keep is not None:
        known = {mapping.get(r.label, mapping.get("*", r.label)) for r in source.records if r.label is not None}
        unknown = [c for c in keep if c not in known]
        if unknown:
            raise RunError(f"--classes: {', '.join(map(repr, unknown))} not among the labels of {source.location} "
                           f"({', '.join(sorted(known))})")
    failed = entry.failed
    notes, rows = [], []
    unlabeled = 0
    for record in source.records:
        if record.id in failed:
            notes.append(f"left out {record.id}: extraction failed ({failed[record.id]})")
            continue
        label = record.label
        if label is not None and mapping:
            label = mapping.get(label, mapping.get("*", label))
        if label is None:
            unlabeled += 1
            continue
        if keep is not None and label not in keep:
            continue
        rows.append((record, label))
    if unlabeled:
        notes.append(f"left out {unlabeled} images without a label")
    if not rows:
        raise RunError(f"no labelled images left in {source.location} after --label-map/--classes")
    ids = [r.id for r, _ in rows]
    y = np.array([label for _, label in rows])
    class_names = sorted(set(y.tolist()))
    if len(class_names) < 2:
        raise RunError(f"only one class ({class_names[0]}) in {source.location}; need at least two")
    splits = np.array([r.split or "" for r, _ in rows]) if source.has_splits else None
    X = entry.read(pool, ids)
    finite = np.isfinite(X.reshape(len(X), -1)).all(axis=1)
    if not finite.all():
        raise RunError(f"{int((~finite).sum())} images have NaN/Inf features in {entry.path} (first: "
                       f"{ids[int(np.argmin(finite))]}): the cache is damaged. Run `featcache verify --repair "
                       f"{entry.path}`, then `featcache extract` again")
    state = entry.state()
    sha256 = [state[i].sha256 for i in ids]
    duplicates = None
    if audit or groups == Grouping.near_duplicates.value:
        threshold, calibrated = _threshold(entry, pool, near_dup_threshold)
        duplicates = find_duplicates(X, sha256, threshold, calibrated)
    group_values, grouping = _grouping(source, [r for r, _ in rows], groups, duplicates)
    meta_values, spec = None, []
    columns = [c.strip() for c in meta.split(",") if c.strip()]
    if columns:
        meta_values, spec = encode_meta([r for r, _ in rows], columns, meta_spec, str(source.location))
    return LabeledFeatures(X, y, group_values, splits, ids, class_names, notes, meta_values, spec, sha256,
                           grouping, duplicates, [str(Path(r.path).resolve()) for r, _ in rows])


def _threshold(entry: CacheEntry, pool: str, given: float | None) -> tuple[float, bool]:
    try:
        return threshold_for(entry.manifest["backbone"], pool, given)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def _grouping(source: ImageSource, records: list, mode: str,
              duplicates: DuplicatePairs | None) -> tuple[np.ndarray | None, dict]:
    """Group labels for ``records`` under ``mode`` and a description of where they came from."""
    column = source.group_column
    if mode == Grouping.near_duplicates.value:
        if column:
            raise RunError(f"--groups near-duplicates: {source.location} already has the group column "
                           f"{column!r}; use it (the default) or pass --no-groups, not both")
        groups = duplicate_groups(len(records), duplicates)
        return groups, {"grouped": True, "mode": mode, "column": None,
                        "by": f"near-duplicates, {len(set(groups.tolist()))} groups of {len(records)} images"}
    if mode == Grouping.none.value:
        return None, {"grouped": False, "mode": mode, "column": column, "by": "--no-groups"}
    if column:
        groups = np.array([r.group or f"(image {r.id})" for r in records])  # an empty cell: its own group
        return groups, {"grouped": True, "mode": mode, "column": column, "by": f"column {column!r}"}
    why = "no group column"
    if source.suspect_group_columns:
        why += f"; {', '.join(map(repr, source.suspect_group_columns))} may be one: pass --group-col NAME"
    return None, {"grouped": False, "mode": mode, "column": None, "by": why,
                  "suspects": list(source.suspect_group_columns)}


@dataclass(frozen=True)
class Layout:
    """How a row of features is laid out: image features (per view), then metadata columns."""

    image_dim: int
    views: bool = False  # rows are (views, dim) blocks: wrap the pipeline in a ViewEnsemble
    meta_numeric: int = 0
    meta_categorical: int = 0

    @classmethod
    def of(cls, data: LabeledFeatures) -> Layout:
        kinds = [c["kind"] for c in data.meta_spec]
        return cls(int(data.X.shape[-1]), data.X.ndim == 3, kinds.count("numeric"), kinds.count("categorical"))


def with_meta(X: np.ndarray, meta: np.ndarray | None) -> np.ndarray:
    """Image features ``X`` with the metadata columns appended (repeated for every view)."""
    if meta is None:
        return X
    meta = meta.astype(X.dtype)
    if X.ndim == 3:
        meta = np.repeat(meta[:, None, :], X.shape[1], axis=1)
    return np.concatenate([X, meta], axis=-1)
