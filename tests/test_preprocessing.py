"""--preprocess: hair removal (DullRazor) and colour constancy (Shades of Gray) before the backbone."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from featcache.backbones import load_backbone
from featcache.cli import app
from featcache.extract import extract
from featcache.pipeline import find_entry
from featcache.preprocessing import checked_filters, remove_hair, shades_of_gray
from featcache.sources import open_source


def test_filter_names_are_checked():
    assert checked_filters("hair-removal, color-constancy") == ("hair-removal", "color-constancy")
    with pytest.raises(ValueError, match="choose from hair-removal, color-constancy"):
        checked_filters("hair-removel")
    with pytest.raises(ValueError, match="dataset-norm: per-dataset mean/std normalisation is not available yet"):
        checked_filters("dataset-norm")
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


def test_filters_make_their_own_entry_and_fit_never_takes_it_by_default(small_folder, tmp_path):
    lite0 = load_backbone("efficientnet_lite0")
    source = open_source(small_folder)
    plain = extract(source, lite0, cache_root=tmp_path, workers=0).entry
    filtered = extract(source, load_backbone("efficientnet_lite0"), cache_root=tmp_path, workers=0,
                       preprocess="hair-removal,color-constancy").entry
    assert filtered.fingerprint != plain.fingerprint and filtered.filters == ("hair-removal", "color-constancy")
    assert "filters" not in plain.manifest["fingerprint_inputs"]["preprocess"]  # old names kept
    assert plain.fingerprint == "0e1ebd8d300e6c4f"
    assert not np.allclose(plain.read("gap"), filtered.read("gap", plain.ids))
    assert find_entry(tmp_path, source, "efficientnet_lite0", None).path == plain.path  # filtered one is newer
    assert find_entry(tmp_path, source, "efficientnet_lite0", None,
                      filters=("hair-removal", "color-constancy")).path == filtered.path
    out = CliRunner().invoke(app, ["extract", "--data", str(small_folder), "--preprocess", "dataset-norm"])
    assert out.exit_code == 2 and "not available yet" in out.output

