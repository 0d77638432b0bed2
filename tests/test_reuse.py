"""One extraction per image: a moved, relabelled or subset CSV reuses the features already in the cache."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from featcache.data.sources import open_source
from featcache.extraction.extract import extract
from featcache.recipes import ExecutionPlan, FeatureRecipe


def test_a_moved_relabelled_subset_csv_extracts_only_new_images(small_folder, tmp_path, lite0):
    cache = tmp_path / "cache"
    first = extract(open_source(small_folder), lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    assert first.extracted == 12 and first.reused == 0
    images = sorted(small_folder.rglob("*.jpg"))
    moved = tmp_path / "elsewhere" / "copies"
    moved.mkdir(parents=True)
    rows = []
    for k, image in enumerate(images[:8]):  # a subset, copied to other names, other labels
        target = moved / f"photo {k}, copy.jpg"
        shutil.copy(image, target)
        rows.append([target.name, "benign" if k % 2 else "malignant", f"odd id #{k}"])
    new_image = moved / "new.jpg"
    Image.open(images[0]).convert("RGB").rotate(90).save(new_image)
    rows.append([new_image.name, "benign", "odd id #new"])
    with open(moved / "my list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["File", "Diagnosis", "image_id"])
        writer.writerows(rows)
    source = open_source(moved / "my list.csv")
    assert source.name != first.entry.manifest["dataset"]  # another dataset, another entry
    second = extract(source, lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    assert second.entry.path != first.entry.path and second.entry.fingerprint == first.entry.fingerprint
    assert second.reused == 8 and second.extracted == 1 and "8 reused from other entries" in second.summary()
    original_ids = [p.relative_to(small_folder).as_posix() for p in images[:8]]
    np.testing.assert_array_equal(second.entry.read("gap", [f"odd id #{k}" for k in range(8)], dtype="float16"),
                                  first.entry.read("gap", original_ids, dtype="float16"))
    again = extract(source, lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    assert again.extracted == 0 and again.reused == 0 and again.skipped == 9


@pytest.mark.slow
def test_other_settings_are_never_reused(small_folder, tmp_path, lite0):
    cache = tmp_path / "cache"
    extract(open_source(small_folder), lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    copy = tmp_path / "copy"
    shutil.copytree(small_folder, copy)
    other = extract(open_source(copy), lite0, cache_root=cache, recipe=FeatureRecipe(views=2),
                    plan=ExecutionPlan(workers=0))  # another fingerprint
    assert other.reused == 0 and other.extracted == 12
    same = extract(open_source(copy), lite0, cache_root=cache, plan=ExecutionPlan(workers=0))
    assert same.reused == 12 and same.extracted == 0


@pytest.mark.slow
def test_backbone_fusion_fits_and_predicts_on_both_backbones_side_by_side(small_folder, tmp_path, lite0):
    from typer.testing import CliRunner

    from featcache.cli import app
    from featcache.store.model_files import load_model
    from featcache.store.runs import read_metrics

    cache = tmp_path / "cache"
    source = open_source(small_folder)
    entries = [extract(source, lite0, cache_root=cache, plan=ExecutionPlan(workers=0)).entry,
               extract(source, "squeezenet1_1", cache_root=cache, plan=ExecutionPlan(workers=0)).entry]
    runner = CliRunner()
    out = runner.invoke(app, ["fit", "--data", str(small_folder), "--cache", str(cache), "--backbone",
                              "efficientnet_lite0+squeezenet1_1", "--head", "logreg", "--cv", "3", "--no-groups"])
    assert out.exit_code == 0, out.output
    (run,) = (entries[0].path / "runs").glob("logreg-*")
    config = read_metrics(run)["config"]
    assert config["backbone"] == "efficientnet_lite0+squeezenet1_1" and config["pool"] == "gap+gap"
    saved = load_model(run)
    assert saved["pipeline"].named_steps["scale"].n_features_in_ == 1280 + 512
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(sorted(small_folder.rglob("*.jpg"))[0], new / "again.jpg")
    preds = tmp_path / "p.csv"
    out = runner.invoke(app, ["predict", "--run", str(run), str(new), "--out", str(preds), "--cache", str(cache)])
    assert out.exit_code == 0, out.output
    (row,) = list(csv.DictReader(open(preds, newline="")))
    assert row["similarity"] == "1.0000" and row["predicted"] in ("melanoma", "nevus")
    two_views = extract(open_source(small_folder), "squeezenet1_1", cache_root=tmp_path / "other",
                        recipe=FeatureRecipe(views=2), plan=ExecutionPlan(workers=0)).entry
    from featcache.errors import RunError
    from featcache.store.fusion import FusedEntry

    with pytest.raises(RunError, match="different numbers of views"):
        FusedEntry([(entries[0], "gap"), (two_views, "gap")])
