"""--preprocess: hair removal (DullRazor) and colour constancy (Shades of Gray) before the backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from featcache.backbones.models import load_backbone
from featcache.cli import app
from featcache.data.preprocessing import checked_filters, remove_hair, shades_of_gray
from featcache.data.sources import open_source
from featcache.errors import FeatcacheError
from featcache.evaluation.fitting import EntrySelection, find_entry
from featcache.extraction.extract import extract, extract_like
from featcache.recipes import ExecutionPlan, FeatureRecipe


def test_filter_names_are_checked():
    assert checked_filters("hair-removal, color-constancy") == ("hair-removal", "color-constancy")
    with pytest.raises(ValueError, match="choose from hair-removal, color-constancy, dataset-norm"):
        checked_filters("hair-removel")
    assert checked_filters("color-constancy,dataset-norm") == ("color-constancy", "dataset-norm")
    with pytest.raises(ValueError, match="dataset-norm must come last"):
        checked_filters("dataset-norm,hair-removal")
    with pytest.raises(ValueError, match="named twice"):
        checked_filters("color-constancy,color-constancy")


def test_shades_of_gray_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    scene = rng.uniform(60, 160, size=(64, 64, 1)).repeat(3, axis=2)  # grey world
    cast = np.clip(scene * np.array([1.4, 1.0, 0.7]), 0, 255).astype(np.uint8)
    corrected = shades_of_gray(cast).astype(float)
    means = corrected.reshape(-1, 3).mean(axis=0)
    assert np.ptp(cast.reshape(-1, 3).mean(axis=0)) > 40 and np.ptp(means) < 0.1 * means.mean()


def test_hair_removal_fills_thin_dark_lines(photo):
    skin = np.asarray(photo.resize((200, 150))).copy()
    hairy = skin.copy()
    for row in (40, 75, 110):
        hairy[row:row + 2, 20:180] = 15  # dark hairs, two pixels thick
    cleaned = remove_hair(hairy)
    lines = np.zeros(hairy.shape[:2], bool)
    for row in (40, 75, 110):
        lines[row:row + 2, 20:180] = True
    before = np.abs(hairy[lines].astype(int) - skin[lines]).mean()
    after = np.abs(cleaned[lines].astype(int) - skin[lines]).mean()
    assert after < 0.3 * before


@pytest.mark.slow
def test_filters_make_their_own_entry_and_fit_never_takes_it_by_default(small_folder, tmp_path):
    lite0 = load_backbone("efficientnet_lite0")
    source = open_source(small_folder)
    plain = extract(source, lite0, cache_root=tmp_path, recipe=FeatureRecipe(engine="torch"),
                    plan=ExecutionPlan(workers=0)).entry
    filtered = extract(source, load_backbone("efficientnet_lite0"), cache_root=tmp_path,
                       recipe=FeatureRecipe(preprocess="hair-removal,color-constancy", engine="torch"),
                       plan=ExecutionPlan(workers=0)).entry
    assert filtered.fingerprint != plain.fingerprint and filtered.filters == ("hair-removal", "color-constancy")
    assert "filters" not in plain.manifest["fingerprint_inputs"]["preprocess"]  # old names kept
    assert plain.fingerprint == "0e1ebd8d300e6c4f"  # the name it had before filters, engines and resamplers
    assert not np.allclose(plain.read("gap"), filtered.read("gap", plain.ids))
    assert find_entry(tmp_path, source, EntrySelection("efficientnet_lite0")).path == plain.path  # filtered is newer
    assert find_entry(tmp_path, source, EntrySelection("efficientnet_lite0", preprocess=(
        "hair-removal", "color-constancy"))).path == filtered.path
    out = CliRunner().invoke(app, ["extract", "--data", str(small_folder), "--preprocess", "dataset-nrom"])
    assert out.exit_code == 2 and "dataset-nrom" in out.output


def _subset_csv(folder: Path, path: Path, names: list[str]) -> Path:
    rows = [f"{p.relative_to(path.parent)},{p.parent.name}" for p in sorted(folder.rglob("*.jpg")) if p.name in names]
    path.write_text("filepath,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_dataset_norm_uses_the_datasets_own_statistics_once_and_the_training_sets_for_other_data(
        small_folder, tmp_path):
    source = open_source(small_folder)
    lite0 = load_backbone("efficientnet_lite0")
    normed = extract(source, lite0, cache_root=tmp_path, recipe=FeatureRecipe(preprocess="dataset-norm"),
                     plan=ExecutionPlan(workers=0))
    entry = normed.entry
    stats = entry.manifest["fingerprint_inputs"]["preprocess"]
    # the mean and std are the images' own, computed over the 224 px crops the backbone sees
    crops = []
    for record in source.records:
        crops.append(lite0.preprocess.to_uint8(Image.open(record.path).convert("RGB")).double() / 255)
    pixels = torch.stack(crops).permute(1, 0, 2, 3).reshape(3, -1)
    assert np.allclose(stats["mean"], pixels.mean(dim=1).numpy(), atol=1e-4)
    assert np.allclose(stats["std"], pixels.std(dim=1, correction=0).numpy(), atol=1e-4)
    assert stats["mean"] != list(load_backbone("efficientnet_lite0").preprocess.mean)
    assert entry.manifest["dataset_norm"] == {"from": "folder", "images": 12}
    assert entry.fingerprint != "0e1ebd8d300e6c4f" and entry.filters == ("dataset-norm",)
    # a rerun reads the stored statistics and resumes the same entry
    again = extract(source, load_backbone("efficientnet_lite0"), cache_root=tmp_path,
                    recipe=FeatureRecipe(preprocess="dataset-norm"), plan=ExecutionPlan(workers=0))
    assert again.entry.path == entry.path and again.extracted == 0
    # another dataset (a test set): fit --test-data and predict normalise it with the training statistics
    test_csv = _subset_csv(small_folder, tmp_path / "held out.csv", [r.path.name for r in source.records[:3]])
    # newer statistics of the training set (images were added since) must not change how its entry's
    # test data is normalised: extract_like takes the entry's own
    newer = json.loads(next(tmp_path.glob("folder/.dataset-norm-*.json")).read_text())
    newer.update(mean=[0.1, 0.2, 0.3], date="2999-01-01T00:00:00+00:00")
    planted = tmp_path / "folder" / ".dataset-norm-0000000000000000.json"
    planted.write_text(json.dumps(newer))
    test = extract_like(open_source(test_csv), entry, tmp_path).entry
    planted.unlink()  # --norm-from NAME below takes the newest statistics of NAME, as it should
    assert test.fingerprint == entry.fingerprint and test.manifest["dataset_norm"]["from"] == "folder"
    same_images = [i.removeprefix("folder/") for i in test.ids]
    assert np.allclose(test.read("gap"), entry.read("gap", same_images), atol=1e-3)
    own = extract(open_source(test_csv), load_backbone("efficientnet_lite0"), cache_root=tmp_path,
                  recipe=FeatureRecipe(preprocess="dataset-norm"), plan=ExecutionPlan(workers=0)).entry
    assert own.fingerprint != entry.fingerprint  # its own statistics: a different entry, never mixed up
    with pytest.raises(FeatcacheError, match="--norm-from nowhere: no dataset-norm statistics"):
        extract(source, load_backbone("efficientnet_lite0"), cache_root=tmp_path,
                recipe=FeatureRecipe(preprocess="dataset-norm", norm_from="nowhere"), plan=ExecutionPlan(workers=0))
    with pytest.raises(FeatcacheError, match="only with --preprocess"):
        extract(source, load_backbone("efficientnet_lite0"), cache_root=tmp_path,
                recipe=FeatureRecipe(norm_from="folder"), plan=ExecutionPlan(workers=0))
    out = CliRunner().invoke(app, ["extract", "--data", str(test_csv), "--preprocess", "dataset-norm",
                                   "--norm-from", str(small_folder), "--cache", str(tmp_path), "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert f"efficientnet_lite0-{entry.fingerprint}" in out.output

