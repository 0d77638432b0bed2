"""Every source format, and clear messages for malformed ones."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.data.sources import open_source
from featcache.errors import SourceError

from .conftest import shared


def test_image_folder(small_folder):
    source = open_source(small_folder)
    assert source.kind == "folder" and len(source.records) == 12
    assert {r.label for r in source.records} == {"melanoma", "nevus"}
    assert source.records[0].id == "melanoma/" + source.records[0].path.name


def test_generic_csv_with_images_dir_and_problems(small_folder, tmp_path):
    files = sorted(small_folder.rglob("*.jpg"))
    lines = ["path,label,group"]
    lines += [f"{f.relative_to(small_folder)},{f.parent.name},g{i // 2}" for i, f in enumerate(files)]
    lines += [lines[1], f"{files[0].relative_to(small_folder)}x,,g9"]  # duplicate row, empty label
    csv_path = tmp_path / "meta" / "my list.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("\n".join(lines) + "\n")
    source = open_source(csv_path, images=small_folder)
    assert len(source.records) == 13 and source.has_groups
    assert any("duplicate of line 2" in n for n in source.notes)
    assert any("empty label" in n for n in source.notes)
    assert source.records[0].path.exists()


def test_a_semicolon_csv_from_a_spreadsheet_reads_like_a_comma_one(small_folder, tmp_path):
    files = sorted(small_folder.rglob("*.jpg"))
    rows = [f"{f.relative_to(small_folder)};{f.parent.name};Patient {i // 3}" for i, f in enumerate(files)]
    (tmp_path / "export.csv").write_text("\ufeffBild;Befund;Patienten-Nr\n" + "\n".join(rows) + "\n", encoding="utf-8")
    source = open_source(tmp_path / "export.csv", images=small_folder, image_col="bild", label_col="befund",
                         group_col="patienten-nr")
    assert len(source.records) == 12 and {r.label for r in source.records} == {"melanoma", "nevus"}
    assert source.group_column == "Patienten-Nr" and source.records[3].group == "Patient 1"


def test_csv_with_wrong_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    # every missing column is named at once, with the flag that names it
    with pytest.raises(SourceError, match=r"bad.csv: no image column .*--image-col NAME\); and no label column "
                                          r".*--label-col NAME\); its columns are foo, bar"):
        open_source(bad)
    with pytest.raises(SourceError, match=r"no column 'pic' \(--image-col\) and no column 'who' \(--group-col\)"):
        open_source(bad, image_col="pic", group_col="who")
    # extraction needs no labels: a CSV of image paths alone is enough
    (tmp_path / "a.jpg").write_bytes(b"")
    paths = tmp_path / "paths.csv"
    paths.write_text("path\na.jpg\n")
    assert [r.label for r in open_source(paths, labels_required=False).records] == [None]


def test_ham10000_metadata_form():
    source = open_source(shared("ham70") / "HAM10000_metadata.csv")
    assert source.kind == "ham10000" and len(source.records) == 70
    record = source.records[0]
    assert record.group.startswith("HAM_") and record.path.exists() and record.meta["localization"]


def test_isic_one_hot_form(small_folder, tmp_path):
    files = sorted(small_folder.rglob("*.jpg"))
    rows = ["image,MEL,NV,BCC"] + [f"{f.stem},{1.0 if 'mel' in f.parent.name else 0.0},"
                                    f"{0.0 if 'mel' in f.parent.name else 1.0},0.0" for f in files]
    gt = tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv"
    gt.write_text("\n".join(rows) + "\n")
    source = open_source(gt, images=small_folder)
    assert source.kind == "isic-onehot"
    assert sorted({r.label for r in source.records}) == ["mel", "nv"]
    assert all(r.path.exists() for r in source.records)


def test_npz_source_and_mismatched_lengths(tmp_path):
    good = tmp_path / "dermamnist.npz"
    rng = np.random.default_rng(0)
    np.savez(good, train_images=rng.integers(0, 255, (6, 28, 28, 3), dtype=np.uint8),
             train_labels=np.array([[0], [1], [0], [1], [0], [1]]),
             test_images=rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8), test_labels=np.array([[0], [1]]))
    source = open_source(good)
    assert [r.id for r in source.records][-1] == "test/000001" and source.has_splits
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(SourceError, match="train_images has 3 images but train_labels has 2"):
        open_source(bad)


def test_missing_data_path():
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source("/nonexistent/place")


def test_a_csv_of_new_images_needs_no_label_column_for_predict(tmp_path, photo):
    photo.save(tmp_path / "a b#1.jpg")
    table = tmp_path / "neu.csv"
    table.write_text("Datei;Alter\na b#1.jpg;51\n")
    with pytest.raises(SourceError, match="no label column"):
        open_source(table, image_col="Datei")
    (record,) = open_source(table, image_col="Datei", labels_required=False).records
    assert record.label is None and record.meta == {"Alter": "51"} and record.path.name == "a b#1.jpg"
