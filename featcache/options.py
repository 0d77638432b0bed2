"""Every choice-valued option, as an enum: the CLI shows and checks them, the Python API checks
strings against them (:func:`checked_choice`), and a wrong value is refused with the valid ones.

Kept free of heavy imports so that ``featcache --help`` stays fast.
"""

from __future__ import annotations

import re
from enum import Enum, StrEnum


class Split(StrEnum):
    """How images are split into training and held-out parts."""

    cv = "cv"
    official = "official"
    random712 = "random712"


class ClassWeight(StrEnum):
    balanced = "balanced"
    none = "none"


class UseViews(StrEnum):
    all = "all"
    train = "train"
    first = "first"


class Calibration(StrEnum):
    sigmoid = "sigmoid"
    isotonic = "isotonic"
    temperature = "temperature"


class Grouping(StrEnum):
    """Which images must stay on one side of a split: ``auto`` = the source's group column when it
    has one (else ungrouped, said loudly); ``none`` = ungrouped on purpose; ``near-duplicates`` =
    connected components of identical or near-identical images (see :mod:`featcache.evaluation.leakage`)."""

    auto = "auto"
    none = "none"
    near_duplicates = "near-duplicates"


class Metric(StrEnum):
    """Sort keys of ``compare``; ``auroc:<class>`` (one-vs-rest AUROC of one class) is also accepted."""

    balanced_accuracy = "balanced_accuracy"
    macro_f1 = "macro_f1"
    auroc = "auroc"
    accuracy = "accuracy"


class Dtype(StrEnum):
    """How features are stored."""

    float16 = "float16"
    float32 = "float32"


class Precision(StrEnum):
    """CUDA autocast precision (CPUs always compute in fp32)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Engine(StrEnum):
    """What runs the backbone at extraction: PyTorch, or its ONNX export on ONNX Runtime or OpenVINO
    (CPU); ``auto`` takes the one measured fastest here for the backbone."""

    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"


class Resampler(StrEnum):
    """What resizes the decoded image: ``pil`` is the backbone's own eval transform, bit for bit;
    ``torch`` is PyTorch's vectorised uint8 resize of a tensor decoded straight from the JPEG (pixels
    within 3 levels of ``pil``, so it is part of the fingerprint)."""

    pil = "pil"
    torch = "torch"


class ResizeMode(StrEnum):
    crop = "crop"
    full = "full"
    pad = "pad"


class ViewCount(StrEnum):
    one = "1"
    two = "2"
    four = "4"
    eight = "8"


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ChoiceError(ValueError):
    """A value that is not one of an option's choices (modules turn it into their own error)."""


def checked_choice(value: object, choices: type[Enum], option: str, optional: bool = False) -> str:
    """``value`` as the plain string of one of ``choices`` (``""`` for none when ``optional``);
    anything else raises :class:`ChoiceError` listing the valid values."""
    if isinstance(value, Enum):
        value = value.value
    if optional and value in (None, ""):
        return ""
    valid = [c.value for c in choices]
    if value not in valid:
        raise ChoiceError(f"{option} {value!r}: not a valid value; choose one of {', '.join(valid)}")
    return str(value)
