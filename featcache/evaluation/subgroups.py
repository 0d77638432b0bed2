"""Scores by subgroup: how a run does for each sex, age band, body site, skin type, clinic …

Any metadata column of the source is a subgroup column (``--subgroups sex,age``). A numeric column is cut into
quartile bands (the bands are named by their edges, ``[30, 45)``); a missing value is its own subgroup,
``(missing)``. Each subgroup is scored out of fold, and on the test set, exactly like the whole run: balanced
accuracy, each class's sensitivity and the AUROC, with the bootstrap interval that resamples whole groups
(patients, lesions) when the run has them. The worst subgroup is flagged when its interval lies wholly below
the overall estimate.

fairlearn's ``MetricFrame`` gives the same point estimates per group, but not intervals that resample the
run's groups; scoring each subgroup with :func:`featcache.evaluation.metrics.score_with_ci` gives both from
one code path, the one every other number of featcache comes from.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from featcache.data.sources import MISSING_VALUE, ImageSource, column_key, is_number
from featcache.errors import RunError
from featcache.evaluation.metrics import score_with_ci
from featcache.progress import Reporter

MISSING = MISSING_VALUE
MIN_IMAGES = 2  # a subgroup needs two images to be scored at all (and two classes for balanced accuracy)


def checked_columns(source: ImageSource, columns: tuple[str, ...] | list[str], flag: str = "--subgroups") -> list[str]:
    """The source's own spelling of each metadata column (any case), or a :class:`RunError` naming the option
    (``flag``) and every column that is not there, and what there is."""
    known = {column_key(c): c for r in source.records[:1] for c in r.meta}
    missing = [c for c in columns if column_key(c) not in known]
    if missing:
        listed = ", ".join(sorted(known.values())) or "none (only a CSV manifest has metadata columns)"
        raise RunError(f"{flag} {','.join(columns)}: {source.location} has no column "
                       f"{' and no column '.join(map(repr, missing))}; its metadata columns are {listed}")
    return [known[column_key(c)] for c in columns]


def band_labels(values: list[str], edges: list[float] | None = None) -> tuple[list[str], list[float] | None]:
    """Each value's subgroup: the value itself, or for a numeric column its quartile band; and the bands'
    edges (None for a categorical column). ``edges``: the training set's bands, for a test set."""
    filled = [v.strip() for v in values]
    present = [v for v in filled if v]
    numeric = edges is not None or (bool(present) and all(is_number(v) for v in present) and len(set(present)) > 8)
    if not numeric:
        return [v or MISSING for v in filled], None
    if edges is None:
        numbers = np.array([float(v) for v in present])
        edges = sorted(set(np.quantile(numbers, [0, 0.25, 0.5, 0.75, 1.0]).round(6).tolist()))

    def band(v: str) -> str:
        if not v or not is_number(v):
            return MISSING
        x = float(v)
        k = min(int(np.searchsorted(edges, x, side="right")) - 1, len(edges) - 2)
        close = "]" if k == len(edges) - 2 else ")"
        return f"[{edges[k]:g}, {edges[k + 1]:g}{close}"

    return [band(v) for v in filled], edges


def subgroup_scores(labels: np.ndarray, proba: np.ndarray, classes: list[str], groups: np.ndarray | None,
                    subgroup: list[str]) -> dict:
    """``{value: {"n", "balanced_accuracy": {"pooled", "ci"}, "auroc": {...}, "sensitivity": {class: x},
    "counts": {class: n}}}``; the worst subgroup by balanced accuracy carries ``"worst": True`` and, when its
    interval lies below the overall estimate, ``"below_overall": True``."""
    subgroup = np.asarray(subgroup, dtype=object)
    overall = score_with_ci(labels, proba, classes, groups)
    out: dict = {}
    for value in sorted(set(subgroup.tolist())):
        rows = subgroup == value
        entry: dict = {"n": int(rows.sum())}
        if rows.sum() >= MIN_IMAGES:
            with warnings.catch_warnings():  # a subgroup of one class is scored as such: sklearn need not say so
                warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
                scores = score_with_ci(labels[rows], proba[rows], classes, None if groups is None else groups[rows])
            for name in ("balanced_accuracy", "auroc"):
                if scores.get(name) is not None:
                    entry[name] = {"pooled": scores[name], "ci": scores["ci95"].get(name)}
            entry["sensitivity"] = {c: v["recall"] for c, v in scores["per_class"].items() if v["support"]}
            entry["counts"] = {c: v["support"] for c, v in scores["per_class"].items() if v["support"]}
        out[str(value)] = entry
    scored = {v: e for v, e in out.items() if "balanced_accuracy" in e and len(e.get("counts", {})) > 1}
    if scored:
        worst = min(scored, key=lambda v: scored[v]["balanced_accuracy"]["pooled"])
        out[worst]["worst"] = True
        ci = out[worst]["balanced_accuracy"]["ci"]
        out[worst]["below_overall"] = bool(ci and ci[1] < overall["balanced_accuracy"])
    return out


def worst_group(subgroups: dict) -> tuple[str, str, dict] | None:
    """(column, value, scores) of the lowest balanced accuracy over every column's subgroups, or None."""
    found = [(column, value, entry) for column, groups in subgroups.items() for value, entry in groups.items()
             if entry.get("worst")]
    return min(found, key=lambda item: item[2]["balanced_accuracy"]["pooled"]) if found else None


def values_of(source: ImageSource, column: str, ids: list[str]) -> list[str]:
    """The column's value for each of ``ids`` (records of ``source``)."""
    by_id = {r.id: r.meta.get(column, "") for r in source.records}
    return [by_id.get(i, "") or "" for i in ids]


def add_subgroups(run_dir: Path, source: ImageSource, test_source: ImageSource | None, columns: tuple[str, ...],
                  reporter: Reporter) -> None:
    """Score the run in ``run_dir`` by every subgroup of ``columns`` (out of fold, and on the test set), from
    its own prediction files, into its metrics.json (``subgroups``, ``subgroup_bands``; ``test.subgroups``)
    and model card. The run's identity does not change: subgroups read predictions, they make none."""
    from featcache.evaluation.model_card import model_card
    from featcache.store.runs import has_test_predictions, read_metrics, read_predictions, update_run

    result = read_metrics(run_dir)
    oof = read_predictions(run_dir)
    first = oof.seeds == oof.seeds.min()
    ids, labels, proba = [i for i, k in zip(oof.ids, first, strict=True) if k], oof.labels[first], oof.proba[first]
    groups = oof.group_array(first)
    test = read_predictions(run_dir, "test") if test_source is not None and has_test_predictions(run_dir) else None
    result["subgroups"], bands = {}, {}
    if test is not None:
        result["test"]["subgroups"] = {}
    for column in checked_columns(source, columns):
        names, edges = band_labels(values_of(source, column, ids))
        result["subgroups"][column] = subgroup_scores(labels, proba, oof.classes, groups, names)
        if edges is not None:
            bands[column] = edges
        if test is not None and column_key(column) in {column_key(c) for r in test_source.records[:1] for c in r.meta}:
            test_column = checked_columns(test_source, [column])[0]
            test_names, _ = band_labels(values_of(test_source, test_column, test.ids), edges)
            result["test"]["subgroups"][column] = subgroup_scores(test.labels, test.proba, test.classes, None,
                                                                  test_names)
    result["subgroup_bands"] = bands
    worst = worst_group(result["subgroups"])
    if worst and worst[2].get("below_overall"):
        column, value, entry = worst
        low, high = entry["balanced_accuracy"]["ci"]
        reporter.warn(f"{result['config']['head']}: subgroup {column} = {value} ({entry['n']} images) scores balanced "
                      f"accuracy {entry['balanced_accuracy']['pooled']:.3f} [{low:.3f}, {high:.3f}], wholly below the "
                      f"run's {result['pooled']['balanced_accuracy']:.3f}")
    n_groups = len(set(groups.tolist())) if groups is not None else None
    update_run(run_dir, result, model_card(result, source=str(Path(source.location).resolve()), n_groups=n_groups))
