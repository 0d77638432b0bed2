"""Typed recipes: what the stage doors take instead of loose scalars.

Each option declares the recipe it belongs to (:attr:`featcache.options.Option.recipe`); a door checks the
values it was given (:func:`featcache.options.checked_options`) and builds its recipes from them once, with
:meth:`FeatureRecipe.from_options` and :meth:`ExecutionPlan.from_options`. A recipe's fields are its options'
names with their declared defaults, so a recipe built in Python (``FeatureRecipe(views=4)``) means what the flag
means; ``tests/test_recipes.py`` keeps the fields and the declarations one list.

- :class:`FeatureRecipe`: what sets an entry's feature values on a backbone (its weights and poolings, the
  stored dtype, the precision, the views, the preprocessing, the engine) -- it names the entry.
- :class:`ExecutionPlan`: how an extraction runs (device, batch size, workers, shard size, lock, re-hashing, a
  Ray cluster) -- it changes no feature value, so it names nothing.
- :class:`ReportView`: what a report shows and how it ranks runs.
- :class:`FitPlan`: how a fit runs (redo finished runs, fold workers, a Ray cluster) -- it names nothing either.
  What names a run is its protocol (``featcache.evaluation.protocol``).

:func:`named_settings` is the one rule by which settings name things on disk (an entry's fingerprint, an image
transform, a run's protocol): a setting added after caches were first named is written only when it differs
from its default, so everything named before it keeps its name (Hugging Face datasets' fingerprint rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from featcache.options import BY_NAME, OPTIONS, Option

FEATURES = "features"
EXECUTION = "execution"
FIT_EXECUTION = "fit-execution"
VIEW = "view"


def _default(name: str) -> Any:
    return BY_NAME[name].default


def named_settings(values: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the settings of ``later`` that are at their default there: ``later`` maps each setting
    added after the first names were made to its default; every other setting is always written."""
    return {key: value for key, value in values.items() if key not in later or not _same(value, later[key])}


def _same(value: Any, default: Any) -> bool:
    """Equal, a list and a tuple of the same items included (JSON reads a tuple back as a list)."""
    if isinstance(value, list | tuple) and isinstance(default, list | tuple):
        return list(value) == list(default)
    return value == default


def recipe_options(recipe: str) -> tuple[Option, ...]:
    """The options declared to belong to ``recipe`` (:data:`FEATURES`, :data:`EXECUTION`), in declaration order."""
    return tuple(option for option in OPTIONS if option.recipe == recipe)


class _Recipe:
    """Built from checked option values by name; the values of options that are not its own are ignored."""

    @classmethod
    def from_options(cls, values: Mapping[str, Any], **extra: Any):  # noqa: ANN206 - the subclass
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{name: value for name, value in values.items() if name in names}, **extra)

    def but(self, **changes: Any):  # noqa: ANN201 - the subclass
        """This recipe with ``changes``."""
        return replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class FeatureRecipe(_Recipe):
    """What sets an entry's feature values on a backbone; the entry is named by it (with the backbone's weights'
    SHA-256 and its own preprocessing). Each field is the option of that name (``featcache extract --help``).

    ``weights`` and ``pools`` load a backbone given by name; a backbone handed in already loaded carries its own.
    ``calibration`` is no option: with int8, the calibration of the entry whose quantized model these features
    must come from (a held-out set's; default: this dataset's own images)."""

    weights: str | None = _default("weights")
    pools: tuple[str, ...] | None = _default("pools")
    dtype: str = _default("dtype")
    precision: str = _default("precision")
    jpeg_draft: bool = _default("jpeg_draft")
    input_size: int | None = _default("input_size")
    preprocess: tuple[str, ...] = _default("preprocess")
    norm_from: str | dict | None = _default("norm_from")
    engine: str = _default("engine")
    resampler: str | None = _default("resampler")
    views: int = _default("views")
    resize: str | None = _default("resize")
    calibration: dict | None = field(default=None, compare=True)

    def __post_init__(self) -> None:
        _check_fields(self, FEATURES)


@dataclass(frozen=True)
class ExecutionPlan(_Recipe):
    """How an extraction runs; it sets no feature value, so it names nothing. ``cluster``: a Ray cluster the job
    runs on (``featcache.extraction.ray.RayCluster``; None: this machine), built by the door from ``ray``."""

    device: str = _default("device")
    batch_size: int | None = _default("batch_size")
    workers: int | None = _default("workers")
    shard_size: int = _default("shard_size")
    break_lock: bool = _default("break_lock")
    rehash: bool = _default("rehash")
    cluster: Any = None

    def __post_init__(self) -> None:
        _check_fields(self, EXECUTION)


def _check_fields(recipe: _Recipe, name: str) -> None:
    """Each field checked as its option declares, whichever door built the recipe (values already checked pass
    unchanged). A filter's name is checked by the preprocessing that applies it (``data.images.Preprocess``), and
    ``norm_from`` may be the statistics themselves (a dict featcache wrote)."""
    for option in recipe_options(name):
        value = getattr(recipe, option.name)
        if isinstance(value, dict):
            continue
        checks = {option.check: _checked_where_applied} if isinstance(option.check, str) else None
        command = option.commands[0] if option.commands else None
        object.__setattr__(recipe, option.name, option.checked(value, command=command, checks=checks))


def _checked_where_applied(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class FitPlan(_Recipe):
    """How a fit runs; it sets no number, so it names no run. ``force``: redo runs and held-out evaluations that
    already finished. ``jobs``: worker processes for the folds (default: one per core, at most one per task; every
    fold is seeded, so the numbers do not depend on it). ``cluster``: the folds as tasks on a Ray cluster."""

    force: bool = _default("force")
    jobs: int | None = None
    cluster: Any = None

    def __post_init__(self) -> None:
        _check_fields(self, FIT_EXECUTION)


@dataclass(frozen=True)
class ReportView(_Recipe):
    """What a report shows of the runs, and how they are ranked (each field the option of that name, ``featcache
    report --help``); ``title`` heads the page. It reads runs, so it names nothing."""

    title: str = "featcache report"
    metric: str = _default("metric")
    ensemble: str | None = _default("ensemble")
    top: int = _default("top")
    best: int = _default("best")
    gallery: int = _default("gallery")
    max_mb: float = _default("max_mb")

    def __post_init__(self) -> None:
        _check_fields(self, VIEW)


# the fields that are no option: built by featcache, not given by a person
NOT_OPTIONS = {FeatureRecipe: ("calibration",), ExecutionPlan: ("cluster",), FitPlan: ("jobs", "cluster"),
               ReportView: ("title",)}
