"""Every option of featcache, declared once: its name, what it takes, its default, its help and where it
belongs. The CLI flags (:mod:`featcache.cli`), the study-file keys (:mod:`featcache.study`) and the
Python API keywords (:mod:`featcache.api`) are made from :data:`OPTIONS`, and every value is checked
here, by :meth:`Option.checked`, whichever door it came through.

Kept free of heavy imports so that ``featcache --help`` stays fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from featcache.errors import FeatcacheError


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


class Alignment(StrEnum):
    """Label-free alignment of a test batch's features to the training features' statistics."""

    none = "none"
    moments = "moments"
    coral = "coral"
    auto = "auto"


class ConformalMode(StrEnum):
    """Coverage of conformal prediction sets: over all images, or for every class."""

    marginal = "marginal"
    class_ = "class"


class ConformalShift(StrEnum):
    """Prediction sets for a test set from elsewhere: calibrated as for the training images, or weighted by how
    much each training image resembles the test images."""

    none = "none"
    weighted = "weighted"


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
    """CUDA autocast precision (CPUs compute in fp32), or int8: the CPU engine quantized after training."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"


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


# ---------------------------------------------------------------------------------------------------------
# Every option, declared once. The CLI flags (featcache.cli), the study-file keys (featcache.study) and the
# Python API keywords (featcache.api) are all made from these declarations, so an option added here exists
# in all three, with the same name, default, choices and checks.
# ---------------------------------------------------------------------------------------------------------


class OptionError(FeatcacheError):
    """A value that an option does not take; the message names the option and the valid values."""


@dataclass(frozen=True)
class Option:
    """One option of featcache: what it is called in each door, what it takes, and what it means.

    ``name`` is the Python keyword; ``key`` the study-file key in ``table`` (None: not in a study file,
    e.g. ``cache``, which ``featcache run`` takes); ``flag`` the CLI flag of every command in
    ``commands``. ``kind`` is ``str``, ``int``, ``float``, ``bool`` or a :class:`~enum.StrEnum` of the
    valid values. ``multiple``: a list (a comma list on the CLI, a list in a study, a sequence in
    Python). ``recipe``: the typed recipe of :mod:`featcache.recipes` it belongs to. ``selects``: an
    extraction setting that ``fit`` takes to choose among entries (there its default is None: any). ``alias``: a
    second CLI flag that means ``name = value``. ``check``: a function of the value, or the name of one that
    only a higher layer knows (the heads' names, the image filters), which the door supplies
    (:data:`featcache.option_checks.CHECKS`): this module imports nothing above it.
    """

    name: str
    kind: type
    default: Any
    help: str
    commands: tuple[str, ...]
    table: str | None = None
    key: str | None = None
    flag: str | None = None
    short: str | None = None
    multiple: bool = False
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], Any] | str | None = None
    parse: Callable[[Any], Any] | None = None
    selects: bool = False
    envvar: str | None = None
    metavar: str | None = None
    alias: tuple[str, Any, str] | None = None  # (flag, value, help)
    required: bool = False
    cli_kind: type | None = None  # what the CLI parses, where it differs from ``kind``
    recipe: str | None = None  # the typed recipe the stage doors take it in (featcache.recipes)

    @property
    def study_key(self) -> str | None:
        return None if self.table is None else (self.key or self.name)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def default_for(self, command: str) -> Any:
        """The default on ``command``: an extraction setting only selects entries where features are read."""
        return None if self.selects and command in ("fit", "audit") else self.default

    def checked(self, value: Any, label: str | None = None, command: str | None = None,
                checks: Mapping[str, Callable[[Any], Any]] | None = None) -> Any:
        """``value`` as this option's plain value (enum members as their string, lists as tuples),
        or an :class:`OptionError` saying what is wrong, with ``label`` (default: the CLI flag). ``checks``:
        the checks named by options whose check lives in a higher layer (an option naming one that is not
        given is a LookupError: never checked less than declared)."""
        label = label or self.cli_flag
        check = self.check
        if isinstance(check, str):
            if checks is None or check not in checks:
                raise LookupError(f"option {self.name}: its check {check!r} lives above featcache.options; pass "
                                  "featcache.option_checks.CHECKS")
            check = checks[check]
        if value is None:
            if self.required:
                raise OptionError(f"{label}: a value is needed ({self.help})")
            value = self.default_for(command or "")
            if value is None:
                return None
        if self.multiple:
            items = [i for i in value.split(",") if i.strip()] if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(i, str | Enum) for i in items):
                raise OptionError(f"{_given(label, value, True, ' = ')}: expected a list of names ({self.help})")
            items = [i.value if isinstance(i, Enum) else i.strip() for i in items]
            if not all(items) or (not items and self.default):
                raise OptionError(f"{_given(label, value, True, ' = ')}: expected a non-empty list of names "
                                  f"({self.help})")
            value = tuple(self._one(i, label) for i in items)
        else:
            value = self._one(value, label)
        if check is not None:
            try:
                value = check(value)
            except (ValueError, FeatcacheError) as exc:
                text = str(exc)
                if text.startswith(self.cli_flag) and label != self.cli_flag:  # the check spoke in CLI terms
                    text = python_spelling(text)
                raise OptionError(text if text.startswith(("--", label)) else f"{label}: {text}") from None
        return value

    def _one(self, value: Any, label: str) -> Any:
        kind = self.kind
        if isinstance(kind, type) and issubclass(kind, Enum):
            raw = value.value if isinstance(value, Enum) else value
            if isinstance(raw, int) and not isinstance(raw, bool):
                raw = str(raw)  # views = 4 in a study or from Python
            valid = [c.value for c in kind]
            if raw not in valid:
                raise OptionError(f"{_given(label, value, True)}: not a valid value; choose one of {', '.join(valid)}")
            return self.parse(raw) if self.parse else str(raw)
        if kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{_given(label, value, True, ' = ')}: expected true or false ({self.help})")
            return value
        if kind is int and isinstance(value, str) and self.check is not None:
            return value  # a spelling that only the check knows (--ensemble top3)
        if kind in (int, float):
            numeric = (int,) if kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, numeric):
                what = "a whole number" if kind is int else "a number"
                raise OptionError(f"{_given(label, value, True, ' = ')}: expected {what} ({self.help})")
            if self.minimum is not None and value < self.minimum:
                raise OptionError(f"{_given(label, value)}: must be at least {self.minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise OptionError(f"{_given(label, value)}: must be at most {self.maximum:g}")
            return kind(value)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise OptionError(f"{_given(label, value, True, ' = ')}: expected a string ({self.help})")
        return value


def _given(label: str, value: Any, quoted: bool = False, sep: str = " ") -> str:
    """A value as it was given: ``--cv 1`` on the command line, ``cv=1`` in Python (``label`` ends with ``=``),
    ``[fit] cv 1`` in a study (``sep``: what stands between the other labels and the value)."""
    shown = repr(value) if quoted else str(value)
    return f"{label}{shown}" if label.endswith("=") else f"{label}{sep}{shown}"


# Which door a call came through: the command line says so (featcache.cli); errors met on a call from Python
# name keywords (group_col=NAME), not the flags (--group-col NAME) that deeper code writes.
DOOR: ContextVar[str] = ContextVar("featcache_door", default="python")
_SENTENCE_WORDS = {"a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "given", "has", "if", "in",
                   "is", "it", "needs", "no", "not", "of", "on", "only", "or", "so", "takes", "than", "that", "the",
                   "then", "to", "was", "when", "where", "which", "with", "without", "instead", "first", "again",
                   "also", "contradicts", "aligns", "says", "applies", "apply"}
_PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z_|]*|\d[\w.]*|'[^']*'|\S*[/.\d_+:|,]\S*)$")


def python_spelling(text: str) -> str:
    """``text`` with every CLI flag of featcache written as its Python keyword: ``--cv 2`` -> ``cv=2``,
    ``--group-col NAME`` -> ``group_col=NAME``, ``--no-groups`` -> ``no_groups=True``, ``--tune`` ->
    ``tune=True``; a flag followed by a word, not a value, becomes the bare keyword (``test_data``)."""
    spellings: list[tuple[str, Option, Any]] = []
    for option in OPTIONS:
        if option.alias:
            spellings.append((option.alias[0], option, "alias"))
        if option.kind is bool and option.default:
            spellings.append((f"--no-{option.cli_flag[2:]}", option, False))
        spellings.append((option.cli_flag, option, None))
    spellings.sort(key=lambda item: -len(item[0]))
    for flag, option, fixed in spellings:
        def spoken(match: re.Match, option: Option = option, fixed: Any = fixed) -> str:
            value, tail = re.fullmatch(r"(.*?)([,.:]*)", match.group(1) or "").groups()
            rest = (f" {value}" if value else "") + tail
            if fixed == "alias":
                return f"{option.alias[0][2:].replace('-', '_')}=True{rest}"
            if fixed is False or option.kind is bool:
                return f"{option.name}={fixed is not False}{rest}"
            enum = isinstance(option.kind, type) and issubclass(option.kind, Enum)
            choices = [c.value for c in option.kind] if enum else []
            # a value: one of the choices, a placeholder or number, the word an error is about (`--head knnn:`), or
            # for a free-text option any word but the sentence's own (`--classes melanoma`, not `--test-data is`)
            free = option.kind is str and not choices and value.lower() not in _SENTENCE_WORDS \
                and not value.startswith(("(", "`", "["))
            if value and not value.startswith("(") and (value in choices or _PLACEHOLDER.match(value)
                                                       or tail.startswith(":") or free):
                return f"{option.name}={value!r}{tail}" if value in choices else f"{option.name}={value}{tail}"
            return option.name + rest
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])(?:[ =]([^\s;)]+))?", spoken, text)
    return text


def _device(value: str) -> str:
    if not DEVICE_PATTERN.match(value):
        raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def _template(value: str) -> str:
    if value.count("{}") != 1:
        raise ValueError(f"{value!r}: write the prompt with one {{}} where the class name goes, e.g. "
                         "'a dermoscopy image of {}'")
    return value


def _metric(value: str) -> str:
    if value in [m.value for m in Metric] or (value.startswith("auroc:") and len(value) > 6):
        return value
    raise ValueError(f"{value!r}: choose one of {', '.join(m.value for m in Metric)}, or `auroc:<class>`")


def _ensemble(value: int | str) -> str:
    """``3`` or ``top3``: soft-vote the 3 best runs; ``stack``: a meta-learner over all runs."""
    text = str(value).strip().lower()
    if text == "stack":
        return text
    count = text[3:] if text.startswith("top") else text
    if not count.isdigit() or int(count) < 2:
        raise ValueError(f"{value!r}: give N >= 2 (or topN) for a soft vote of the N best runs, e.g. 3, or stack")
    return f"top{int(count)}"


_DATA = ("extract", "fit", "audit")
OPTIONS: tuple[Option, ...] = (
    # --- where the data is (the study's [data] table) ---
    Option("data", str, None, "Image folder (one sub-folder per class, or with a labels.csv), a CSV manifest "
           "(generic, HAM10000 metadata, ISIC one-hot) or an .npz.", _DATA, "data", key="train", required=True),
    Option("images", str, None, "Folder the CSV's image paths are relative to.", _DATA, "data"),
    Option("image_col", str, None, "CSV column with the image path or id (any case).", _DATA, "data"),
    Option("label_col", str, None, "CSV column with the label (any case).", _DATA, "data"),
    Option("group_col", str, None, "CSV column saying which images belong together (patient, lesion, case). "
           "Default: the first of group, lesion_id, patient_id, case_id, subject_id, participant_id, study_id "
           "… (any case).", _DATA, "data"),
    Option("test_data", str, None, "A held-out source scored after refitting on all of --data.", ("fit",), "data",
           key="test"),
    Option("test_group_col", str, None, "Group column of --test-data, if its name differs.", ("fit",), "data"),
    Option("label_map", str, None, "Merge labels: `akiec=malignant,mel=malignant,*=benign`.", ("fit",), "data"),
    Option("classes", str, None, "Keep only these classes, e.g. `mel,nv`.", ("fit", "audit"), "data", multiple=True),
    # --- extraction (the study's [extract] table; fit takes the entry settings to choose an entry) ---
    Option("backbone", str, "efficientnet_lite0", "Registry name (see `featcache backbones`) or timm:<model>; "
           "on extract, `a,b,c` decodes each image once for all of them (an entry each); on fit, the backbone "
           "whose features to use (default: the one the data was extracted with), and "
           "`a+b` fuses several (their features side by side, rows aligned by image id).", _DATA,
           "extract", key="backbones", short="-b", selects=True),
    Option("pools", str, None, "Comma list of poolings, e.g. `cls,mean,cls+mean` (ViTs) or `gap,fc7` "
           "(VGG/AlexNet); default per backbone.", ("extract",), "extract", flag="--pool", multiple=True,
           recipe="features"),
    Option("weights", str, None, "Local weights file (.pth/.safetensors), or `random` for timing tests only. "
           "Default: $FEATCACHE_WEIGHTS_DIR, an installed weights package, then the online download. In a "
           "study: a file for every backbone, or a table of one per backbone.", ("extract",), "extract",
           recipe="features"),
    Option("dtype", Dtype, "float16", "Stored feature dtype.", ("extract",), "extract", recipe="features"),
    Option("batch_size", int, None, "Default 8 on CPU, 128 on CUDA.", ("extract",), "extract", minimum=1,
           recipe="execution"),
    Option("workers", int, None, "Decoding worker processes.", ("extract",), "extract", minimum=0, recipe="execution"),
    Option("device", str, "auto", "auto, cpu, cuda or cuda:N.", ("extract",), "extract", check=_device,
           recipe="execution"),
    Option("precision", Precision, "auto", "CUDA autocast: auto (bf16 if supported), bf16, fp16, fp32; CPUs "
           "compute in fp32. int8 (CPU, OpenVINO): the backbone quantized by NNCF, calibrated on 300 of the "
           "dataset's images (bare forward 1.75x fp32 on Lite0, 3.5x on ResNet-50; features at 0.993 mean "
           "cosine to fp32; its own entry). "
           "On fit, the entry made with it (default: the newest).", _DATA, "extract", selects=True, recipe="features"),
    Option("jpeg_draft", bool, True, "Let the JPEG decoder scale down by a power of two when the image is "
           "far larger than the input (--no-jpeg-draft: decode at full size).", ("extract",), "extract",
           recipe="features"),
    Option("input_size", int, None, "Crop size in pixels instead of the backbone's own.", ("extract",), "extract",
           minimum=8, recipe="features"),
    Option("preprocess", str, (), "Image filters before the backbone, a comma list in order: hair-removal "
           "(DullRazor), color-constancy (Shades of Gray, p=6), dataset-norm (last: normalise with the "
           "dataset's own channel mean/std). Part of the fingerprint; on fit, the entry made with exactly "
           "these (default: the unfiltered one).", _DATA, "extract", multiple=True, check="preprocess",
           recipe="features"),
    Option("norm_from", str, None, "With --preprocess ...,dataset-norm: normalise with the statistics of this "
           "dataset (cache name, folder or CSV; e.g. the training set when extracting a test set) instead of "
           "this one's.", ("extract",), "extract", recipe="features"),
    Option("engine", Engine, "auto", "What runs the backbone: auto (on the CPU the engine measured fastest for the "
           "backbone, often 1.2-3x PyTorch; on CUDA torch), torch, or its ONNX export on onnxruntime or "
           "openvino. Part of the entry's fingerprint; on fit, the entry made with it (default: the newest).",
           _DATA, "extract", selects=True, recipe="features"),
    Option("resampler", Resampler, None, "What resizes the images: pil (timm's and torchvision's eval transform, bit "
           "for bit) or torch (PyTorch's uint8 resize of the decoded JPEG: 1.3-2.4x faster decoding, pixels "
           "within 3 levels; its own entry). Default: the backbone's own (pil; torch for transformers models, "
           "whose image processors resize so).", _DATA, "extract", selects=True, recipe="features"),
    Option("views", ViewCount, 1, "Views per image stored (mirrors and quarter turns of the input; heads train "
           "on all and average over them); on fit, the entry with this many (default: the newest).", _DATA,
           "extract", parse=int, selects=True, recipe="features"),
    Option("resize", ResizeMode, None, "crop (the backbone's resize + centre crop), full (whole image squeezed "
           "to a square) or pad (whole image padded to a square); on fit, the entry made so. Default: the "
           "backbone's own (crop; full for a model whose processor squashes, as SigLIP's and DINOv3's do).", _DATA,
           "extract", selects=True, recipe="features"),
    Option("rehash", bool, False, "Compare every image's content with what was extracted, also where its size "
           "and modification time are unchanged (a file rewritten in place can keep both; `verify` finds such "
           "files), and re-extract those that changed.", ("extract",), "extract", recipe="execution"),
    Option("shard_size", int, 1024, "Images per committed shard (the unit of resume).", ("extract",), "extract",
           minimum=1, recipe="execution"),
    Option("break_lock", bool, False, "Clear a lock file left by a dead run on a file system without POSIX locks "
           "(others are freed by the kernel).", ("extract",), "extract", recipe="execution"),
    Option("ray_actors", int, None, "Backbone actors on Ray (default: one per GPU, else 1).", ("extract",),
           "extract", minimum=1),
    # --- fitting (the study's [fit] table) ---
    Option("heads", str, ("fast",), "A head, a comma list, `fast` (logreg,svm-linear,knn,mlp) or `all` "
           "(+svm-rbf,xgboost); baselines majority/stratified come with both. Also: svm-rbf-exact (libsvm, slow "
           "beyond a few thousand images).", ("fit",), "fit", flag="--head", multiple=True, check="heads"),
    Option("pool", str, None, "Pooling to use (default: the entry's first; in a study: every pooling "
           "extracted). With --backbone a+b, one per backbone joined by + (`penult+gap`) fuses each backbone's "
           "own pooling; in a study with fuse = true, the same spelling fits each backbone with its part and "
           "fuses them.", ("fit", "audit"), "fit"),
    Option("cv", int, 5, "Folds; grouped by the source's group column when it has one.", ("fit", "audit"), "fit",
           minimum=2),
    Option("split", Split, "cv", "`cv`; `official` to use the source's split column (validation rows are left "
           "out); `random712` for an image-level 70/10/20 split (DermaMNIST's protocol: it ignores lesion "
           "groups).", ("fit", "audit"), "fit"),
    Option("seeds", int, 1, "Repeat the CV with this many seeds; scores are averaged over all.", ("fit",), "fit",
           minimum=1),
    Option("class_weight", ClassWeight, "balanced", "Weigh classes equally in training.", ("fit",), "fit"),
    Option("pca", int, None, "Reduce features to N principal components (fit per fold).", ("fit",), "fit",
           minimum=1),
    Option("tune", bool, False, "Choose hyper-parameters by inner CV on training folds.", ("fit",), "fit"),
    Option("tune_budget", float, 300.0, "Seconds per inner search (each outer fold and the final refit); "
           "candidates after it are skipped, defaults come first.", ("fit",), "fit", minimum=0),
    Option("standardize", bool, True, "The per-fold StandardScaler (--no-standardize for ablations only).",
           ("fit",), "fit"),
    Option("use_views", UseViews, "all", "On multi-view entries: `all` (train on every view, average predictions "
           "over them), `train` (no test-time averaging), `first` (original only).", ("fit",), "fit"),
    Option("meta", str, None, "Metadata columns as extra features, e.g. `age,sex,localization` (imputed and "
           "encoded inside the pipeline).", ("fit",), "fit", multiple=True),
    Option("calibrate", Calibration, None, "Recalibrate probabilities: `sigmoid`, `isotonic` or `temperature` "
           "(keeps each view's predicted class), on 3 inner folds of the training rows, weighted like the head "
           "(--class-weight).", ("fit",), "fit"),
    Option("groups", Grouping, "auto", "`auto`: the group column when there is one; `near-duplicates`: "
           "identical and near-identical images form groups (for data without a patient/lesion column); "
           "`none`: every image independent, on purpose (the protocol line records it).", ("fit", "audit"), "fit",
           alias=("--no-groups", "none", "Cross-validate without groups, on purpose (= --groups none).")),
    Option("near_dup_threshold", float, None, "Cosine similarity above which two images count as "
           "near-duplicates (default: calibrated per backbone on HAM10000).", ("fit",), "fit", minimum=0.0,
           maximum=1.0),
    Option("test_align", Alignment, "none", "Align the test features to the training features' statistics, "
           "from the test batch itself, without labels: `moments` (each dimension's mean and std), `coral` (also "
           "the covariance, shrunk), or `auto` (moments or none, chosen per batch from label-free evidence, which "
           "metrics.json records). For another clinic's images; the unaligned scores are kept beside.",
           ("fit", "predict"), "fit"),
    Option("align_from", str, None, "With --test-align on predict: a source of images from the same clinic whose "
           "features give the statistics (for batches too small to estimate them).", ("predict",)),
    Option("trust_pickle", bool, False, "Load a run folder of featcache before 0.3, whose model is a pickle (it can "
           "run any code it contains): only for folders you made yourself. Fitting the run again saves it without "
           "pickles.", ("predict", "export")),
    Option("conformal", float, None, "Prediction sets with this coverage, e.g. 0.9 (cross-conformal on the "
           "training folds): each image gets the set of classes it plausibly is; metrics.json holds their "
           "out-of-fold coverage and mean size, predict writes each image's set.", ("fit",), "fit",
           minimum=0.5, maximum=0.999),
    Option("conformal_mode", ConformalMode, "marginal", "`marginal`: the coverage over all images; `class`: the "
           "coverage for every class (rare classes get larger sets).", ("fit",), "fit"),
    Option("conformal_shift", ConformalShift, "none", "`weighted`: the --test-data sets calibrated for a test set "
           "from elsewhere (shift-weighted conformal, Tibshirani et al. 2019): each training image's score weighted "
           "by how much it resembles the test images (a domain classifier on 8 principal components of the features "
           "the head sees, after --test-align), each test image its own threshold; predict weighs against its batch. "
           "metrics.json keeps the weights' effective sample and the unweighted sets beside.", ("fit",), "fit"),
    Option("conformal_by", str, None, "Calibrate the prediction sets within each value of this metadata column "
           "(clinic, site, device: Mondrian conformal), so that every group keeps the coverage, not only all of them "
           "together; an image takes its group's threshold (one of a group never seen, the overall one, said).",
           ("fit",), "fit"),
    Option("subgroups", str, None, "Also score every run by these metadata columns, e.g. `sex,age,localization` "
           "(numeric ones in quartile bands): counts, balanced accuracy, per-class sensitivity and AUROC per "
           "subgroup, with intervals, out of fold and on --test-data; the worst subgroup is flagged when its interval "
           "lies below the run's score.", ("fit",), "fit", multiple=True),
    Option("prompt_template", str, "a skin image of {}", "The zero-shot head's prompt per class, `{}` standing "
           "for the class name, e.g. `a dermoscopy image of {}` (HAM10000/ISIC codes such as mel or bcc are written "
           "out: melanoma, basal cell carcinoma).", ("fit",), "fit", check=_template),
    Option("prompts", str, None, "A JSON file of the zero-shot head's prompts per class, e.g. `{\"mel\": [\"a "
           "dermoscopy image of melanoma\", \"a melanoma\"]}` (a class's prompts are averaged); classes it does "
           "not name get --prompt-template.", ("fit",), "fit"),
    Option("fuse", bool, False, "Also fit every head on all backbones' features side by side (per pooling; a "
           "study's form of --backbone a+b).", (), "fit"),
    Option("force", bool, False, "Redo runs that already finished.", ("fit",), "fit", recipe="fit-execution"),
    # --- comparing and reporting (the study's [compare] and [report] tables) ---
    Option("metric", str, "balanced_accuracy", "Ranking metric: balanced_accuracy, macro_f1, auroc, accuracy, or "
           "`auroc:<class>` (one-vs-rest AUROC of one class).", ("compare", "report"), "compare", check=_metric,
           recipe="view"),
    Option("ensemble", int, None, "Add an ensemble to each comparable group of runs (scored on the same "
           "out-of-fold predictions): N (or topN) soft-votes the N best, chosen for each fold on the other folds; "
           "`stack` fits a logistic regression on all runs' out-of-fold probabilities, nested in their folds. On "
           "predict: how several --run combine.",
           ("compare", "report", "predict"), "compare",
           check=_ensemble, cli_kind=str, metavar="N|stack", recipe="view"),
    Option("top", int, 20, "Runs shown per protocol in the report's leaderboard.", ("report",), "report",
           minimum=1, recipe="view"),
    Option("best", int, 3, "Best runs shown with confusion matrix, ROC and reliability.", ("report",), "report",
           minimum=0, recipe="view"),
    Option("gallery", int, 1, "Leading runs per protocol shown with a gallery: their most confident errors and most "
           "uncertain images, each with its heatmap and similar training cases (0: none).", ("report",), "report",
           minimum=0, recipe="view"),
    Option("max_mb", float, 5.0, "The page's size limit in MB: the gallery stops before it (and says so).",
           ("report",), "report", minimum=0.5, recipe="view"),
    # --- the session: where and how a command runs, not what it computes (no study key) ---
    Option("cache", str, None, "Cache root (default ./cache, or $FEATCACHE_CACHE).",
           ("extract", "fit", "compare", "report", "predict", "verify", "demo", "run", "audit", "explain"),
           envvar="FEATCACHE_CACHE"),
    Option("ray", str, None, "Run on Ray: `local` starts a cluster on this machine for the run, `auto` joins the "
           "one started here with `ray start --head`, or a cluster address (ray://host:10001). Same store, "
           "fingerprints and results; pip install 'featcache[ray]'.", ("extract", "fit", "run"),
           metavar="local|auto|ADDRESS"),
    Option("mlflow", bool, False, "Log each run to MLflow (default store: CACHE/mlflow.db); needs "
           "`pip install 'featcache[mlflow]'`.", ("fit", "run")),
    Option("mlflow_uri", str, None, "MLflow tracking URI (implies --mlflow), e.g. http://mlflow.lab:5000 or "
           "sqlite:///runs.db.", ("fit", "run")),
    Option("quiet", bool, False, "Only errors, warnings and the final lines.",
           ("extract", "fit", "compare", "report", "predict", "verify", "demo", "run", "show", "backbones",
            "audit", "export", "explain"), short="-q"),
)
BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
TABLES = ("data", "extract", "fit", "compare", "report")


def options_for(command: str) -> list[Option]:
    """The options a CLI command takes (and its Python function's keywords), in declaration order."""
    return [option for option in OPTIONS if command in option.commands]


def study_table(table: str) -> dict[str, Option]:
    """The keys a study file's ``[table]`` takes, by study key."""
    return {option.study_key: option for option in OPTIONS if option.table == table}


def checked_options(command: str, values: dict[str, Any], label: Callable[[Option], str] | None = None,
                    checks: Mapping[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """Every option of ``command`` with its checked value (``values`` given by keyword, the rest at their
    defaults). An unknown keyword is an :class:`OptionError` listing the valid ones."""
    declared = {option.name: option for option in options_for(command)}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise OptionError(f"{command}: unknown option {unknown[0]!r}; it takes {', '.join(declared)}")
    return {name: option.checked(values.get(name, option.default_for(command)),
                                 label(option) if label else None, command, checks)
            for name, option in declared.items()}
