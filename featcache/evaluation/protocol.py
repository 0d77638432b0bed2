"""The protocol: how images are split and how heads are trained; its line is shown with every score."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from featcache.option_rules import broken_rules, keyword_spelling
from featcache.options import BY_NAME
from featcache.recipes import named_settings

if TYPE_CHECKING:
    from featcache.evaluation.heads import ZeroShotText


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
    test_align: str = "none"  # Alignment: how held-out features are aligned to the training features
    conformal: float | None = None  # coverage of the prediction sets (None: no sets)
    conformal_mode: str = "marginal"  # ConformalMode
    conformal_by: str | None = None  # a metadata column: the sets calibrated within each of its values (Mondrian)
    conformal_shift: str = "none"  # ConformalShift: the test set's sets weighted by a domain classifier
    # metadata columns the run is also scored by: they read its predictions, so they do not name it (config())
    subgroups: tuple[str, ...] = ()
    # the zero-shot head's prompts (--prompt-template, --prompts) and, once the backbone has read them, their text
    # embeddings: they name a zero-shot run through its identity (runner.run_identity), not every run's config()
    prompt_template: str = "a skin image of {}"
    prompts: str | None = None
    zero_shot: ZeroShotText | None = None

    def __post_init__(self) -> None:
        # the fields keep their names (they name every run); each is checked by its option's declaration
        for field_name, option in (("cv", "cv"), ("split", "split"), ("seeds", "seeds"),
                                   ("class_weight", "class_weight"), ("pca", "pca"), ("tune", "tune"),
                                   ("tune_budget_s", "tune_budget"), ("standardize", "standardize"),
                                   ("views", "use_views"), ("calibrate", "calibrate"), ("groups", "groups"),
                                   ("near_dup_threshold", "near_dup_threshold"), ("test_align", "test_align"),
                                   ("conformal", "conformal"), ("conformal_mode", "conformal_mode"),
                                   ("conformal_shift", "conformal_shift")):
            value = getattr(self, field_name)
            if field_name == "calibrate" and value == "":
                continue
            setattr(self, field_name, BY_NAME[option].checked(value, command="fit"))

    @classmethod
    def from_options(cls, options: dict) -> Protocol:
        """The protocol the checked fit options describe (``featcache.fit``'s keywords, a study's [fit])."""
        return cls(cv=options["cv"], split=options["split"], seeds=options["seeds"],
                   class_weight=options["class_weight"], pca=options["pca"], tune=options["tune"],
                   tune_budget_s=options["tune_budget"], standardize=options["standardize"],
                   views=options["use_views"], meta=",".join(options["meta"] or ()),
                   calibrate=options["calibrate"] or "", groups=options["groups"],
                   near_dup_threshold=options["near_dup_threshold"], test_align=options["test_align"],
                   conformal=options["conformal"], conformal_mode=options["conformal_mode"],
                   conformal_by=options.get("conformal_by"),
                   conformal_shift=options.get("conformal_shift") or "none",
                   subgroups=tuple(options.get("subgroups") or ()),
                   prompt_template=options.get("prompt_template") or cls.prompt_template,
                   prompts=options.get("prompts"))

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
        """What names a run, with everything else that sets its numbers (see :func:`fit_head`). Fields added
        since runs were first named appear only when set, so a run made before them keeps its name."""
        config = asdict(replace(self, zero_shot=None))
        for name in ("subgroups", "prompt_template", "prompts", "zero_shot"):
            del config[name]
        config = named_settings(config, PROTOCOL_SETTINGS_ADDED)
        if config.get("test_align") == "coral":  # its covariances are shrunk by Ledoit-Wolf since featcache 0.4:
            config["coral_shrinkage"] = "ledoit-wolf"  # a run made with the fixed 0.1 is not this one
        if "conformal" not in config:
            del config["conformal_mode"]
        return config

    def training_config(self) -> dict:
        """What names a run: :meth:`config` without the held-out settings, which name each held-out evaluation
        of it instead (:meth:`heldout_config`). A run without held-out data keeps the name it always had."""
        return {k: v for k, v in self.config().items() if k not in HELDOUT_SETTINGS}

    def heldout_config(self) -> dict:
        """The held-out settings that name one held-out evaluation of a run (those left at their defaults
        left out)."""
        return {k: v for k, v in self.config().items() if k in HELDOUT_SETTINGS}


# settings added after the first runs were named, at their default: left out there, so those runs keep their names
PROTOCOL_SETTINGS_ADDED = {"test_align": "none", "conformal": None, "conformal_by": None, "conformal_shift": "none"}
# how a held-out set is scored by a trained run: they do not change its cross-validation (see heldout.py)
HELDOUT_SETTINGS = ("test_align", "coral_shrinkage", "conformal_shift")


@dataclass(frozen=True)
class RunRecipe:
    """What names the runs of one fit, besides the rows and features: the heads (a run each), the protocol, the
    pooling read (None: the entry's first) and how the labels are mapped or kept (``featcache fit --label-map``,
    ``--classes``)."""

    heads: tuple[str, ...]
    protocol: Protocol = field(default_factory=Protocol)
    pool: str | None = None
    label_map: str | None = None
    classes: str | None = None

    def label_description(self) -> str:
        """How the labels were made, as a run's config records it."""
        return ";".join(x for x in (f"map {self.label_map}" if self.label_map else "",
                                    f"classes {self.classes}" if self.classes else "") if x)

    def broken_rule(self, tested: bool) -> str | None:
        """The first rule between the options (:data:`featcache.option_rules.RULES`) that this recipe breaks, in the
        Python keywords' spelling, with a held-out set or without (``tested``); None when it breaks none. Every
        door checks the rules in its own spelling first; this is the stage's own check, for callers in Python."""
        p = self.protocol
        values = {"test_align": p.test_align, "conformal": p.conformal, "conformal_by": p.conformal_by,
                  "conformal_shift": p.conformal_shift, "groups": p.groups, "test_data": "given" if tested else None,
                  "heads": self.heads, "prompts": p.prompts, "prompt_template": p.prompt_template}
        broken = broken_rules("fit", values)
        return broken[0].message(values, keyword_spelling) if broken else None
