"""Which device and precision an extraction runs with, and the provenance it records."""

from __future__ import annotations

import datetime as _dt
import platform
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import timm
import torch
import torchvision

from featcache.errors import FeatcacheError
from featcache.options import DEVICE_PATTERN
from featcache.version import __version__


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device; anything else, or a CUDA device
    this machine does not have, is an error that says what to use."""
    if not DEVICE_PATTERN.match(str(device)):
        raise FeatcacheError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise FeatcacheError(f"--device {device}: this machine has {count} CUDA device(s); "
                                 "use --device cpu (or auto)")
    return dev


@dataclass(frozen=True)
class Accelerator:
    """How batches reach the device the backbone runs on, and the precision it computes in: the one place that
    knows a CUDA device's ways (host memory pinned by the loader, copies that do not wait, autocast at the entry's
    precision). Every driver (one backbone, several from one decode, a Ray actor) runs its forwards through it, and
    so does the CPU: there nothing is pinned and autocast runs where the entry's precision asks for it (bf16 works
    on the CPU, so the test suite runs this path on every CI run, GPU or not)."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16 (int8 runs a quantized engine of its own)

    @property
    def pin_memory(self) -> bool:
        """Whether the loader pins its batches in host memory (a copy from pinned memory need not wait)."""
        return self.device.type == "cuda"

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=self.pin_memory)

    def autocast(self) -> AbstractContextManager:
        if self.precision not in ("bf16", "fp16"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision an entry is named by: autocast's on CUDA, fp32 on the CPU, or int8 (the quantized
    engine, refused off the CPU where it enters)."""
    if precision == "int8":
        return precision
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def provenance(device: torch.device, origin: str) -> dict:
    return {"featcache": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "host": platform.node(), "weights_origin": origin,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
