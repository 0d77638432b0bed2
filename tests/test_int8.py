"""--precision int8: the backbone quantized by NNCF, fingerprinted by its calibration, run for held-out sets
with the training entry's quantized model, and refused where it cannot run as asked."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.data.sources import open_source
from featcache.errors import FeatcacheError, RunError
from featcache.extraction.extract import extract, extract_like, name_entry
from featcache.recipes import ExecutionPlan, FeatureRecipe
from featcache.store.naming import engine_int8_path

pytest.importorskip("nncf")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_is_its_own_entry_close_to_fp32_and_held_out_sets_use_the_training_quantization(
        small_folder, tmp_path):
    source = open_source(small_folder)
    fp32 = extract(source, "efficientnet_lite0", cache_root=tmp_path, plan=ExecutionPlan(workers=0)).entry
    int8 = extract(source, "efficientnet_lite0", cache_root=tmp_path, recipe=FeatureRecipe(precision="int8"),
                   plan=ExecutionPlan(workers=0)).entry
    assert int8.fingerprint != fp32.fingerprint
    inputs = int8.manifest["fingerprint_inputs"]
    assert inputs["precision"] == "int8" and inputs["engine"] == "openvino"
    calibration = inputs["calibration"]
    assert calibration["dataset"] == source.name and calibration["images"] == 12
    assert calibration["quantizer"]["nncf"] and calibration["quantizer"]["overflow_fix"] == "disable"
    a, b = fp32.read("gap", fp32.ids), int8.read("gap", fp32.ids)
    assert not np.array_equal(a, b)  # really quantized
    assert _cosine(a, b).mean() > 0.95
    (model,) = list((tmp_path / ".engines").glob("*.int8.xml"))

    # a held-out set: the training entry's quantized model, not one calibrated on the held-out images
    held_out = tmp_path / "held_out" / "nevus"
    held_out.mkdir(parents=True)
    for photo in sorted((small_folder / "nevus").glob("*.jpg"))[:3]:
        shutil.copy(photo, held_out / photo.name)
    test = extract_like(open_source(held_out.parent), int8, tmp_path).entry
    assert test.manifest["fingerprint_inputs"]["calibration"] == calibration
    assert test.fingerprint == int8.fingerprint and list((tmp_path / ".engines").glob("*.int8.xml")) == [model]
    same = [i for i in int8.ids if i.split("/")[-1] in {p.name for p in held_out.glob("*.jpg")}]
    np.testing.assert_array_equal(np.sort(test.read("gap", test.ids), 0), np.sort(int8.read("gap", same), 0))

    # without its quantized model (deleted, another cache) a held-out set is refused, with what to do
    for path in model.parent.glob(model.name.split(".")[0] + ".int8.*"):
        path.unlink()
    other = tmp_path / "other" / "nevus"
    other.mkdir(parents=True)
    # an image no entry has seen (a cached one would be reused without running any model)
    Image.open(next((small_folder / "melanoma").glob("*.jpg"))).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        other / "x.jpg")
    with pytest.raises(FeatcacheError, match=f"calibrated on {source.name} is not in .*extract {source.name} again"):
        extract_like(open_source(other.parent), int8, tmp_path)


def test_other_calibration_images_name_another_entry(small_folder, lite0, tmp_path):
    named = name_entry(open_source(small_folder), lite0, tmp_path, recipe=FeatureRecipe(precision="int8"),
                       plan=ExecutionPlan(device="cpu"))
    photo = sorted((small_folder / "nevus").glob("*.jpg"))[0]
    photo.write_bytes(sorted((small_folder / "melanoma").glob("*.jpg"))[0].read_bytes())
    changed = name_entry(open_source(small_folder), lite0, tmp_path, recipe=FeatureRecipe(precision="int8"),
                         plan=ExecutionPlan(device="cpu"))
    assert changed.fingerprint != named.fingerprint
    assert changed.inputs["calibration"]["sha256"] != named.inputs["calibration"]["sha256"]
    assert engine_int8_path(tmp_path, "efficientnet_lite0", {"a": 1}).name.endswith(".int8.xml")


@pytest.mark.parametrize(("engine", "device", "message"), [
    ("torch", "cpu", "runs on --engine openvino .* not torch"),
    ("onnxruntime", "cpu", "not onnxruntime"),
    ("auto", "cuda", "CPU, not on cuda"),
])
def test_int8_is_refused_where_it_cannot_run_as_asked(small_folder, lite0, tmp_path, engine, device, message,
                                                      monkeypatch):
    import featcache.extraction.extract as stage

    monkeypatch.setattr(stage, "resolve_device", torch.device)  # as on a machine with a GPU
    with pytest.raises(FeatcacheError, match=message):
        name_entry(open_source(small_folder), lite0, tmp_path, FeatureRecipe(precision="int8", engine=engine),
                   ExecutionPlan(device=device))


def test_int8_without_nncf_says_what_to_install(small_folder, lite0, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(FeatcacheError, match=r"pip install 'featcache\[int8\]'"):
        name_entry(open_source(small_folder), lite0, tmp_path, recipe=FeatureRecipe(precision="int8"),
                   plan=ExecutionPlan(device="cpu"))


def test_fit_selects_by_precision_compare_labels_int8_and_export_refuses_it(small_folder, tmp_path):
    import featcache

    common = dict(data=str(small_folder), cache=str(tmp_path), quiet=True)
    featcache.extract(**common, workers=0)
    featcache.extract(**common, workers=0, precision="int8")
    (fp32,) = featcache.fit(**common, heads="logreg", precision="fp32", cv=3)
    (int8,) = featcache.fit(**common, heads="logreg", precision="int8", cv=3)
    assert fp32.path.parent.parent != int8.path.parent.parent
    heads = sorted(row.head for row in featcache.compare(cache=str(tmp_path), quiet=True).rows)
    assert heads == ["logreg", "logreg (int8)"]
    with pytest.raises(RunError, match="trained on int8 features"):
        featcache.export(run=str(int8.path), out=str(tmp_path / "m.onnx"), quiet=True)
    with pytest.raises(FeatcacheError, match="precision auto names no entry"):
        featcache.fit(**common, heads="logreg", precision="auto", cv=3)
