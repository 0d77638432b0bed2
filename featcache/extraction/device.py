"""Which device and precision an extraction runs with, and the provenance it records."""

from __future__ import annotations

import datetime as _dt
import platform

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
