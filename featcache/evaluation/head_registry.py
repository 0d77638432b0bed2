"""Every head featcache fits, registered once with what featcache knows of it: how it is built with its
documented defaults, its ``--tune`` grid, the head sets it belongs to (``fast``, ``all``), whether it is a
baseline, its rules at scale, whether it exports to ONNX. Nothing else branches on a head's name: a new head is
one :func:`register_head` call here (and, if it brings a new estimator type, that type in the store's trusted
list, which is explicit on purpose: see :mod:`featcache.store.model_files`).

The pipelines (:func:`make_pipeline`) put every head behind the scaler, so that in cross-validation the
scaler is fit on training folds only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.dummy import DummyClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from featcache.errors import RunError
from featcache.evaluation import heads as estimators
from featcache.evaluation.heads import (
    CALIBRATIONS,
    SGD_EPOCHS,
    CalibratedHead,
    CosineKNN,
    SVMHead,
    TorchMLPClassifier,
    XGBHead,
    ZeroShotHead,
    ZeroShotText,
    sgd_epochs,
)

Builder = Callable[[str | None, int, str], Any]  # (class weight or None, seed, an SVM's calibration) -> estimator
ScaleRules = Callable[[int, int], dict[str, tuple[int, str]]]  # (images, rows) -> {rule: (limit, sentence)}


@dataclass(frozen=True)
class HeadSpec:
    """One head. ``build`` makes its estimator with its documented defaults; ``grid``: its ``--tune`` grid,
    the default first (without ``--tune`` the first value of each is used); ``sets``: the head sets that
    include it (``fast``, ``all``; the baselines join both); ``baseline``: it predicts without looking at the
    image; ``calibrates_itself``: ``--calibrate`` chooses its own calibration instead of wrapping it;
    ``scale_rules``: what it does differently past its limits (each names the run); ``sample_limit``: the
    number of training rows past which it is trained on a stratified, seeded sample of that many (read when
    used: the limits live with the estimators in :mod:`featcache.evaluation.heads`); ``torch``: it trains with
    PyTorch (its workers' thread count is set there too); ``onnx_refusal``: why it has no ONNX form (None: it
    exports); ``note``: what its row says beside its name."""

    name: str
    build: Builder
    grid: Mapping[str, list] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    baseline: bool = False
    calibrates_itself: bool = False
    scale_rules: ScaleRules | None = None
    sample_limit: Callable[[], int] | None = None
    torch: bool = False
    onnx_refusal: str | None = None
    note: str = ""


HEAD_REGISTRY: dict[str, HeadSpec] = {}
ZERO_SHOT = "zero-shot"
HEAD_SETS = ("fast", "all")


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add a head (its name must be new)."""
    if spec.name in HEAD_REGISTRY or spec.name in HEAD_SETS:
        raise ValueError(f"a head named {spec.name!r} is registered already")
    HEAD_REGISTRY[spec.name] = spec
    return spec


def head_spec(name: str) -> HeadSpec:
    """The registered head ``name``, or a RunError listing the heads."""
    try:
        return HEAD_REGISTRY[name]
    except KeyError:
        raise RunError(f"--head {name}: unknown; choose from {', '.join(head_names())}, fast or all") from None


def head_names(head_set: str | None = None) -> tuple[str, ...]:
    """Every head (``head_set``: those of ``fast`` or ``all``, the baselines last), in registration order."""
    if head_set is None:
        trained = [s.name for s in HEAD_REGISTRY.values() if not s.baseline]
        return (*trained, *baselines())
    return (*(s.name for s in HEAD_REGISTRY.values() if head_set in s.sets), *baselines())


def baselines() -> tuple[str, ...]:
    return tuple(s.name for s in HEAD_REGISTRY.values() if s.baseline)


def is_baseline(name: str) -> bool:
    spec = HEAD_REGISTRY.get(name)
    return spec is not None and spec.baseline


def head_note(name: str) -> str:
    """What a head's row says beside its name (a baseline, zero-shot), or ''."""
    spec = HEAD_REGISTRY.get(name)
    return spec.note if spec else ""


def grid_of(name: str) -> dict[str, list]:
    """The head's ``--tune`` grid (``head__<param>``: values, the default first); {} for an unknown name."""
    spec = HEAD_REGISTRY.get(name)
    return dict(spec.grid) if spec else {}


def parse_heads(text: str) -> list[str]:
    """``logreg,mlp`` | ``fast`` | ``all`` -> head names (``all`` and ``fast`` add the baselines)."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        for name in head_names(part) if part in HEAD_SETS else (head_spec(part).name,):
            if name not in names:
                names.append(name)
    if not names:
        raise RunError("--head is empty; give a head name, a comma list, fast or all")
    return names


def make_head(name: str, class_weight: str | None = "balanced", seed: int = 0, calibrate: str = ""):
    """The estimator for a head name, with its documented defaults.

    ``calibrate`` (sigmoid, isotonic, temperature): the SVMs, which always calibrate, use that
    method; other heads are wrapped in :class:`CalibratedHead`; the baselines stay as they are.
    """
    if calibrate and calibrate not in CALIBRATIONS:
        raise RunError(f"--calibrate {calibrate!r}: use {', '.join(CALIBRATIONS)} (or leave it out)")
    spec = head_spec(name)
    weight = class_weight if class_weight != "none" else None
    head = spec.build(weight, seed, calibrate or "sigmoid")
    if calibrate and not spec.baseline and not spec.calibrates_itself:
        return CalibratedHead(head, calibrate, weight, seed)
    return head


def calibrated_grid(grid: dict[str, list], head) -> dict[str, list]:  # noqa: ANN001 - an estimator
    """A --tune grid (``head__C``…) addressed through a :class:`CalibratedHead` when there is one."""
    if not isinstance(head, CalibratedHead):
        return grid
    return {key.replace("head__", "head__estimator__", 1): values for key, values in grid.items()}


def scale_rules(head: str, images: int, rows: int) -> dict[str, tuple[int, str]]:
    """What ``head`` does differently on ``images`` training images (``rows`` feature rows, views included) than
    on few: each rule's name, the limit that sets it (both name the run) and what it does, in a sentence. Empty
    below every limit, so runs on smaller data keep their names."""
    rules = head_spec(head).scale_rules
    return rules(images, rows) if rules else {}


def training_sample(head: str, train: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """The training rows ``head`` is fitted on: all of ``train``, or past the head's ``sample_limit`` a sample of
    that many with each class's share kept (every class at least once), seeded."""
    sample_limit = head_spec(head).sample_limit
    limit = sample_limit() if sample_limit else None
    if limit is None or len(train) <= limit:
        return train
    rng = np.random.default_rng(seed)
    labels = y[train]
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts * limit / len(train)).astype(int))
    for k in np.argsort(-(counts * limit / len(train) - quota))[:max(0, limit - quota.sum())]:
        quota[k] += 1  # the rows left by rounding down, to the classes closest to their next row
    picked = [rng.choice(train[labels == c], size=min(q, n), replace=False)
              for c, q, n in zip(classes, quota, counts, strict=True)]
    return np.sort(np.concatenate(picked))


def make_pipeline(head: str, class_weight: str | None = "balanced", pca: int | None = None,
                  seed: int = 0, standardize: bool = True, image_dim: int | None = None,
                  meta_numeric: int = 0, meta_categorical: int = 0, calibrate: str = "",
                  zero_shot: ZeroShotText | None = None) -> Pipeline:
    """Scaling (fit on training rows only), optional PCA, then the head.

    The zero-shot head reads the image embedding as it is (its geometry is what it compares with text), so its
    pipeline is the head alone, built from ``zero_shot``.

    With tabular metadata the rows are ``image_dim`` image features, then ``meta_numeric`` numeric
    columns, then ``meta_categorical`` integer-coded categories (NaN = missing). Missing values
    are imputed (median / most frequent), numbers scaled and categories one-hot encoded, all
    inside the pipeline, so that they too are learned from training rows only.
    """
    if head == ZERO_SHOT:
        text = zero_shot
        found = ZeroShotHead() if text is None else ZeroShotHead(text.embeddings, text.classes, text.logit_scale)
        if calibrate:
            found = CalibratedHead(found, calibrate, class_weight if class_weight != "none" else None, seed)
        return Pipeline([("head", found)])
    image_step = StandardScaler() if standardize else "passthrough"
    if meta_numeric or meta_categorical:
        if image_dim is None:
            raise RunError("make_pipeline: metadata columns need image_dim")
        numeric = list(range(image_dim, image_dim + meta_numeric))
        categorical = list(range(image_dim + meta_numeric, image_dim + meta_numeric + meta_categorical))
        parts = [("image", image_step, list(range(image_dim)))]
        if numeric:
            parts.append(("numeric", Pipeline([("impute", SimpleImputer(strategy="median")),
                                               ("scale", StandardScaler())]), numeric))
        if categorical:
            parts.append(("categorical", Pipeline([
                ("impute", SimpleImputer(strategy="most_frequent")),
                ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False))]), categorical))
        steps = [("prep", ColumnTransformer(parts))]
    else:
        steps = [("scale", image_step)] if standardize else []
    if pca:
        steps.append(("pca", PCA(n_components=pca, random_state=seed)))
    steps.append(("head", make_head(head, class_weight, seed, calibrate)))
    return Pipeline(steps)


# --- the heads ------------------------------------------------------------------------------------------------
# Registration order is the order of `fast` and `all`. DINOv2's linear-probe recipe sweeps C over many decades.

def _knn_rules(images: int, rows: int) -> dict[str, tuple[int, str]]:
    # k-NN compares every held-out row with every training row, so its time grows with the square of the rows
    limit = estimators.KNN_MAX_TRAIN
    if images <= limit:
        return {}
    return {"training_sample": (limit, (
        "every held-out image is compared with every training image, a cost that grows with the square of the "
        f"rows; a fold or the final fit with more than {limit:,} training images (here up to "
        f"{images:,}) is trained on a stratified sample of {limit:,} of them (seeded)"))}


def _svm_linear_rules(images: int, rows: int) -> dict[str, tuple[int, str]]:
    limit = estimators.SGD_FULL_EPOCHS_ROWS
    if rows * 2 // 3 <= limit:  # the calibration fits' rows
        return {}
    return {"svm_linear_scale_rows": (limit, (
        f"its SGD makes {SGD_EPOCHS} passes up to {limit:,} rows per fit; here up to "
        f"{rows * 2 // 3:,}, so {sgd_epochs(rows * 2 // 3)} passes, the same number of updates, and each "
        f"calibration map learns from a sample of {limit:,} of its held-out rows"))}


def _mlp_rules(images: int, rows: int) -> dict[str, tuple[int, str]]:
    limit = estimators.MLP_PASS_ROWS
    if rows <= limit:
        return {}
    return {"mlp_pass_rows": (limit, (
        f"with up to {rows:,} training rows it checks its validation loss (and may stop early) every "
        f"{limit:,} rows, not once per epoch"))}


_SVM_GRID = {"head__C": [1.0, 0.1, 10.0], "head__gamma": [1.0, 0.3, 3.0]}
_BASELINE_REFUSAL = "a baseline predicts without looking at the image"
register_head(HeadSpec(
    "logreg", lambda cw, seed, _: LogisticRegression(C=1.0, max_iter=3000, class_weight=cw, random_state=seed),
    {"head__C": [1.0, *np.logspace(-4, 2, 13).round(6).tolist()]}, ("fast", "all")))
register_head(HeadSpec(
    "svm-linear", lambda cw, seed, cal: SVMHead("linear", alpha=1e-3, class_weight=cw, seed=seed, calibration=cal),
    {"head__alpha": [1e-3, 1e-4, 1e-2]}, ("fast", "all"), calibrates_itself=True, scale_rules=_svm_linear_rules))
register_head(HeadSpec(
    "svm-rbf", lambda cw, seed, cal: SVMHead("rbf", C=1.0, gamma=1.0, class_weight=cw, seed=seed, calibration=cal),
    _SVM_GRID, ("all",), calibrates_itself=True))
register_head(HeadSpec(
    "knn", lambda cw, seed, _: CosineKNN(n_neighbors=11), {"head__n_neighbors": [11, 5, 21]}, ("fast", "all"),
    scale_rules=_knn_rules, sample_limit=lambda: estimators.KNN_MAX_TRAIN,
    onnx_refusal="it searches its kept training rows with faiss, and skl2onnx's k-NN converter gives other "
                 "probabilities for the cosine metric with distance weights (measured: off by up to 0.9)"))
register_head(HeadSpec(
    "xgboost", lambda cw, seed, _: XGBHead(class_weight=cw, seed=seed),
    {"head__max_depth": [3, 2, 5], "head__learning_rate": [0.4, 0.1]}, ("all",)))
register_head(HeadSpec(
    "mlp", lambda cw, seed, _: TorchMLPClassifier(class_weight=cw, seed=seed),
    {"head__hidden": [256, 512], "head__dropout": [0.3, 0.5], "head__lr": [2e-3, 5e-4]}, ("fast", "all"),
    scale_rules=_mlp_rules, torch=True))
# not in `all`: libsvm's exact kernel SVM is O(n^2), minutes on 10k rows; the zero-shot head needs a CLIP-like
# backbone (a text tower) and its image embedding
register_head(HeadSpec(
    "svm-rbf-exact", lambda cw, seed, cal: SVMHead("rbf-exact", C=1.0, gamma=1.0, class_weight=cw, seed=seed,
                                                   calibration=cal),
    _SVM_GRID, calibrates_itself=True,
    onnx_refusal="skl2onnx's SVC converter differs from libsvm's calibrated probabilities here; export svm-rbf "
                 "(the Nystroem SVM) instead"))
register_head(HeadSpec(ZERO_SHOT, lambda cw, seed, _: ZeroShotHead(), note=" (no training: the baseline)"))
register_head(HeadSpec("majority", lambda cw, seed, _: DummyClassifier(strategy="most_frequent"), baseline=True,
                       onnx_refusal=_BASELINE_REFUSAL, note=" (baseline)"))
register_head(HeadSpec("stratified", lambda cw, seed, _: DummyClassifier(strategy="stratified", random_state=seed),
                       baseline=True, onnx_refusal=_BASELINE_REFUSAL, note=" (baseline)"))
