"""Extraction engines: the ONNX export run by ONNX Runtime or OpenVINO gives PyTorch's features."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.errors import FeatcacheError
from featcache.extraction.extract import extract
from featcache.recipes import ExecutionPlan, FeatureRecipe

POOLS = {"efficientnet_lite0": ("gap", "penult", "multi"), "squeezenet1_1": ("gap", "multi"),
         "dinov2_vits14": ("cls", "cls+mean", "last4")}


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=pytest.mark.slow) if b.startswith("dinov2") else b
                                      for b in POOLS])  # a ViT export takes ~20 s: outside the fast tier
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engines_agree_with_pytorch_for_every_pooling_and_view(small_folder, tmp_path, backbone, engine):
    weights = "random" if backbone.startswith("dinov2") else None  # no ViT weights install offline
    source = open_source(small_folder)
    reference = extract(source, load_backbone(backbone, weights=weights, pools=POOLS[backbone]), cache_root=tmp_path,
                        recipe=FeatureRecipe(views=2, dtype="float32", engine="torch"),
                        plan=ExecutionPlan(workers=0)).entry
    other = extract(source, load_backbone(backbone, weights=weights, pools=POOLS[backbone]), cache_root=tmp_path,
                    recipe=FeatureRecipe(views=2, dtype="float32", engine=engine), plan=ExecutionPlan(workers=0)).entry
    assert other.fingerprint != reference.fingerprint  # the engine is part of the name: never mixed
    assert other.manifest["fingerprint_inputs"]["engine"] == engine
    for pool in POOLS[backbone]:
        a, b = reference.read(pool), other.read(pool, reference.ids)
        assert a.shape == b.shape and a.shape[1] == 2  # (images, views, dim)
        scale = np.abs(a).max()
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, scale), (pool, np.abs(a - b).max())
        assert cosine.min() > 0.99999, (pool, cosine.min())
    assert list((tmp_path / ".engines").glob(f"{backbone}-*.onnx"))  # exported once, cached


def test_auto_picks_the_measured_engine_and_says_so(small_folder, tmp_path):
    from featcache.extraction.device import resolve_device
    from featcache.extraction.engines import resolve_engine

    lite0 = load_backbone("efficientnet_lite0")
    assert resolve_engine("auto", lite0, resolve_device("cpu")) == "openvino"
    assert resolve_engine("auto", load_backbone("resnet18", weights="random"), resolve_device("cpu")) == "onnxruntime"
    with pytest.raises(ValueError):
        resolve_engine("tensorrt", lite0, resolve_device("cpu"))


def test_auto_without_the_measured_engine_runs_torch_and_says_so_loudly(monkeypatch, tmp_path):
    import importlib.util

    from featcache.extraction import engines
    from featcache.extraction.device import resolve_device

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else
                        real_find_spec(name, *a))
    lite0, cpu = load_backbone("efficientnet_lite0"), resolve_device("cpu")
    assert engines.resolve_engine("auto", lite0, cpu) == "torch"
    note, loud = engines.auto_note(lite0, cpu, "torch")
    assert loud and "NOT openvino" in note and "pip install" in note
    assert engines.resolve_engine("auto", load_backbone("squeezenet1_1"), cpu) == "onnxruntime"  # still there


def test_the_default_engine_is_auto(small_folder, tmp_path):
    entry = extract(open_source(small_folder), "squeezenet1_1", cache_root=tmp_path,
                    plan=ExecutionPlan(workers=0)).entry
    assert entry.manifest["fingerprint_inputs"]["engine"] == "onnxruntime"  # measured fastest for it


def test_a_wrong_engine_is_refused(small_folder, tmp_path):
    with pytest.raises(FeatcacheError, match="--engine 'tensorrt'"):
        extract(open_source(small_folder), "efficientnet_lite0", cache_root=tmp_path,
                recipe=FeatureRecipe(engine="tensorrt"))


def test_fit_names_the_entry_it_takes_and_compare_tells_the_entries_apart(small_folder, tmp_path):
    from typer.testing import CliRunner

    from featcache.cli import app

    source = open_source(small_folder)
    for engine in ("torch", "onnxruntime"):
        extract(source, "squeezenet1_1", cache_root=tmp_path, recipe=FeatureRecipe(engine=engine),
                plan=ExecutionPlan(workers=0))
    extract(source, "squeezenet1_1", cache_root=tmp_path,
            recipe=FeatureRecipe(engine="torch", resampler="torch", input_size=192),
            plan=ExecutionPlan(workers=0))  # 192: the sample's photos are really resampled
    fit = ["fit", "--data", str(small_folder), "--backbone", "squeezenet1_1", "--head", "logreg", "--cv", "2",
           "--no-groups", "--cache", str(tmp_path)]
    out = CliRunner().invoke(app, fit)
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())
    assert "the newest of 3 matching entries" in said and "Choose with --engine or --resampler" in said
    for engine in ("torch", "onnxruntime"):
        out = CliRunner().invoke(app, [*fit, "--engine", engine, "--resampler", "pil"])
        assert out.exit_code == 0 and "matching entries" not in out.output, out.output
    refused = CliRunner().invoke(app, [*fit, "--engine", "auto"])
    assert refused.exit_code == 2 and "auto names no entry" in " ".join(refused.output.split())
    missing = CliRunner().invoke(app, [*fit, "--engine", "openvino"])
    assert missing.exit_code == 2 and "--engine openvino" in " ".join(missing.output.split())
    from featcache.reporting.compare import collect_runs

    labels = sorted(r.head for r in collect_runs(tmp_path))
    assert labels == ["logreg (resampler torch)", "logreg [onnxruntime]", "logreg [torch]"], labels


def test_streams_run_batches_at_once_and_keep_their_order(tmp_path):
    import threading
    import time

    import torch

    from featcache.extraction.engines import StreamedForward, make_forward, run_pipelined

    running, most = [0], [0]
    lock = threading.Lock()

    def slow(batch: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 * (batch % 3))  # later batches may finish first
        with lock:
            running[0] -= 1
        if batch == 7:
            raise RuntimeError("batch 7 failed")
        return batch * 10

    forward = StreamedForward(lambda x: {}, streams=2)
    assert [(b, r) for b, r in run_pipelined(forward, range(6), slow)] == [(b, b * 10) for b in range(6)]
    assert most[0] == 2  # two batches in flight, never more
    with pytest.raises(RuntimeError, match="batch 7 failed"):
        list(run_pipelined(forward, range(10), slow))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for engine in ("onnxruntime", "openvino"):
            assert make_forward(engine, load_backbone("squeezenet1_1"), tmp_path).streams == 2
        torch.set_num_threads(1)
        assert make_forward("openvino", load_backbone("squeezenet1_1"), tmp_path).streams == 1
    finally:
        torch.set_num_threads(threads)
