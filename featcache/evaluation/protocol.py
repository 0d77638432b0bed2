"""The protocol: how images are split and how heads are trained; its line is shown with every score."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING

from featcache import options
from featcache.errors import RunError
from featcache.options import Calibration, ClassWeight, Grouping, Split, UseViews

if TYPE_CHECKING:
    pass


def checked_choice(value: object, choices: type[Enum], option: str, optional: bool = False) -> str:
    """:func:`featcache.options.checked_choice`, failing as a :class:`RunError`."""
    try:
        return options.checked_choice(value, choices, option, optional)
    except options.ChoiceError as exc:
        raise RunError(str(exc)) from None


@dataclass
class Protocol:
    cv: int = 5
    split: str = "cv"  # Split
    seeds: int = 1
    class_weight: str = "balanced"  # ClassWeight
    pca: int | None = None
    tune: bool = False
    tune_budget_s: float = 300.0
    standardize: bool = True
    # On entries with several views: "all" = train on every view, average predictions over them;
    # "train" = train on every view, predict from the original; "first" = the original view only.
    views: str = "all"
    meta: str = ""  # comma list of metadata columns used as extra features, e.g. "age,sex,localization"
    calibrate: str = ""  # "", sigmoid, isotonic or temperature: recalibrate the head's probabilities
    groups: str = "auto"  # Grouping
    near_dup_threshold: float | None = None  # None: the calibrated one for the backbone (leakage.py)

    def __post_init__(self) -> None:
        self.split = checked_choice(self.split, Split, "--split")
        self.class_weight = checked_choice(self.class_weight, ClassWeight, "--class-weight")
        self.views = checked_choice(self.views, UseViews, "--use-views")
        self.calibrate = checked_choice(self.calibrate, Calibration, "--calibrate", optional=True)
        self.groups = checked_choice(self.groups, Grouping, "--groups")
        for name, value, low in (("--cv", self.cv, 2), ("--seeds", self.seeds, 1)):
            if int(value) < low:
                raise RunError(f"{name} {value}: must be at least {low}")
        if self.pca is not None and self.pca < 1:
            raise RunError(f"--pca {self.pca}: give a positive number of components")

    def describe(self, grouping: dict, split_counts: dict | None = None) -> str:
        """The protocol line shown with every score; an ungrouped CV says so in capitals."""
        counts = split_counts or {}
        if self.split == "official":
            val = f" / val {counts['val']} unused" if counts.get("val") else ""
            return f"official split (train {counts.get('train')}{val} / test {counts.get('test')})"
        if self.split == "random712":
            return (f"image-level random 7:1:2 split, UNGROUPED (train {counts.get('train')} / val "
                    f"{counts.get('val')} unused / test {counts.get('test')})")
        seeds = f" x{self.seeds} seeds" if self.seeds > 1 else " x1"
        if grouping.get("grouped"):
            return f"{self.cv}-fold grouped stratified CV{seeds} (groups: {grouping['by']})"
        return f"{self.cv}-fold stratified CV{seeds}, UNGROUPED ({grouping['by']})"

    def config(self) -> dict:
        """What names a run, with everything else that sets its numbers (see :func:`fit_head`)."""
        return asdict(self)
