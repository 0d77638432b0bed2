"""Stage glue usable from Python: find the entry for a source, fit several heads, run the demo."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from featcache.backbones.catalog import canonical_name
from featcache.data.sources import ImageSource, column_key
from featcache.errors import RunError
from featcache.evaluation.audit import few_groups_message, leakage_message, leakage_summary
from featcache.evaluation.features import LabeledFeatures, check_test_classes, labeled_features
from featcache.evaluation.head_registry import ZERO_SHOT
from featcache.evaluation.protocol import Protocol, RunRecipe
from featcache.evaluation.runner import HeldOut, fit_head
from featcache.evaluation.splits import split_plan
from featcache.evaluation.subgroups import add_subgroups, checked_columns, values_of
from featcache.evaluation.zero_shot import zero_shot_text
from featcache.options import OPTIONS, Grouping
from featcache.progress import Reporter
from featcache.recipes import FitPlan
from featcache.store.entries import CacheEntry, find_entries
from featcache.store.fusion import FusedEntry

# the extract options that fit selects an entry by (each None: any entry), declared by the options (``selects``)
SELECTING = tuple(option.name for option in OPTIONS if option.selects and option.name != "backbone")


@dataclass(frozen=True)
class EntrySelection:
    """Which cache entry of a source ``fit`` reads: the backbone (None: the one the source was extracted with,
    when there is one), a pooling it must have, the ``--preprocess`` filters it was made with (matched exactly: a
    filtered entry is never taken for an unfiltered one) and the extraction settings fit selects by
    (:data:`SELECTING`, each None for any). The newest entry that matches is taken."""

    backbone: str | None = None
    pool: str | None = None
    preprocess: tuple[str, ...] = ()
    precision: str | None = None
    engine: str | None = None
    resampler: str | None = None
    views: int | None = None
    resize: str | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **given: Any) -> EntrySelection:
        """The selection the checked fit ``options`` ask for, with ``given`` in place of theirs."""
        return cls(**{f.name: given[f.name] if f.name in given else options.get(f.name) or f.default
                      for f in fields(cls)})

    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SELECTING}


def find_entry(cache_root: Path, source: ImageSource, selection: EntrySelection,
               reporter: Reporter | None = None) -> CacheEntry:
    """The newest cache entry of ``source`` that ``selection`` matches. When several match, ``reporter`` is told
    which was taken and how the others differ."""
    backbone, pool, filters = selection.backbone, selection.pool, tuple(selection.preprocess)
    if backbone is None:  # the backbone the data was extracted with, when there is exactly one
        extracted = sorted({e.manifest["backbone"] for e in find_entries(cache_root)
                            if e.manifest["dataset"] == source.name})
        if len(extracted) > 1:
            raise RunError(f"{source.location} has features of {len(extracted)} backbones in {cache_root} "
                           f"({', '.join(extracted)}); say which with --backbone (a+b fuses them)")
        backbone = extracted[0] if extracted else "efficientnet_lite0"
    backbone = canonical_name(backbone)  # hf:./monet was recorded as its folder's absolute path
    wanted = selection.settings()
    entries = [e for e in find_entries(cache_root)
               if e.manifest["dataset"] == source.name and e.manifest["backbone"] == backbone
               and (pool is None or pool in e.pools) and e.filters == filters
               and all(v is None or e.settings[k] == v for k, v in wanted.items())]
    if not entries:
        asked = {**wanted, "preprocess": ",".join(filters)}
        described = "".join(f" {k} {v}" for k, v in {"pool": pool, **asked}.items() if v)
        options = "".join(f" --{k} {v}" for k, v in asked.items() if v)
        raise RunError(f"no features of {source.location} with {backbone}{described} in {cache_root}; run "
                       f"`featcache extract --backbone {backbone} --data {source.location}{options}` first")
    chosen = max(entries, key=lambda e: e.manifest["provenance"]["date"])
    if len(entries) > 1 and reporter is not None:
        differ = [k for k in wanted if len({e.settings[k] for e in entries}) > 1]
        settings = ", ".join(f"{k} {chosen.settings[k]}" for k in differ) or "the same settings"
        others = "; ".join(f"{e.path.name} ({', '.join(f'{k} {e.settings[k]}' for k in differ) or 'alike'})"
                           for e in entries if e is not chosen)
        pick = (f"Choose with {' or '.join(f'--{k}' for k in differ)}" if differ else
                "They differ in nothing fit selects by: delete the folders of the ones you no longer want")
        reporter.info(f"features of {backbone}: {chosen.path.name} ({settings}), the newest of {len(entries)} "
                      f"matching entries; the others: {others}. {pick}")
    return chosen


def fit_many(source: ImageSource, entry: CacheEntry, recipe: RunRecipe, test_source: ImageSource | None = None,
             test_entry: CacheEntry | None = None, plan: FitPlan = FitPlan(), reporter: Reporter | None = None,
             on_head: Callable[[], None] | None = None) -> list[Path]:
    """Fit every head of ``recipe`` on one entry and pooling (see :func:`featcache.evaluation.runner.fit_head`),
    each scored on ``test_source`` (its features ``test_entry``) when given; ``on_head`` is called after each (a
    study's overall progress). ``plan``: redo, fold workers, a Ray cluster."""
    reporter = reporter or Reporter(quiet=True)
    broken = recipe.broken_rule(test_source is not None)
    if broken:
        raise RunError(broken)
    heads, protocol, label_map, classes = list(recipe.heads), recipe.protocol, recipe.label_map, recipe.classes
    if test_source is not None:
        check_test_classes(source, test_source, label_map, classes)
    if protocol.subgroups:  # a column that is not there is refused before any fitting
        checked_columns(source, protocol.subgroups)
    if protocol.conformal_by:  # (the rules between the options were checked at the door: featcache.option_rules.RULES)
        by = checked_columns(source, [protocol.conformal_by], "--conformal-by")[0]
        protocol = replace(protocol, conformal_by=by)  # the column as the data spells it names the run
    if ZERO_SHOT in heads and (protocol.pca or protocol.meta):  # before any work
        raise RunError(f"--head zero-shot reads the image embedding as it is: fit it without "
                       f"{'--pca' if protocol.pca else '--meta'} (in a run of its own)")
    pool = entry.pool if isinstance(entry, FusedEntry) else recipe.pool or entry.pools[0]
    data = labeled_features(source, entry, pool, label_map, classes, protocol.meta, groups=protocol.groups,
                            near_dup_threshold=protocol.near_dup_threshold)
    for note in data.notes[:10]:
        reporter.info(note)
    test = labeled_features(test_source, test_entry, pool, label_map, classes, protocol.meta,
                            data.meta_spec, groups=test_grouping(protocol), audit=False) if test_source else None
    if protocol.conformal_by:  # each image's calibration group; a test set without the column takes the overall one
        data.strata = np.array(values_of(source, by, data.ids), dtype=object)
        tested = test_source is not None and any(column_key(c) == column_key(by) for r in test_source.records[:1]
                                                 for c in r.meta)
        if test is not None and tested:
            column = checked_columns(test_source, [by], "--conformal-by")[0]
            test.strata = np.array(values_of(test_source, column, test.ids), dtype=object)
        elif test is not None:
            reporter.warn(f"--conformal-by {by}: {test_source.location} has no such column, so its images' sets "
                          "use the threshold calibrated on all training images")
    report_protocol(data, protocol, reporter)
    label_desc = recipe.label_description()
    zero_shot = replace(protocol, zero_shot=zero_shot_text(entry, pool, list(data.classes), protocol.prompt_template,
                                                           protocol.prompts, reporter)) if ZERO_SHOT in heads else None
    runs = []
    task = reporter.task(f"fit {len(heads)} head(s) on {len(data.y)} images", total=len(heads), unit="head")
    try:
        for head in heads:
            runs.append(fit_head(data, entry, head, pool, zero_shot if head == ZERO_SHOT else protocol, source.name,
                                 label_desc, HeldOut.of(test, test_source.name if test_source else None), plan,
                                 reporter))
            if protocol.subgroups:
                add_subgroups(runs[-1], source, test_source, protocol.subgroups, reporter)
            task.advance(1)
            if on_head is not None:
                on_head()
    finally:
        task.close()
    return runs


def test_grouping(protocol: Protocol) -> Grouping:
    """How a held-out set is grouped (for its bootstrap): by its own group column, never by
    near-duplicates of the training set's kind."""
    return Grouping.none if protocol.groups == Grouping.near_duplicates.value else Grouping.auto


def report_protocol(data: LabeledFeatures, protocol: Protocol, reporter: Reporter) -> None:
    """Say, before any fitting, how the images are split and what the leakage audit found; an
    ungrouped split is a warning unless asked for with --no-groups."""
    folds, counts = split_plan(data, protocol, 0)
    reporter.info(f"protocol: {protocol.describe(data.grouping, counts)}")
    if not data.grouping["grouped"] and protocol.split == "cv" and data.grouping["mode"] != "none":
        reporter.warn(f"cross-validation is NOT grouped ({data.grouping['by']}): images of one patient or "
                      "lesion can land in training and held-out folds. Pass --group-col NAME, or --no-groups "
                      "if every image is independent")
    message, serious = leakage_message(leakage_summary(data, folds), data.grouping)
    (reporter.warn if serious else reporter.info)(message)
    few = few_groups_message(data, len(folds)) if protocol.split == "cv" else None
    if few:
        reporter.warn(few)
