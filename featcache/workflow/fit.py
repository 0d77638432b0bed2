"""The fit workflow: the entry of each backbone asked for (fused side by side with a+b), the test set's features
(extracted like the training ones), every head fit and scored, the runs logged to MLflow when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.options import OptionError
from featcache.progress import Reporter
from featcache.recipes import FitPlan
from featcache.workflow.common import cache_root, open_data, ray_cluster, reporter_for


def fit_data(reporter: Reporter | None, options: dict[str, Any]) -> list[Path]:
    """Fit every head of the checked fit ``options``; the run folders (or held-out evaluation folders), in the
    order of the heads."""
    from featcache.evaluation.features import check_test_classes, label_counts
    from featcache.evaluation.fitting import EntrySelection, find_entry, fit_many
    from featcache.evaluation.protocol import Protocol, RunRecipe
    from featcache.extraction.extract import find_or_extract_like
    from featcache.store.fusion import FusedEntry, fused_pools

    o = options
    reporter = reporter_for(o["quiet"], reporter)
    if o["precision"] == "auto":
        raise OptionError("precision auto names no entry: give the precision the entry was extracted with (fp32 on "
                          "the CPU, bf16 or fp16 on CUDA, int8)")
    if o["engine"] == "auto":
        raise OptionError("engine auto names no entry: give the engine the entry was extracted with (torch, "
                          "onnxruntime or openvino; `featcache extract` says which auto took)")
    root = cache_root(o["cache"])
    if o["mlflow"] or o["mlflow_uri"]:  # before any work: a store that cannot take the runs is refused now
        from featcache.net import check_tracking_uri

        check_tracking_uri(o["mlflow_uri"], root)
    source = open_data(o["data"], o["images"], o["image_col"], o["label_col"], o["group_col"], reporter,
                   groups=o["groups"])
    backbones = o["backbone"].split("+") if o["backbone"] else [None]
    if len(set(backbones)) != len(backbones):
        raise OptionError(f"--backbone {o['backbone']}: a backbone is named twice; fuse different backbones (a+b)")
    pools = fused_pools(o["pool"], backbones)
    entries = [find_entry(root, source, EntrySelection.from_options(o, backbone=name, pool=pool), reporter)
               for name, pool in zip(backbones, pools, strict=True)]
    test_source = test_entries = None
    if o["test_data"]:
        from featcache.data.sources import open_test_source

        test_source = open_test_source(o["test_data"], image_col=o["image_col"], label_col=o["label_col"],
                                       group_col=o["test_group_col"])
        for note in test_source.notes[:10]:
            reporter.warn(note)
        check_test_classes(source, test_source, o["label_map"], ",".join(o["classes"]) if o["classes"] else None)
        if o["test_align"] != "none":
            from featcache.evaluation.shift import MIN_ALIGN_IMAGES

            scored = sum(label_counts(test_source, o["label_map"], ",".join(o["classes"] or ())).values())
            if scored < MIN_ALIGN_IMAGES:  # refused now, not after the whole CV
                raise OptionError(f"--test-align {o['test_align']}: {test_source.location} has "
                                  f"{scored} images to score, too few to estimate their statistics (at "
                                  f"least {MIN_ALIGN_IMAGES}); give a larger test set, or drop --test-align")
        test_entries = [find_or_extract_like(root, test_source, e, reporter) for e in entries]
    entry, test_entry = entries[0], test_entries[0] if test_entries else None
    if len(entries) > 1:  # backbone a+b: their features side by side
        entry = FusedEntry([(e, pool or e.pools[0]) for e, pool in zip(entries, pools, strict=True)])
        test_entry = (FusedEntry([(e, pool or e.pools[0]) for e, pool in zip(test_entries, pools, strict=True)])
                      if test_entries else None)
    classes = ",".join(o["classes"]) if o["classes"] else None
    pool = None if len(entries) > 1 else o["pool"]  # a fused entry carries each part's pooling
    recipe = RunRecipe(tuple(o["heads"]), Protocol.from_options(o), pool, o["label_map"], classes)
    paths = fit_many(source, entry, recipe, test_source, test_entry,
                     FitPlan.from_options(o, cluster=ray_cluster(o["ray"], reporter)), reporter)
    track_runs(paths, root, o["mlflow"], o["mlflow_uri"], reporter)
    return paths


def track_runs(runs: list[Path], root: Path, mlflow: bool, uri: str | None, reporter: Reporter) -> None:
    if mlflow or uri:
        from featcache.reporting.tracking import default_uri, log_runs

        log_runs(runs, root, uri)
        reporter.result(f"logged {len(runs)} run(s) to MLflow at {uri or default_uri(root)}")
