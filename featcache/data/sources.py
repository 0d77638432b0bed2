"""Image sources: an ImageFolder tree, a CSV manifest (generic, HAM10000, ISIC one-hot) or an .npz.

A source lists images with a stable id; labels, groups, splits and metadata stay here and are read
again at fit time, so one extraction serves many label sets.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import SourceError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
IMAGE_COLUMNS = ("path", "image_path", "filepath", "file", "filename", "image", "image_name")
LABEL_COLUMNS = ("label", "dx", "class", "diagnosis", "target", "y")
# Columns that say which images belong together (one lesion, patient or case): CV keeps each
# group on one side. Matched case-insensitively, in this order; `--group-col NAME` names another.
GROUP_COLUMNS = ("group", "group_id", "lesion_id", "lesion", "patient_id", "patient", "patientid", "case_id",
                 "case", "subject_id", "subject", "participant_id", "participant", "study_id", "individual_id")
SPLIT_COLUMNS = ("split", "partition", "subset")
ID_COLUMNS = ("image_id", "id", "isic_id")
# The seven HAM10000 / ISIC 2018 diagnoses; their one-hot columns mark the ISIC ground-truth form.
ISIC_ONE_HOT = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC", "AK", "SCC", "UNK")
NPZ_SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image of a source. ``path`` is the file to stat/hash (the .npz itself for arrays)."""

    id: str
    path: Path
    label: str | None = None
    group: str | None = None
    split: str | None = None
    npz_key: tuple[str, int] | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageSource:
    """A parsed data source. ``notes`` lists rows that were skipped or look wrong, by row."""

    name: str
    location: Path
    kind: str
    records: list[ImageRecord]
    notes: list[str] = field(default_factory=list)
    group_column: str | None = None  # the column the groups came from ("npz splits" etc. have none)
    # columns that look like groups (ids shared by several images) but were not recognised as such
    suspect_group_columns: list[str] = field(default_factory=list)

    @property
    def has_groups(self) -> bool:
        return any(r.group for r in self.records)

    @property
    def has_splits(self) -> bool:
        return any(r.split for r in self.records)

    def by_id(self) -> dict[str, ImageRecord]:
        return {r.id: r for r in self.records}


def slug(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")
    return cleaned or "data"


def source_name(data: str | os.PathLike) -> str:
    """The dataset name a source's features are cached under, from its path alone: the folder's
    name, or the CSV's folder (plus the CSV's name unless it is labels/metadata), or the .npz's."""
    path = Path(data).expanduser()
    if path.is_dir() and (path / "labels.csv").is_file():
        path = path / "labels.csv"
    if path.suffix.lower() == ".csv":
        name = path.parent.resolve().name
        return slug(name if path.stem.lower() in ("labels", "metadata") else f"{name}-{path.stem}")
    if path.suffix.lower() == ".npz":
        return slug(path.stem)
    return slug(path.resolve().name)


def open_source(
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    image_col: str | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
    labels_required: bool = True,
) -> ImageSource:
    """Open ``data`` (folder, CSV or .npz) as an :class:`ImageSource`.

    A folder holding a ``labels.csv`` is read through that CSV (so groups and splits are kept);
    any other folder must have one sub-folder per class. ``labels_required=False``: a CSV without a
    label column is read too (new images to predict).
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise SourceError(f"--data {path}: no such file or folder")
    manifest = path / "labels.csv" if path.is_dir() else path
    if manifest.is_file() and manifest.suffix.lower() == ".csv":
        return read_csv_source(manifest, images, image_col, label_col, group_col, labels_required)
    if group_col:
        raise SourceError(f"--group-col {group_col}: {path} has no columns (only a CSV manifest has); "
                          "write a CSV with an image, a label and a group column")
    if path.is_dir():
        return read_image_folder(path)
    if path.suffix.lower() == ".npz":
        return read_npz_source(path)
    raise SourceError(
        f"--data {path}: expected a folder of class sub-folders, a .csv manifest or an .npz file"
    )


def open_test_source(
    test_data: str | os.PathLike,
    *,
    image_col: str | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
) -> ImageSource:
    """Open a held-out set. The training data's ``image_col`` and ``label_col`` apply to it where its CSV has
    columns of those names (a second export of the same spreadsheet); where it has not, its own columns are
    recognised as for any CSV. ``group_col``: its own group column (``--test-group-col``)."""
    path = Path(test_data).expanduser()
    manifest = path / "labels.csv" if path.is_dir() else path
    columns: set[str] = set()
    if manifest.is_file() and manifest.suffix.lower() == ".csv":
        try:
            with open(manifest, newline="", encoding="utf-8-sig") as handle:
                header = handle.readline()
            columns = {column_key(c) for c in next(csv.reader([header], delimiter=_delimiter(header)), [])}
        except (OSError, UnicodeDecodeError):
            pass  # open_source says what is wrong with the file

    def shared(column: str | None) -> str | None:
        return column if column and column_key(column) in columns else None

    source = open_source(path, image_col=shared(image_col), label_col=shared(label_col), group_col=group_col)
    for flag, column in (("--image-col", image_col), ("--label-col", label_col)):
        if column and shared(column) is None:  # said: the user named a column this file does not have
            source.notes.append(f"{path} has no column {column!r} ({flag} of the training data): its own "
                                "column was recognised as for any CSV")
    return source


def read_image_folder(root: Path) -> ImageSource:
    """ImageFolder layout: ``root/<class>/<image>``; the id is the path relative to ``root``."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    records: list[ImageRecord] = []
    for class_dir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for filename in sorted(filenames):
                file = Path(dirpath) / filename
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    rel = file.relative_to(root).as_posix()
                    records.append(ImageRecord(id=rel, path=file, label=class_dir.name))
    if not records:
        raise SourceError(
            f"--data {root}: no images found; expected one sub-folder per class holding "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} files (or a labels.csv beside them)"
        )
    return ImageSource(name=source_name(root), location=root, kind="folder", records=records)


def column_key(name: str) -> str:
    """How a column is looked up: any case, and blind to the stray spaces spreadsheet exports leave in
    headers (``'Befund '`` is ``--label-col befund``)."""
    return name.strip().casefold()


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
          csv_path: Path) -> str | None:
    lower = {column_key(c): c for c in columns}
    if wanted:
        if wanted in columns:
            return wanted
        if column_key(wanted) in lower:
            return lower[column_key(wanted)]
        raise SourceError(f"{csv_path}: no column {wanted!r} for the {what}; columns are {', '.join(columns)}")
    for candidate in candidates:
        if candidate in lower:
            return lower[candidate]
    return None


def _group_column(columns: list[str], rows: list[dict], wanted: str | None,
                  csv_path: Path) -> tuple[str | None, str | None]:
    """The column that groups the images, and what to say of the choice. ``--group-col`` decides; else, of the
    group-like columns (:data:`GROUP_COLUMNS`), the coarsest: the one whose groups contain every other's (a patient
    column over a lesion column, so one patient's lesions stay on one side of every split). Where they cross, the
    one with the fewest groups, said loudly: images of one group of another column can then sit on both sides."""
    if wanted:
        return _pick(columns, wanted, GROUP_COLUMNS, "group", csv_path), None
    by_key = {column_key(c): c for c in columns}
    found = list(dict.fromkeys(by_key[c] for c in GROUP_COLUMNS if c in by_key))
    if len(found) < 2:
        return (found[0] if found else None), None
    values = {c: [(row.get(c) or "").strip() for row in rows] for c in found}
    count = {c: len({v for v in values[c] if v}) for c in found}
    found = [c for c in found if count[c]]  # an empty column groups nothing
    if len(found) < 2:
        return (found[0] if found else None), None

    def contains(coarse: str, fine: str) -> bool:  # every group of ``fine`` within one group of ``coarse``
        parent: dict[str, str] = {}
        # an image without a coarse value is a group of its own there
        return all(parent.setdefault(f, c or f"\0{k}") == (c or f"\0{k}")
                   for k, (f, c) in enumerate(zip(values[fine], values[coarse], strict=True)) if f)

    coarsest = [c for c in found if all(contains(c, other) for other in found if other != c)]
    others = ", ".join(repr(c) for c in found if c != (coarsest or [None])[0])
    if coarsest:
        chosen = coarsest[0]
        return chosen, (f"{csv_path.name}: grouped by {chosen!r} ({count[chosen]} groups), whose groups contain "
                        f"those of {others}: images of one {chosen} stay on one side of every split "
                        "(--group-col NAME to choose another)")
    chosen = min(found, key=lambda c: count[c])
    others = ", ".join(repr(c) for c in found if c != chosen)
    return chosen, (f"{csv_path.name}: the group columns {', '.join(repr(c) for c in found)} cross (neither's groups "
                    f"contain the other's); grouped by {chosen!r}, the one with the fewest groups "
                    f"({count[chosen]}), so images of one group of {others} can sit on both sides of a split; pass "
                    "--group-col NAME to choose")


def _index_images(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for every image below ``folder`` (HAM/ISIC forms list ids, not paths)."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, filenames in os.walk(folder):
        for filename in filenames:
            file = Path(dirpath) / filename
            if file.suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(file.stem, file)
    return index


def _delimiter(header: str) -> str:
    """The header's field separator: a comma, or the semicolon or tab of spreadsheet exports in locales
    that write decimal commas."""
    return next((d for d in (",", ";", "\t") if d in header), ",")


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict]]:
    """A CSV's columns and rows (its delimiter sniffed from the header; a BOM dropped)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=_delimiter(handle.readline()))
            handle.seek(0)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{csv_path}: cannot be read as CSV ({exc})") from None
    if not columns:
        raise SourceError(f"{csv_path}: empty CSV (no header row)")
    return columns, rows


def _row_label(row: dict, one_hot: list[str] | None, label_column: str | None, where: str, image_id: str,
               notes: list[str]) -> str | None:
    """A row's label: its one ISIC one-hot column set (``one_hot``), or its label cell; None (said in ``notes``
    when something was expected) without one."""
    if one_hot is not None:
        hot = [c for c in one_hot if _truthy(row.get(c))]
        if len(hot) != 1:
            notes.append(f"{where}: {len(hot)} one-hot labels set, image kept without label")
        return hot[0].lower() if len(hot) == 1 else None
    if label_column is None:
        return None
    label = (row.get(label_column) or "").strip() or None
    if label is None:
        notes.append(f"{where}: empty label for {image_id}; kept for extraction, left out of fits")
    return label


def read_csv_source(
    csv_path: Path,
    images: str | os.PathLike | None = None,
    image_col: str | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
    labels_required: bool = True,
) -> ImageSource:
    """Read a CSV manifest; recognises the HAM10000 metadata and ISIC one-hot ground-truth forms.
    ``labels_required=False``: without a label column every image is unlabelled (for predict)."""
    csv_path = Path(csv_path)
    base = Path(images).expanduser() if images else csv_path.parent
    columns, rows = _read_rows(csv_path)

    upper = {c.upper(): c for c in columns}
    one_hot = [upper[c] for c in ISIC_ONE_HOT if c in upper]
    # every column asked for that is not there, named at once (not one per try)
    absent = [f"{wanted!r} ({flag})" for flag, wanted in (("--image-col", image_col), ("--label-col", label_col),
                                                         ("--group-col", group_col))
              if wanted and column_key(wanted) not in {column_key(c) for c in columns}]
    if absent:
        raise SourceError(f"{csv_path}: no column {' and no column '.join(absent)}; its columns are "
                          f"{', '.join(columns)}")
    image_column = _pick(columns, image_col, IMAGE_COLUMNS, "image", csv_path)
    id_column = _pick(columns, None, ID_COLUMNS, "id", csv_path)
    label_column = _pick(columns, label_col, LABEL_COLUMNS, "label", csv_path)
    group_column, grouping_note = _group_column(columns, rows, group_col, csv_path)
    split_column = _pick(columns, None, SPLIT_COLUMNS, "split", csv_path)

    kind = "csv"
    stem_index: dict[str, Path] | None = None
    if label_column is None and len(one_hot) >= 2:
        kind = "isic-onehot"
    elif id_column and label_column and label_column.lower() == "dx" and group_column:
        kind = "ham10000"
    missing = []
    if image_column is None and id_column is None:
        missing.append(f"no image column (expected one of {', '.join(IMAGE_COLUMNS + ID_COLUMNS)}: pass "
                       "--image-col NAME)")
    if label_column is None and kind != "isic-onehot" and labels_required:
        missing.append(f"no label column (expected one of {', '.join(LABEL_COLUMNS)} or ISIC one-hot columns: "
                       "pass --label-col NAME)")
    if missing:
        raise SourceError(f"{csv_path}: {'; and '.join(missing)}; its columns are {', '.join(columns)}")
    if image_column is None:
        image_column = id_column
        stem_index = _index_images(base)  # ids such as ISIC_0024306 name files below --images
    meta_columns = [c for c in columns if c not in {image_column, id_column, label_column,
                                                    group_column, split_column, *one_hot}]

    records: list[ImageRecord] = []
    notes: list[str] = [grouping_note] if grouping_note else []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        raw = (row.get(image_column) or "").strip()
        if not raw:
            notes.append(f"{csv_path.name} line {line}: empty {image_column!r} cell, row skipped")
            continue
        file = Path(raw) if Path(raw).is_absolute() else base / raw
        if stem_index is None and Path(raw).suffix.lower() not in IMAGE_SUFFIXES:
            stem_index = _index_images(base)  # ISIC-style ids without an extension
        if stem_index is not None and not file.is_file():
            file = stem_index.get(Path(raw).stem, file)
        image_id = (row.get(id_column) or "").strip() if id_column else ""
        image_id = image_id or raw
        if image_id in seen:
            notes.append(f"{csv_path.name} line {line}: duplicate of line {seen[image_id]} "
                         f"(id {image_id}), ignored")
            continue
        seen[image_id] = line
        label = _row_label(row, one_hot if kind == "isic-onehot" else None, label_column,
                           f"{csv_path.name} line {line}", image_id, notes)
        group = (row.get(group_column) or "").strip() or None if group_column else None
        split = (row.get(split_column) or "").strip() or None if split_column else None
        meta = {c: row.get(c) or "" for c in meta_columns}
        records.append(ImageRecord(image_id, file, label, group, split, meta=meta))
    if not records:
        raise SourceError(f"{csv_path}: no usable rows")
    empty_groups = sum(1 for r in records if group_column and not r.group)
    if empty_groups:
        notes.append(f"{csv_path.name}: {empty_groups} rows have an empty {group_column!r}; each of those "
                     "images is its own group")
    suspects = [] if group_column else _suspect_group_columns(records, meta_columns)
    return ImageSource(name=source_name(csv_path), location=csv_path, kind=kind, records=records, notes=notes,
                       group_column=group_column, suspect_group_columns=suspects)


CONTENT_HASH_WORDS = {"md", "sha", "hash", "checksum", "digest", "crc"}
GROUP_WORDS = {"id", "ids", "patient", "lesion", "case", "subject", "participant", "group", "individual", "mole"}


def _suspect_group_columns(records: list[ImageRecord], columns: list[str]) -> list[str]:
    """Columns whose values look like ids shared by a few images each: a patient or lesion column
    under a name featcache does not know. A column counts when some of its values repeat, it has
    many distinct values (not sex or body site), and either a word of its name says id, patient,
    lesion, case … (``PatientNo``, ``mole_ref``; not ``width``) or its values are not numbers."""
    n = len(records)
    suspects = []
    for column in columns:
        values = [r.meta.get(column, "").strip() for r in records]
        filled = [v for v in values if v]
        distinct = set(filled)
        if len(filled) < n * 0.5 or len(distinct) == len(filled) or len(distinct) < max(3, n // 20):
            continue
        words = set(re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", column).lower()))
        if words & CONTENT_HASH_WORDS:  # a file checksum: shared only by byte-identical copies, not a patient
            continue
        numeric = all(is_number(v) for v in filled)
        if words & GROUP_WORDS or (not numeric and len(distinct) > n // 4):
            suspects.append(column)
    return suspects


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _truthy(value: str | None) -> bool:
    try:
        return float(value or 0) >= 0.5
    except ValueError:
        return False


def read_npz_source(npz_path: Path) -> ImageSource:
    """MedMNIST-style arrays: ``<split>_images`` (N,H,W[,C]) uint8 and ``<split>_labels`` (N[,1])."""
    try:
        arrays = np.load(npz_path, allow_pickle=False)
        keys = set(arrays.files)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{npz_path}: not a readable .npz ({exc})") from None
    records: list[ImageRecord] = []
    for split in NPZ_SPLITS:
        image_key, label_key = f"{split}_images", f"{split}_labels"
        if image_key not in keys:
            continue
        n_images = arrays[image_key].shape[0]
        if label_key in keys and arrays[label_key].shape[0] != n_images:
            raise SourceError(
                f"{npz_path}: {image_key} has {n_images} images but {label_key} has "
                f"{arrays[label_key].shape[0]} labels; fix the file so the lengths match"
            )
        labels = arrays[label_key].reshape(n_images, -1) if label_key in keys else None
        for i in range(n_images):
            label = None if labels is None else "_".join(str(int(v)) for v in labels[i])
            records.append(ImageRecord(f"{split}/{i:06d}", npz_path, label, None, split,
                                       npz_key=(image_key, i)))
    if not records:
        raise SourceError(f"{npz_path}: no <split>_images arrays (found {sorted(keys)}); "
                          "expected train_images/train_labels, val_*, test_*")
    return ImageSource(name=source_name(npz_path), location=npz_path, kind="npz", records=records)


MISSING_VALUE = "(missing)"  # a metadata cell left empty, as a subgroup of its own


def reading_order(value: str) -> tuple:
    """Subgroups as a reader expects them: numbers and bands by their value (``[5, 45)`` before ``[45, 50)``,
    Fitzpatrick ``2`` before ``10``), then names alphabetically, ``(missing)`` last."""
    text = str(value)
    number = text[1:].split(",")[0] if text.startswith("[") else text
    if is_number(number):
        return (0, float(number), text)
    return (1 + (text == MISSING_VALUE), 0.0, text)


def in_reading_order(groups: dict) -> list[tuple[str, dict]]:
    """A column's ``{value: scores}`` as ``(value, scores)`` pairs in :func:`reading_order` (metrics.json keeps
    its keys sorted as text, where ``[5, 45)`` would follow ``[45, 50)``)."""
    return sorted(groups.items(), key=lambda item: reading_order(item[0]))


def file_state(record: ImageRecord) -> tuple[int, int]:
    """(size, mtime_ns) of the record's file; (-1, -1) when it does not exist."""
    try:
        st = os.stat(record.path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def read_record(record: ImageRecord, npz_cache: dict) -> tuple[bytes | np.ndarray, str]:
    """The record's raw content and its SHA-256 (of the file bytes, or of the array for .npz)."""
    if record.npz_key is None:
        data = Path(record.path).read_bytes()
        return data, hashlib.sha256(data).hexdigest()
    key, index = record.npz_key
    arrays = npz_cache.setdefault(str(record.path), np.load(record.path, allow_pickle=False))
    pixels = np.ascontiguousarray(arrays[key][index])
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode() + pixels.tobytes())
    return pixels, digest.hexdigest()
