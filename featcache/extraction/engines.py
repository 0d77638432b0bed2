"""Inference engines for extraction: PyTorch itself, or the same backbone exported once to ONNX and
run by ONNX Runtime or OpenVINO (CPU).

The backbone with its pooling heads is exported with every pooling as an output, so multi-output
poolings (``penult``, ``multi``, ViT ``cls+mean``) come from one run as with PyTorch. The ONNX file is
cached in ``<cache>/.engines/``, named by the hash of what it was exported from (backbone, weights
SHA-256, poolings, input size, torch version), and the engine joins the entry's fingerprint, so
features of different engines never mix. Outputs agree with PyTorch's to about 1e-5 (tested).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from featcache.backbones.models import LoadedBackbone
from featcache.errors import CacheError, FeatcacheError
from featcache.extraction.runtimes import StreamedForward, export_intact, exported_forward, run_pipelined
from featcache.options import Engine
from featcache.store.entries import write_text_atomic
from featcache.store.hashing import file_sha256
from featcache.store.naming import engine_export_path

ONNX_OPSET = 17
# `--engine auto` on the CPU: the engine measured fastest here for each backbone (bare forward, 2
# cores, batch 8 and 32; docs/benchmarks.md). Backbones not listed stay on PyTorch until measured.
MEASURED_FASTEST = {
    "efficientnet_lite0": Engine.openvino, "efficientnet_lite1": Engine.openvino,
    "efficientnet_lite2": Engine.openvino, "squeezenet1_1": Engine.onnxruntime, "resnet18": Engine.onnxruntime,
    "resnet50": Engine.onnxruntime, "dinov2_vits14": Engine.openvino,
}

Forward = Callable[[torch.Tensor], dict[str, torch.Tensor]]
__all__ = ["StreamedForward", "run_pipelined"]  # the engines' streams, for the callers that import them here


def resolve_engine(engine: str | Engine, model: LoadedBackbone, device: torch.device) -> str:
    """The concrete engine for ``engine`` (``auto`` picks the measured fastest on the CPU, PyTorch on CUDA)."""
    engine = Engine(engine)
    if model.spec.torch_only and engine not in (Engine.torch, Engine.auto):
        raise FeatcacheError(f"--engine {engine.value}: {model.spec.name} runs on PyTorch only "
                             f"({model.spec.torch_only}); use --engine torch")
    if engine == Engine.auto:
        engine = Engine.torch if device.type != "cpu" else MEASURED_FASTEST.get(model.spec.name, Engine.torch)
        if not engine_installed(engine):
            engine = Engine.torch  # the caller says so (auto_note)
    if engine != Engine.torch and device.type != "cpu":
        raise FeatcacheError(f"--engine {engine.value} runs on the CPU only; on {device} use --engine torch (or auto)")
    return engine.value


def engine_installed(engine: str | Engine) -> bool:
    """Whether ``engine``'s packages import here (PyTorch always does)."""
    engine = Engine(engine)
    if engine in (Engine.torch, Engine.auto):
        return True
    module = "onnxruntime" if engine == Engine.onnxruntime else "openvino"
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", module))


def auto_note(model: LoadedBackbone, device: torch.device, resolved: str) -> tuple[str, bool]:
    """What ``--engine auto`` chose for ``model`` on ``device`` and why, and whether it is a warning (the
    measured engine is not installed)."""
    fastest = MEASURED_FASTEST.get(model.spec.name)
    if device.type != "cpu":
        return f"--engine auto: torch for {model.spec.name} on {device.type}", False
    if model.spec.torch_only:
        return f"--engine auto: torch for {model.spec.name} ({model.spec.torch_only})", False
    if fastest is None:
        return f"--engine auto: torch for {model.spec.name} (no other engine measured faster for it yet)", False
    if resolved != fastest.value:
        return (f"--engine auto: torch for {model.spec.name}, NOT {fastest.value} (measured fastest for it): "
                f"{fastest.value} is not installed; pip install onnx onnxruntime openvino for the faster run"), True
    return f"--engine auto: {resolved} for {model.spec.name} (measured fastest for it on the CPU)", False


class _PoolOutputs(nn.Module):
    """The preprocessing's normalisation, the backbone and its poolings as one graph: uint8 images
    in, a tuple of poolings out (in a fixed order). The engine then fuses the normalisation into
    the first convolution instead of the Python process computing it (10 % of the run before)."""

    def __init__(self, model: LoadedBackbone):
        super().__init__()
        self.net, self.pools = model.model, tuple(model.model.pools)
        self.register_buffer("mean", torch.tensor(model.preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.preprocess.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images.float() / 255 - self.mean) / self.std  # as Preprocess.normalize computes it
        out = self.net(x)
        return tuple(out[p] for p in self.pools)


def export_path(model: LoadedBackbone, cache_root: Path) -> Path:
    """Where the backbone's ONNX export is cached: named by the hash of everything it is exported from."""
    identity = {"backbone": model.spec.name, "arch": model.spec.arch, "weights_sha256": model.weights_sha256,
                "pools": list(model.model.pools), "crop": model.preprocess.crop_size, "opset": ONNX_OPSET,
                "mean": list(model.preprocess.mean), "std": list(model.preprocess.std), "input": "uint8",
                "torch": torch.__version__}
    return engine_export_path(cache_root, model.spec.name, identity)


def onnx_path(model: LoadedBackbone, cache_root: Path) -> Path:
    """The backbone exported to ONNX (exported now unless an intact export is cached)."""
    path = export_path(model, cache_root)
    checksum = path.with_name(path.name + ".sha256")  # recorded at export, checked before every use
    if path.is_file():
        why = export_intact(path)
        if why is None:
            return path
        _notice(f"the ONNX export {path} {why} (damaged or changed on disk): exporting it again")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    size = model.preprocess.crop_size
    wrapper = _PoolOutputs(model).eval().to(memory_format=torch.contiguous_format)
    pools = list(wrapper.pools)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(wrapper, (torch.zeros(2, 3, size, size, dtype=torch.uint8),), str(tmp), input_names=["x"],
                              output_names=pools, dynamic_axes={"x": {0: "n"}, **{p: {0: "n"} for p in pools}},
                              opset_version=ONNX_OPSET, dynamo=False)
        write_text_atomic(checksum, file_sha256(tmp) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, read-only cache: the user can fix that
        tmp.unlink(missing_ok=True)
        raise CacheError(f"writing the ONNX export of {model.spec.name} to {path.parent} failed ({exc}); "
                         "free space or fix the drive and rerun, or use --engine torch") from None
    except Exception as exc:  # the exporter raises many kinds; say which backbone and what to do
        tmp.unlink(missing_ok=True)
        raise FeatcacheError(f"{model.spec.name} could not be exported to ONNX ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); use --engine torch") from None
    return path


def _notice(message: str) -> None:
    """Said once on screen, whatever the command's verbosity: featcache did something it was not asked to."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def make_forward(engine: str, model: LoadedBackbone, cache_root: Path, *, export: Path | None = None) -> Forward:
    """A function from a batch of uint8 NCHW images (the loader's output) to ``{pooling: features}``
    on the chosen engine; PyTorch normalises in Python, the exported engines inside their graph.
    ``export``: the model file an exported engine runs instead of the backbone's ONNX export (int8)."""
    if engine == Engine.torch.value:
        layout = torch.channels_last if model.spec.is_cnn else torch.contiguous_format

        def run_torch(images: torch.Tensor) -> dict[str, torch.Tensor]:
            return model.model(model.preprocess.normalize(images).contiguous(memory_format=layout))

        return run_torch
    pools = tuple(model.model.pools)
    arrays = exported_forward(engine, export or onnx_path(model, cache_root), pools, torch.get_num_threads())

    def run_exported(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {p: torch.from_numpy(v) for p, v in arrays(x.numpy()).items()}

    return StreamedForward(run_exported, arrays.streams)
