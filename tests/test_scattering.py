"""--backbone scattering: Kymatio's 2-D wavelet scattering transform as a weight-free backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from featcache.backbones.catalog import get_spec
from featcache.backbones.models import load_backbone
from featcache.backbones.scattering_family import scattering_channels
from featcache.cli import app
from featcache.data.images import decode_rgb
from featcache.data.sources import open_source
from featcache.errors import FeatcacheError, WeightsUnavailable
from featcache.extraction.extract import extract
from featcache.recipes import ExecutionPlan, FeatureRecipe


def test_names_choose_j_and_l_and_bad_ones_are_refused():
    assert get_spec("scattering").scattering == (3, 8)
    assert get_spec("scattering").dims == {"gap": 3 * 217, "log": 3 * 217}
    assert scattering_channels(2, 6) == 1 + 12 + 36
    assert get_spec("scattering_j2_l6").dims["log"] == 3 * 49
    assert get_spec("scattering_j3_l8").name == "scattering"  # one name, one entry folder
    with pytest.raises(WeightsUnavailable, match="scattering_j<J>_l<L>"):
        get_spec("scattering_J2")
    with pytest.raises(WeightsUnavailable, match="J must be 1..6"):
        get_spec("scattering_j9_l8")


@pytest.mark.slow
def test_features_are_kymatios_spatially_averaged_coefficients(small_folder, tmp_path):
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    source = open_source(small_folder)
    model = load_backbone("scattering_j2_l4", pools=("gap", "log"))
    assert model.weights_origin.startswith("none: Kymatio") and model.preprocess.mean == (0.0, 0.0, 0.0)
    entry = extract(source, model, cache_root=tmp_path, recipe=FeatureRecipe(dtype="float32"),
                    plan=ExecutionPlan(workers=0)).entry
    record = source.records[0]
    decoded = decode_rgb(record.path.read_bytes(), model.preprocess.decode_min_side)  # as extraction decodes
    image = model.preprocess.to_uint8(decoded)[None].float() / 255
    coefficients = ScatteringTorch2D(J=2, shape=(112, 112), L=4)(image.contiguous())
    expected = coefficients.mean(dim=(-2, -1)).flatten(1)[0].numpy()
    stored = entry.read("gap", [record.id])[0]
    assert np.allclose(stored, expected, rtol=1e-5, atol=1e-7)
    assert np.allclose(entry.read("log", [record.id])[0], np.log(expected + 1e-6), atol=1e-4)
    # no weights, so nothing random: a second extraction into another cache gives the same bytes
    again = extract(source, load_backbone("scattering_j2_l4", pools=("gap", "log")), cache_root=tmp_path / "b",
                    recipe=FeatureRecipe(dtype="float32"), plan=ExecutionPlan(workers=0)).entry
    assert again.fingerprint == entry.fingerprint
    assert np.array_equal(again.read("log"), entry.read("log"))


@pytest.mark.slow
def test_other_input_sizes_and_refusals(small_folder, tmp_path):
    model = load_backbone("scattering_j2_l4")
    with torch.inference_mode():
        out = model.model(torch.rand(2, 3, 96, 96))  # --input-size 96: filters built for that shape
    assert list(out) == ["gap"] and out["gap"].shape == (2, 3 * scattering_channels(2, 4))
    with pytest.raises(WeightsUnavailable, match="has no weights"):
        load_backbone("scattering", weights="random")
    with pytest.raises(FeatcacheError, match="runs on PyTorch only"):
        extract(open_source(small_folder), model, cache_root=tmp_path, recipe=FeatureRecipe(engine="onnxruntime"),
                plan=ExecutionPlan(workers=0))
    runner = CliRunner()
    out = runner.invoke(app, ["extract", "--backbone", "scattering_j2_l4", "--data", str(small_folder),
                              "--cache", str(tmp_path), "--workers", "0", "-q"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["fit", "--backbone", "scattering_j2_l4", "--data", str(small_folder), "--head",
                              "logreg", "--cv", "3", "--cache", str(tmp_path), "--no-groups"])
    assert out.exit_code == 0, out.output
    assert "scattering_j2_l4" in out.output and "gap" in out.output
