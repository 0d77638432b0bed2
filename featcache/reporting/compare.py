"""The comparison table over finished runs: rich on screen, CSV and Markdown on disk, and a plot."""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

import numpy as np
from rich.table import Table

from featcache.errors import CacheError, FeatcacheError
from featcache.evaluation.head_registry import ZERO_SHOT, is_baseline
from featcache.evaluation.head_registry import head_note as registered_note
from featcache.evaluation.metrics import MAIN_METRICS
from featcache.options import Metric
from featcache.store.entries import CacheEntry
from featcache.store.naming import METRICS, cache_root_of_run, entry_of_run, find_runs
from featcache.store.runs import Predictions, has_test_predictions, read_metrics, read_predictions


def head_note(head: str) -> str:
    """What a head's row says beside its name: a baseline that never looks at the image, or zero-shot."""
    return registered_note(head.split(" (")[0])


def is_baseline_head(head: str) -> bool:
    """A row's head (``majority``, ``stratified (…)``) is a baseline that never looks at the image."""
    return is_baseline(head.split(" (")[0])


@dataclass
class Row:
    run: Path
    dataset: str
    backbone: str
    pool: str
    head: str
    protocol: str
    n_images: int
    metrics: dict  # metric -> {"mean", "std", "pooled", "ci"}
    test: dict | None
    config: dict | None = None
    members: tuple[Path, ...] = ()  # an ensemble's runs, best first
    ensemble: str | None = None  # an ensemble's --ensemble spelling (top3, stack)
    held_out: str = ""  # the held-out side's settings (test set, alignment, prediction sets): see held_out_label
    conformal: dict | None = None  # with --conformal: metrics.json's out-of-fold coverage and set sizes
    without_copies: dict | None = None  # scores without held-out images copied in training (metrics.json)
    subgroups: dict | None = None  # with --subgroups: metrics.json's scores by subgroup (out of fold)


def held_out_label(config: dict) -> str:
    """What tells apart runs fit on the same folds: the test set they were scored on, its alignment and the
    prediction sets (``test isic2018 (align moments), sets 0.9 class``); empty when a run has none of them."""
    protocol = config.get("protocol", {})
    parts = []
    if config.get("test_ids_sha256"):
        name = config.get("test_dataset") or f"#{config['test_ids_sha256'][:8]}"
        parts.append(f"test {name} (align {protocol.get('test_align', 'none')})")
    if protocol.get("conformal"):
        by = f" by {protocol['conformal_by']}" if protocol.get("conformal_by") else ""
        by += " shift-weighted" if protocol.get("conformal_shift") == "weighted" else ""
        parts.append(f"sets {protocol['conformal']:g} {protocol.get('conformal_mode', 'marginal')}{by}")
    return ", ".join(parts)


def alignment_note(test: dict | None) -> str:
    """What a test score's features were aligned with: empty when unaligned, ``moments``, or what
    ``--test-align auto`` chose (``auto: none``, ``auto: moments``), as metrics.json records it."""
    if not test or not test.get("test_align"):
        return ""
    choice = test.get("test_align_choice")
    return f"auto: {choice['chosen']}" if choice else str(test["test_align"])


def head_label(config: dict, resize: str = "crop", entry_notes: tuple[str, ...] = (), own_resize: str = "crop") -> str:
    """The head's name with every setting that makes it a different model than the default
    (``resize``: the entry's --resize, which lives in the entry's manifest, not the run's config, and
    ``own_resize`` the backbone's own; ``entry_notes``: the entry's other non-default settings, e.g. its filters
    or resampler)."""
    protocol = config.get("protocol", {})
    variants = [*entry_notes] + [label for label, on in (
        (f"resize {resize}", resize != own_resize),
        ("raw features", protocol.get("standardize") is False),
        (f"PCA {protocol.get('pca')}", bool(protocol.get("pca"))),
        ("tuned", bool(protocol.get("tune"))),
        ("no class weights", protocol.get("class_weight") == "none"),
        (_views_label(config.get("views", 1), protocol.get("views", "all")), config.get("views", 1) > 1),
        (f"+ meta {protocol.get('meta')}", bool(protocol.get("meta"))),
        (f"{protocol.get('calibrate')} calibration", bool(protocol.get("calibrate"))),
    ) if on]
    return config["head"] + (f" ({', '.join(variants)})" if variants else "")


def _views_label(views: int, use: str) -> str:
    return {"all": f"{views} views + TTA", "train": f"{views} views, no TTA"}.get(use, "original view only")


def _entry_settings(entry_dir: Path, known: dict[Path, dict]) -> dict:
    """The run's entry's settings that set its features apart: resize, filters, resampler, engine."""
    if entry_dir not in known:
        try:
            known[entry_dir] = CacheEntry(entry_dir).settings
        except (CacheError, ValueError, KeyError):  # a run copied without its entry: label it as the default
            known[entry_dir] = {"views": 1, "resize": "crop", "preprocess": (), "resampler": "pil", "engine": "torch",
                                "own": {"resize": "crop", "resampler": "pil"}}
    return known[entry_dir]


def _entry_notes(settings: dict) -> tuple[str, ...]:
    own = settings.get("own", {})
    filters = settings["preprocess"]
    return tuple(note for note, on in ((f"--preprocess {','.join(filters)}", bool(filters)),
                                       (f"resampler {settings['resampler']}",
                                        settings["resampler"] != own.get("resampler", "pil")),
                                       ("int8", settings.get("precision") == "int8")) if on)


def _name_engines(rows: list[Row], engines: list[str]) -> list[Row]:
    """Rows alike but for the engine that extracted their features (features within 1e-4) get the
    engine in their label, so that no two rows of the table look the same."""
    keys = [(r.dataset, r.backbone, r.pool, r.head, r.protocol) for r in rows]
    mixed = {k for k in keys if len({e for k2, e in zip(keys, engines, strict=True) if k2 == k}) > 1}
    return [replace(r, head=f"{r.head} [{e}]") if k in mixed else r
            for r, k, e in zip(rows, keys, engines, strict=True)]


def checked_metric(metric: str, rows: list[Row] | None = None) -> str:
    """``metric`` if it is one of :class:`Metric` or ``auroc:<class>`` with a class some run has;
    otherwise a :class:`FeatcacheError` listing what is valid."""
    metric = metric.value if isinstance(metric, Enum) else metric
    valid = [m.value for m in Metric]
    if metric in valid:
        return metric
    if metric.startswith("auroc:"):
        if rows is None:
            return metric
        classes = sorted({c for r in rows for c in (r.config or {}).get("classes", [])})
        if metric[6:] in classes:
            return metric
        raise FeatcacheError(f"--metric {metric}: no run has the class {metric[6:]!r}; the classes are "
                             f"{', '.join(classes) or 'none'} (use auroc:<class>)")
    raise FeatcacheError(f"--metric {metric!r}: choose one of {', '.join(valid)}, or auroc:<class>")


def collect_runs(cache_root: Path, dataset: str | None = None, backbone: str | None = None,
                 head: str | None = None, metric: str | None = None) -> list[Row]:
    """Every finished run under ``cache_root`` that matches; ``metric`` (e.g. ``auroc:mel``) is read
    besides the main metrics."""
    rows, engines, entries = [], [], {}
    wanted = [*MAIN_METRICS, *([metric] if metric and metric not in MAIN_METRICS else [])]
    for run in find_runs(cache_root):
        result = read_metrics(run)
        config = result["config"]
        if dataset and config["dataset"] != dataset:
            continue
        if backbone and config["backbone"] != backbone:
            continue
        if head and config["head"] not in head.split(","):
            continue
        metrics = {}
        for m in wanted:
            if m in result["folds"]:
                metrics[m] = {**result["folds"][m], "pooled": result["pooled"].get(m),
                              "ci": result["pooled"].get("ci95", {}).get(m),
                              "n_folds": result.get("n_folds", len(result.get("per_fold", [])))}
        protocol = result["protocol"] + (f" [{config['labels']}]" if config.get("labels") else "")
        settings = _entry_settings(entry_of_run(run), entries)
        rows.append(Row(run, config["dataset"], config["backbone"], config["pool"],
                        head_label(config, settings["resize"], _entry_notes(settings), settings["own"]["resize"]),
                        protocol,
                        _scored(result), metrics, result.get("test"), config,
                        held_out=held_out_label(config), conformal=result.get("conformal"),
                        without_copies=result.get("without_training_copies"), subgroups=result.get("subgroups")))
        engines.append(settings["engine"])
    return _name_engines(rows, engines)


def _scored(result: dict) -> int:
    """How many images a run scored: all under CV, the test part of a single split (runs before n_scored:
    from its split counts)."""
    return result.get("n_scored") or (result.get("split_counts") or {}).get("test") or result["n_images"]


def ensemble_rows(rows: list[Row], spec: str, metric: str = "balanced_accuracy",
                  notes: list[str] | None = None) -> list[Row]:
    """Ensembles of each comparable group of runs: ``topN`` soft-votes the N best, ``stack`` fits a
    meta-learner on all of them (:mod:`featcache.evaluation.stacking`).

    Runs are comparable when they scored the same images under the same protocol, so their
    out-of-fold predictions line up image by image; the ensemble is scored exactly like a run (its
    interval by the same bootstrap). Both are nested in the runs' folds, so their CV scores carry no
    choice made on the images they score: ``topN`` chooses, for each fold, the N runs that score best on
    the other folds' images and votes them on this fold's (:func:`_nested_vote`); ``stack`` fits its
    meta-learner on the other folds. The members shown, and the test set's vote, are the N best over
    all folds (what the nested score estimates). Why a group got no ensemble, or its score is not nested
    (a single split), is added to ``notes``.
    """
    from featcache.evaluation.stacking import stack

    stacking = spec == "stack"
    if not stacking and (not spec.startswith("top") or not spec[3:].isdigit() or int(spec[3:]) < 2):
        raise ValueError(f"--ensemble {spec}: use topN with N >= 2 (e.g. top3), or stack")
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.config is None or is_baseline_head(row.head) or metric not in row.metrics:
            continue
        # runs whose test features were aligned differently are not combined: their test predictions differ
        key = (row.dataset, row.protocol, row.config.get("ids_sha256"), row.config.get("test_ids_sha256"),
               row.held_out)
        groups.setdefault(key, []).append(row)
    out = []
    for (dataset, protocol, _, _, held_out), members in groups.items():
        test_align = members[0].config.get("protocol", {}).get("test_align", "none")
        candidates = sorted(members, key=lambda r: -(r.metrics[metric].get("pooled") or 0.0))
        size = len(candidates) if stacking else int(spec[3:])
        members = candidates[:size]
        where = f"--ensemble {spec} on {dataset} ({protocol})"
        if len(members) < max(size, 2):
            _note(notes, f"{where}: only {len(members)} run(s) to combine")
            continue
        candidate_oof = [read_predictions(r.run, "oof") for r in candidates]
        oof, first = candidate_oof[:size], candidate_oof[0]
        if any(o.ids != first.ids or o.classes != first.classes or not np.array_equal(o.seeds, first.seeds)
               for o in candidate_oof):
            _note(notes, f"{where}: the runs' out-of-fold predictions are not of the same images, so none is made")
            continue
        if stacking and len(np.unique(first.folds)) < 2:
            _note(notes, f"{where}: a single train/test split leaves no out-of-fold predictions of the training "
                         "images to fit a meta-learner on; use cross-validation (--split cv) or a soft vote (N)")
            continue
        tests = _test_predictions(members, first.classes, "test")
        if tests is None and all(has_test_predictions(r.run) for r in members):
            _note(notes, f"{where}: the runs scored different test images (or classes), so it has no test score")
        # with --test-align, the members' as-trained test predictions too: the ensemble's score before alignment
        unaligned = _test_predictions(members, first.classes, "test_unaligned") if test_align != "none" else None
        if unaligned and [t.ids for t in unaligned] != [t.ids for t in tests or []]:
            unaligned = None
        both = (tests or []) + (unaligned or [])  # one meta-learner (or vote) for both: only the inputs differ
        if stacking:
            stacked = stack([o.proba for o in oof], first.labels, first.classes, first.seeds, first.folds,
                            first.group_array(np.ones(len(first.labels), dtype=bool)),
                            [np.concatenate([t.proba for t in both[k::len(members)]]) for k in range(len(members))]
                            if tests else None)
            proba, t_both = stacked.oof, stacked.test
        else:
            proba = _nested_vote(candidate_oof, size, metric)
            if len(np.unique(first.folds)) < 2 and len(candidates) > size:
                _note(notes, f"{where}: a single train/test split leaves no other images to choose the {size} "
                             "members on, so they are chosen on the images they are scored on (optimistic); use "
                             "cross-validation (--split cv) for a nested score")
            t_both = (np.concatenate([np.mean([t.proba for t in part], axis=0) for part in (tests, unaligned) if part])
                      if tests else None)
        metrics, test = _ensemble_scores(first, proba, members[0].metrics, tests, unaligned, t_both, test_align)
        seeds = np.unique(first.seeds)
        names = " + ".join(f"{r.backbone}/{r.pool}/{r.head}" for r in members)
        label = f"stack of {len(members)}: {names}" if stacking else f"{spec}: {names}"
        out.append(Row(members[0].run.parent, dataset, "ensemble", "–", label, protocol,
                       len(first.labels) // len(seeds), metrics, test, None, tuple(r.run for r in members), spec,
                       held_out))
    return out


def _ensemble_scores(first: Predictions, proba: np.ndarray, metric_names: dict, tests: list | None,
                     unaligned: list | None, t_both: np.ndarray | None, test_align: str) -> tuple[dict, dict | None]:
    """An ensemble scored exactly like a run: its out-of-fold ``proba`` pooled (with the bootstrap interval) and
    per fold, over the metrics in ``metric_names``; its test predictions ``t_both`` (then, with --test-align, the
    unaligned ones) scored on the members' test set."""
    from featcache.evaluation.metrics import compute_metrics, score_parts, score_with_ci

    seeds = np.unique(first.seeds)
    parts = [(first.labels[first.seeds == s], proba[first.seeds == s], first.group_array(first.seeds == s))
             for s in seeds]
    pooled = score_parts(parts, first.classes)
    cells = [(first.seeds == s) & (first.folds == f) for s in seeds for f in np.unique(first.folds)]
    per_fold = [compute_metrics(first.labels[at], proba[at], first.classes) for at in cells if at.any()]
    metrics = {m: {"mean": float(np.mean([f[m] for f in per_fold])), "std": float(np.std([f[m] for f in per_fold])),
                   "pooled": pooled[m], "ci": pooled["ci95"].get(m), "n_folds": len(per_fold) // len(seeds)}
               for m in metric_names if m in pooled}
    test = None
    if tests:
        t_labels, n_test = tests[0].labels, len(tests[0].labels)
        keep = np.isin(t_labels, first.classes)
        test = score_with_ci(t_labels[keep], t_both[:n_test][keep], first.classes, tests[0].group_array(keep))
        if unaligned:
            before = score_with_ci(t_labels[keep], t_both[n_test:][keep], first.classes, tests[0].group_array(keep))
            test["unaligned"] = {k: before[k] for k in (*MAIN_METRICS, "ci95") if k in before}
            test["test_align"] = test_align
    return metrics, test


def _nested_vote(oof: list, size: int, metric: str) -> np.ndarray:
    """The soft vote of ``size`` of the runs' out-of-fold probabilities (``oof``, every candidate's),
    the ``size`` chosen for each fold (and seed) by ``metric`` on the other folds' images only: choosing
    them on the images they are then scored on would make the score optimistic (the best of many noisy
    runs looks good by luck). With a single split there are no other images: the best on all."""
    from featcache.evaluation.metrics import compute_metrics

    first = oof[0]
    if len(oof) == size:  # nothing to choose
        return np.mean([o.proba for o in oof], axis=0)
    proba = np.empty_like(first.proba)
    for seed in np.unique(first.seeds):
        for fold in np.unique(first.folds[first.seeds == seed]):
            scored = (first.seeds == seed) & (first.folds == fold)
            rest = (first.seeds == seed) & ~scored
            choose_on = rest if rest.any() else scored
            scores = [compute_metrics(first.labels[choose_on], o.proba[choose_on], first.classes)[metric] for o in oof]
            chosen = np.argsort(scores, kind="stable")[::-1][:size]
            proba[scored] = np.mean([oof[k].proba[scored] for k in chosen], axis=0)
    return proba


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def _test_predictions(members: list[Row], classes: list[str], which: str) -> list | None:
    """Every member's held-out predictions (``test`` or ``test_unaligned``), or None unless all have them
    for the same images and classes."""
    if not all(has_test_predictions(r.run, unaligned=which == "test_unaligned") for r in members):
        return None
    tests = [read_predictions(r.run, which) for r in members]
    if any(t.ids != tests[0].ids or t.classes != classes for t in tests):
        return None
    return tests


def unique_rows(rows: list[Row]) -> list[Row]:
    """Each run once: only the same run (the same run id, so the same inputs, kept in two cache entries)
    collapses, to the newest; baselines, which do not look at the features, appear once per dataset,
    protocol and held-out setting, with the backbone shown as '(any)'. Runs that share their CV scores but
    differ on the held-out side (test set, --test-align, --conformal) are different runs and all appear."""
    kept: dict[tuple, Row] = {}
    for row in sorted(rows, key=lambda r: r.run.stat().st_mtime if r.run.exists() else 0, reverse=True):
        if is_baseline_head(row.head):
            scores = tuple(round((row.metrics.get(m) or {}).get("pooled") or 0.0, 6) for m in MAIN_METRICS)
            key = (row.dataset, row.protocol, row.head, row.n_images, (row.config or {}).get("ids_sha256"),
                   row.held_out, scores)
            row = replace(row, backbone="(any)", pool="–")
        else:
            key = (row.run.name,)
        kept.setdefault(key, row)
    return list(kept.values())


def pooled_score(row: Row, metric: str) -> float:
    """The score runs are ranked by: the pooled out-of-fold value of ``metric`` (-1 when missing)."""
    value = (row.metrics.get(metric) or {}).get("pooled")
    return -1.0 if value is None else value


def sort_rows(rows: list[Row], metric: str) -> list[Row]:
    """The one ranking of runs (compare and report alike): grouped by dataset and protocol (never ranked
    across them), then best first by the pooled score, the fold mean breaking ties."""
    return sorted(rows, key=lambda r: (r.dataset, r.protocol, -pooled_score(r, metric),
                                       -((r.metrics.get(metric) or {}).get("mean") or -1.0)))


def select_rows(cache_root: Path | list[Path], metric: str, dataset: str | None = None, backbone: str | None = None,
                head: str | None = None, runs: list[Path] | None = None,
                ensemble: str | int | None = None, notes: list[str] | None = None) -> list[Row]:
    """The one selection of runs (compare and report alike): every finished run under ``cache_root``
    (one root or several) that matches, each result once, with the ensembles ``ensemble`` asks for
    (``top3`` or 3: a soft vote of the 3 best runs of each comparable group; ``stack``: a meta-learner over
    all of them, see :func:`ensemble_rows`; why a group got none goes to ``notes``), ranked by :func:`sort_rows`."""
    metric = checked_metric(metric)
    roots = cache_root if isinstance(cache_root, list) else [cache_root]
    if runs is not None:  # runs named by path are read from their own caches, wherever --cache points
        wanted = {Path(r).resolve() for r in runs}
        roots = sorted({cache_root_of_run(r) for r in wanted if len(r.parents) > 3})
        finished = {p.resolve() for root in roots for p in find_runs(root)}
        missing = sorted(wanted - finished)
        if missing:
            raise FeatcacheError(f"{missing[0]}: not a finished run (no {METRICS} in a run folder of a cache)"
                                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; pass run "
                                 "folders as `featcache fit` wrote them")
    rows = [row for root in roots for row in collect_runs(root, dataset, backbone, head, metric)]
    if runs is not None:
        rows = [r for r in rows if r.run.resolve() in wanted]
    if not rows:
        return []
    checked_metric(metric, rows)
    rows = unique_rows(rows)
    if ensemble:
        try:
            rows += ensemble_rows(rows, ensemble if isinstance(ensemble, str) else f"top{ensemble}", metric, notes)
        except ValueError as exc:
            raise FeatcacheError(str(exc)) from None
    return sort_rows(rows, metric)


def frame_records(rows: list[Row], metric: str) -> list[dict]:
    """The rows as plain records (for pandas): scores as numbers, the ranking metric's first."""
    records = []
    for r in rows:
        m = r.metrics.get(metric) or {}
        ci = m.get("ci") or (None, None)
        # what a narrow printout shows first (it keeps the leading and trailing columns): the model and its score
        record = {"model": f"{r.backbone}/{r.pool}/{r.head}", metric: m.get("pooled"), f"{metric}_ci_low": ci[0],
                  f"{metric}_ci_high": ci[1], f"{metric}_fold_mean": m.get("mean"), f"{metric}_fold_std": m.get("std")}
        for other in MAIN_METRICS:
            if other != metric:
                record[other] = (r.metrics.get(other) or {}).get("pooled")
        if r.test:
            record["test_balanced_accuracy"] = r.test.get("balanced_accuracy")
            record["test_auroc"] = r.test.get("auroc")
            record["test_unaligned_balanced_accuracy"] = (r.test.get("unaligned") or {}).get("balanced_accuracy")
            record["test_aligned_with"] = alignment_note(r.test) or "none"
            record["test_domain_auroc"] = (r.test.get("shift") or {}).get("domain_auroc")
        conformal = (r.config or {}).get("protocol", {}).get("conformal")
        if conformal:
            saved = read_metrics(r.run).get("conformal", {})
            record |= {"conformal_level": conformal, "conformal_coverage": saved.get("coverage"),
                       "conformal_mean_set_size": saved.get("mean_set_size")}
        record |= {"dataset": r.dataset, "protocol": r.protocol, "held_out": r.held_out, "run": str(r.run),
                   "backbone": r.backbone,
                   "pool": r.pool, "head": r.head, "baseline": is_baseline_head(r.head),
                   "n": r.n_images}
        records.append(record)
    return records


def worst_text(subgroups: dict | None) -> str:
    """The worst subgroup as a person reads it: ``sex=female (40): 0.612 [0.501, 0.702], below`` ("below": its
    interval lies wholly under the run's score)."""
    from featcache.evaluation.subgroups import worst_group

    found = worst_group(subgroups or {})
    if found is None:
        return "–"
    column, value, entry = found
    ba = entry["balanced_accuracy"]
    ci = f" [{ba['ci'][0]:.3f}, {ba['ci'][1]:.3f}]" if ba.get("ci") else ""
    return f"{column}={value} ({entry['n']}): {ba['pooled']:.3f}{ci}" + (", below" if entry.get("below_overall")
                                                                        else "")


def sets_text(sets: dict | None, level_from: dict | None = None) -> str:
    """Prediction sets as a person reads them: ``0.903 at 0.90, 1.42 classes`` (``level_from``: the
    out-of-fold record that holds the level, for a test record that does not)."""
    if not sets:
        return "–"
    level = sets.get("level", (level_from or {}).get("level"))
    target = f" at {level:.2f}" if level else ""
    weights = sets.get("weights")  # --conformal-shift weighted: how many calibration images the weights leave
    weighted = (f" (shift-weighted, {weights['effective_calibration_images']:.0f} of "
                f"{weights['calibration_images']} calibration images in effect)" if weights else "")
    return f"{sets['coverage']:.3f}{target}, {sets['mean_set_size']:.2f} classes{weighted}"


def _fmt(entry: dict | None) -> str:
    if not entry:
        return "–"
    if entry.get("n_folds") == 1:  # a single split has no spread over folds: its interval says it all
        return f"{entry['mean']:.3f} (one split)"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def _fmt_ci(entry: dict | None) -> str:
    if not entry or not entry.get("ci"):
        return "–"
    return f"{entry['pooled']:.3f} [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"


HELD_OUT = "held-out settings"


def table_rows(rows: list[Row], metric: str, paths: bool = False) -> tuple[list[str], list[list[str]]]:
    held_out = any(r.held_out for r in rows)
    header = ["dataset", "protocol", *([HELD_OUT] if held_out else []), "backbone", "pool", "head", "n",
              f"{metric} pooled [95% CI]", f"{metric} (folds)", *[m for m in MAIN_METRICS if m != metric]]
    has_test = any(r.test for r in rows)
    has_sets = any(r.conformal for r in rows)
    has_copies = any(r.without_copies for r in rows)
    has_groups = any(r.subgroups for r in rows)
    if has_groups:
        header.append("worst group (balanced_accuracy [95% CI])")
    if has_copies:
        header.append("balanced_accuracy without held-out images copied in training [95% CI]")
    if has_sets:
        header.append("prediction sets: coverage, mean size")
    if has_test:
        header += ["test balanced_accuracy [95% CI]", "test auroc", "test unaligned balanced_accuracy",
                   "test shift (domain AUROC)"]
        if has_sets:
            header.append("test prediction sets: coverage, mean size")
    if paths:
        header.append("run folder")
    body = []
    for r in rows:
        line = [r.dataset, r.protocol, *([r.held_out or "–"] if held_out else []), r.backbone, r.pool,
                r.head + head_note(r.head), str(r.n_images),
                _fmt_ci(r.metrics.get(metric)), _fmt(r.metrics.get(metric)),
                *[_fmt(r.metrics.get(m)) for m in MAIN_METRICS if m != metric]]
        if has_groups:
            line.append(worst_text(r.subgroups))
        if has_copies:
            w = r.without_copies or {}
            line.append(_fmt_ci({"pooled": w.get("balanced_accuracy"), "ci": (w.get("ci95") or {}).get(
                "balanced_accuracy")}) + (f" (n {w['n_images']})" if w else ""))
        if has_sets:
            line.append(sets_text(r.conformal))
        if has_test:
            t = r.test or {}
            ci = t.get("ci95", {}).get("balanced_accuracy")
            shift, unaligned = t.get("shift") or {}, t.get("unaligned") or {}
            note = f" ({alignment_note(t)})" if alignment_note(t) else ""
            line += [f"{t['balanced_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]{note}" if t and ci else "–",
                     f"{t['auroc']:.3f}" if t.get("auroc") is not None else "–",
                     f"{unaligned['balanced_accuracy']:.3f}" if "balanced_accuracy" in unaligned else "–",
                     f"{shift['domain_auroc']:.2f}" if "domain_auroc" in shift else "–"]
            if has_sets:
                line.append(sets_text(t.get("conformal"), r.conformal))
        if paths:
            line.append(str(r.run))
        body.append(line)
    return header, body


def write_outputs(rows: list[Row], metric: str, out_dir: Path) -> dict[str, Path]:
    try:
        return _write_outputs(rows, metric, out_dir)
    except OSError as exc:
        raise CacheError(f"cannot write the comparison to {out_dir} ({exc.strerror or exc}); pass --out DIR "
                         "with a writable folder (the table above is complete)") from None


def _write_outputs(rows: list[Row], metric: str, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    header, body = table_rows(rows, metric, paths=True)  # the files always say where each run is
    paths = {"csv": out_dir / "compare.csv", "md": out_dir / "compare.md", "png": out_dir / "compare.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(rows, metric, paths["png"])
    return paths


def forest_png(rows: list[Row], metric: str, title: str) -> bytes:
    """The leaderboard as a forest plot: pooled score and 95 % interval per run, best first,
    baselines grey, ensembles orange, zero-shot purple, a chance line where chance is known."""
    from featcache.reporting.plots import forest_figure

    rows = [r for r in rows if (r.metrics.get(metric) or {}).get("pooled") is not None]
    classes = next((len(r.config["classes"]) for r in rows if r.config and r.config.get("classes")), 0)
    chance = (1 / classes if metric == "balanced_accuracy" and classes else
              0.5 if metric.startswith("auroc") else None)
    colours = ["#999999" if is_baseline_head(r.head) else "#c2571a" if r.backbone == "ensemble"
               else "#7b4fa0" if r.head.split(" (")[0] == ZERO_SHOT else "#2b6cb0" for r in rows]
    return forest_figure([_shorten(f"{r.backbone} / {r.pool} / {r.head}" + (f" · {r.held_out}" if r.held_out else ""),
                                   110) for r in rows],
                         [r.metrics[metric]["pooled"] for r in rows],
                         [tuple(r.metrics[metric].get("ci") or (r.metrics[metric]["pooled"],) * 2) for r in rows],
                         colours, f"{metric}, pooled out-of-fold, with 95 % bootstrap interval", title, chance)


def _plot(rows: list[Row], metric: str, path: Path, top: int = 40) -> None:
    """compare.png: one forest plot per dataset and protocol, stacked, at most ``top`` runs each."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.protocol), []).append(row)
    first = next(iter(groups.items()), None)
    if first is None:
        return
    (dataset, protocol), members = first
    more = f" (top {top} of {len(members)})" if len(members) > top else ""
    extra = f"; {len(groups) - 1} more protocol(s) in compare.md" if len(groups) > 1 else ""
    path.write_bytes(forest_png(members[:top], metric, f"{dataset} · {_shorten(protocol, 80)}{more}{extra}"))


def _shorten(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def table_parts(rows: list[Row], metric: str, paths: bool = False) -> tuple[list[str], list[list[str]], str]:
    """The table as a person reads it (terminal, Jupyter and text alike): columns that hold one value for every
    row (dataset, protocol, held-out settings) move into the caption."""
    header, body = table_rows(rows, metric, paths)
    described = [i for i, name in enumerate(header) if name in ("dataset", "protocol", HELD_OUT)]
    constant = [i for i in described if len({line[i] for line in body}) == 1]
    caption = "; ".join(f"{header[i]}: {body[0][i]}" for i in constant)
    keep = [i for i in range(len(header)) if i not in constant]
    return [header[i] for i in keep], [[line[i] for i in keep] for line in body], caption


def rich_table(rows: list[Row], metric: str, paths: bool = False) -> Table:
    """On screen, columns that hold one value for every row move into the caption."""
    header, body, caption = table_parts(rows, metric, paths)
    table = Table(title=f"featcache compare — ranked by {metric} (pooled)", caption=caption or None)
    for name in header:
        table.add_column(name, overflow="fold")
    for line in body:
        table.add_row(*line)
    return table
