"""A whole study from one declarative file: every extraction, every fit, the comparison and the report.

``featcache run STUDY.toml`` and :func:`run_study` (which takes the same content as a dict) check
the whole file first, so a wrong key or value is one error before any work starts. Then they plan
the steps (each backbone's extraction of the training and test data, then every backbone x pooling
x head fit), run them in that order, and end with ``report.html``. Everything already finished is
reused, so a killed study resumes when the same command is run again.

Example::

    [data]
    train = "ham/labels.csv"      # any source featcache reads, relative to the study file
    group_col = "lesion_id"       # optional
    test = "isic2018/labels.csv"  # optional held-out set
    [extract]
    backbones = ["efficientnet_lite0", "squeezenet1_1"]
    pools = ["gap", "penult"]     # optional; each backbone's default otherwise
    views = 4                     # optional
    [fit]
    heads = ["logreg", "svm-rbf", "mlp"]
    cv = 5
    seeds = 1
    tune = false
    [compare]
    ensemble = 3                  # optional
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.errors import FeatcacheError
from featcache.options import (
    Calibration,
    ClassWeight,
    Dtype,
    Engine,
    Grouping,
    Metric,
    Resampler,
    ResizeMode,
    Split,
    UseViews,
    ViewCount,
    checked_choice,
)
from featcache.progress import Reporter
from featcache.store.runs import is_finished

if TYPE_CHECKING:
    from featcache.extraction.ray import RayCluster


class StudyError(FeatcacheError):
    """The study file cannot be run as written; the message names the key."""


# Every key a study may have, per table: (type, what it means). Anything else is refused by name.
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], str]]] = {
    "data": {
        "train": (str, "the training source: a folder, a CSV or an .npz"),
        "test": (str, "a held-out source, scored after refitting on all of train"),
        "images": (str, "folder the CSV's image paths are relative to"),
        "image_col": (str, "CSV column with the image path or id"),
        "label_col": (str, "CSV column with the label"),
        "group_col": (str, "CSV column saying which images belong together"),
        "test_group_col": (str, "group column of the test CSV, if its name differs"),
        "label_map": (str, "merge labels, e.g. 'akiec=malignant,mel=malignant,*=benign'"),
        "classes": (list, "keep only these classes"),
    },
    "extract": {
        "backbones": (list, "registry names or timm:<model>"),
        "pools": (list, "poolings for every backbone (default: each backbone's own)"),
        "views": (int, "views per image: 1, 2, 4 or 8"),
        "resize": (str, "crop, full or pad"),
        "dtype": (str, "float16 or float32"),
        "engine": (str, "auto, torch, onnxruntime or openvino"),
        "resampler": (str, "pil (the backbone's own resize, bit for bit) or torch (faster)"),
        "weights": (dict, "per backbone: a local weights file (or 'random' for timing only)"),
    },
    "fit": {
        "heads": (list, "head names, or 'fast' / 'all'"),
        "cv": (int, "folds"),
        "seeds": (int, "repeats of the CV"),
        "split": (str, "cv, official or random712"),
        "tune": (bool, "inner-CV search of each head's grid"),
        "tune_budget": ((int, float), "seconds per inner search"),
        "class_weight": (str, "balanced or none"),
        "calibrate": (str, "sigmoid, isotonic or temperature"),
        "use_views": (str, "all, train or first"),
        "meta": (list, "metadata columns used as features"),
        "groups": (str, "auto, none or near-duplicates"),
        "standardize": (bool, "per-fold StandardScaler (default true)"),
        "fuse": (bool, "also fit every head on all backbones' features side by side (per pooling)"),
    },
    "compare": {
        "ensemble": (int, "soft-vote the N best runs (N >= 2)"),
        "metric": (str, "sort key: balanced_accuracy, macro_f1, auroc, accuracy or auroc:<class>"),
    },
    "report": {
        "top": (int, "how many runs the leaderboard shows per protocol"),
        "best": (int, "how many best runs get confusion matrices, ROC and reliability figures"),
    },
}
REQUIRED = {"data": ("train",), "extract": ("backbones",), "fit": ("heads",)}


@dataclass
class Study:
    """A checked study: every value valid, paths resolved against the study file's folder."""

    train: Path
    backbones: list[str]
    heads: list[str]
    test: Path | None = None
    data: dict = field(default_factory=dict)  # images, image_col, label_col, group_col, …
    pools: list[str] | None = None
    views: int = 1
    resize: str = "crop"
    dtype: str = "float16"
    engine: str = "auto"
    resampler: str = "pil"
    weights: dict[str, str] = field(default_factory=dict)
    fit: dict = field(default_factory=dict)  # Protocol fields
    fuse: bool = False  # also fit the fusion of all backbones
    ensemble: int | None = None
    metric: str = "balanced_accuracy"
    report_top: int = 20
    report_best: int = 3
    name: str = "study"


def load_study(path: str | Path) -> Study:
    """Read and check a study file (TOML)."""
    path = Path(path)
    try:
        content = tomllib.loads(path.read_text())
    except OSError as exc:
        raise StudyError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML ({exc})") from None
    return parse_study(content, path.parent, name=path.stem, where=str(path))


def parse_study(content: dict, base: str | Path = ".", name: str = "study", where: str = "study") -> Study:
    """Check ``content`` (the study file as a dict) against :data:`SCHEMA`, every value against
    its choices, and every path for existence. The first problem is a :class:`StudyError` naming
    ``[table] key``."""
    base = Path(base)
    for table, value in content.items():
        if table not in SCHEMA:
            raise StudyError(f"{where}: unknown table [{table}]; a study has {', '.join(f'[{t}]' for t in SCHEMA)}")
        if not isinstance(value, dict):
            raise StudyError(f"{where}: [{table}] must be a table of keys")
        for key, item in value.items():
            if key not in SCHEMA[table]:
                known = ", ".join(SCHEMA[table])
                raise StudyError(f"{where}: [{table}] {key}: unknown key; [{table}] takes {known}")
            kind, meaning = SCHEMA[table][key]
            if (isinstance(item, bool) and kind is not bool) or not isinstance(item, kind):
                raise StudyError(f"{where}: [{table}] {key} = {item!r}: expected {_kind(kind)} ({meaning})")
    for table, keys in REQUIRED.items():
        for key in keys:
            if key not in content.get(table, {}):
                raise StudyError(f"{where}: [{table}] {key} is missing ({SCHEMA[table][key][1]})")
    data, extract, fit = content["data"], content["extract"], content["fit"]
    compare = content.get("compare", {})

    def choice(table: str, key: str, enum, default: str, optional: bool = False) -> str:
        value = content.get(table, {}).get(key, default)
        try:
            return checked_choice(value, enum, f"[{table}] {key}", optional)
        except ValueError as exc:
            raise StudyError(f"{where}: {exc}") from None

    def existing(key: str) -> Path:
        path = (base / data[key]).expanduser()
        if not path.exists():
            raise StudyError(f"{where}: [data] {key} = {data[key]!r}: no such file or folder ({path})")
        return path

    def positive(table: str, key: str, default: int, low: int = 1) -> int:
        value = content.get(table, {}).get(key, default)
        if value < low:
            raise StudyError(f"{where}: [{table}] {key} = {value}: must be at least {low}")
        return value

    backbones = _strings(extract["backbones"], "[extract] backbones", where)
    _check_backbones(backbones, extract.get("pools"), where)
    heads = _strings(fit["heads"], "[fit] heads", where)
    if fit.get("fuse") and (len(backbones) < 2 or "pools" not in extract):
        raise StudyError(f"{where}: [fit] fuse = true needs two or more [extract] backbones and [extract] pools "
                         "(the poolings fused; every backbone must have them)")
    try:
        from featcache.evaluation.heads import parse_heads

        heads = parse_heads(",".join(heads))
    except FeatcacheError as exc:
        raise StudyError(f"{where}: [fit] heads: {exc}") from None
    weights = extract.get("weights", {})
    for backbone, file in weights.items():
        if backbone not in backbones:
            raise StudyError(f"{where}: [extract] weights: {backbone!r} is not one of the study's backbones")
        if file != "random" and not (base / file).expanduser().is_file():
            raise StudyError(f"{where}: [extract] weights.{backbone} = {file!r}: no such file")
    metric = compare.get("metric", "balanced_accuracy")
    if metric not in [m.value for m in Metric] and not metric.startswith("auroc:"):
        raise StudyError(f"{where}: [compare] metric {metric!r}: choose one of "
                         f"{', '.join(m.value for m in Metric)}, or auroc:<class>")
    ensemble = compare.get("ensemble")
    if ensemble is not None and ensemble < 2:
        raise StudyError(f"{where}: [compare] ensemble = {ensemble}: an ensemble needs at least 2 runs")
    split = choice("fit", "split", Split, "cv")
    grouping = choice("fit", "groups", Grouping, "auto")
    if grouping == "near-duplicates" and "group_col" in data:
        raise StudyError(f"{where}: [fit] groups = 'near-duplicates' contradicts [data] group_col; give one")
    fit_options = {
        "cv": positive("fit", "cv", 5, 2), "seeds": positive("fit", "seeds", 1), "split": split,
        "tune": fit.get("tune", False), "tune_budget_s": float(fit.get("tune_budget", 300.0)),
        "class_weight": choice("fit", "class_weight", ClassWeight, "balanced"),
        "calibrate": choice("fit", "calibrate", Calibration, "", optional=True),
        "views": choice("fit", "use_views", UseViews, "all"),
        "meta": ",".join(_strings(fit["meta"], "[fit] meta", where)) if "meta" in fit else "",
        "groups": grouping, "standardize": fit.get("standardize", True)}
    return Study(
        train=existing("train"), test=existing("test") if "test" in data else None,
        data={k: (str(existing(k)) if k == "images" else v) for k, v in data.items() if k not in ("train", "test")},
        backbones=backbones, heads=heads,
        pools=_strings(extract["pools"], "[extract] pools", where) if "pools" in extract else None,
        views=int(choice("extract", "views", ViewCount, str(extract.get("views", 1)))),
        resize=choice("extract", "resize", ResizeMode, "crop"), dtype=choice("extract", "dtype", Dtype, "float16"),
        engine=choice("extract", "engine", Engine, "auto"),
        resampler=choice("extract", "resampler", Resampler, "pil"),
        weights={k: (v if v == "random" else str((base / v).expanduser())) for k, v in weights.items()},
        fit=fit_options, ensemble=ensemble, metric=metric, fuse=fit.get("fuse", False),
        report_top=positive("report", "top", 20), report_best=positive("report", "best", 3), name=name)


def _kind(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names[k] for k in kinds)


def _strings(values: list, key: str, where: str) -> list[str]:
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise StudyError(f"{where}: {key} must be a non-empty list of names")
    return [v.strip() for v in values]


def _check_backbones(backbones: list[str], pools: list[str] | None, where: str) -> None:
    from featcache.backbones.registry import get_spec

    for name in backbones:
        try:
            spec = get_spec(name)
        except FeatcacheError as exc:
            raise StudyError(f"{where}: [extract] backbones: {exc}") from None
        known = set(spec.dims) or set(spec.default_pools)
        unknown = [p for p in pools or [] if known and p not in known]
        if unknown:
            raise StudyError(f"{where}: [extract] pools: {name} has no pooling {unknown[0]!r}; it has "
                             f"{', '.join(sorted(known))}")


@dataclass
class Step:
    """One unit of work in a study's plan."""

    kind: str  # "extract" or "fit"
    label: str
    done: bool | None  # None: cannot tell yet (its features are not extracted)
    detail: str = ""


@dataclass
class StudyResult:
    runs: list[Path]
    report: Path | None
    steps: list[Step]


def _sources(study: Study):
    from featcache.data.sources import open_source

    data = study.data
    train = open_source(study.train, data.get("images"), data.get("image_col"), data.get("label_col"),
                        data.get("group_col"))
    test = open_source(study.test, group_col=data.get("test_group_col")) if study.test else None
    return train, test


def _protocol(study: Study):
    from featcache.evaluation.protocol import Protocol

    return Protocol(**study.fit)


def plan_study(study: Study, cache_root: Path, models: dict | None = None) -> list[Step]:
    """What the study will do and what the cache already holds. Each backbone is loaded to name its
    entry (the weights decide the fingerprint), and kept in ``models`` for the run; a fit is known
    to be done only once its features exist, because a run is named by the rows it uses."""
    from featcache.backbones.models import load_backbone
    from featcache.evaluation.features import labeled_features
    from featcache.evaluation.fitting import test_grouping
    from featcache.evaluation.runner import run_dir_for
    from featcache.extraction.extract import planned_entry
    from featcache.store.entries import CacheEntry

    train, test = _sources(study)
    protocol = _protocol(study)
    classes = ",".join(study.data["classes"]) if study.data.get("classes") else None
    steps = []
    for backbone in study.backbones:
        model = load_backbone(backbone, weights=study.weights.get(backbone),
                              pools=tuple(study.pools) if study.pools else None)
        if models is not None:
            models[backbone] = model
        entries = {}
        for source in (s for s in (train, test) if s is not None):
            entry_dir, todo = planned_entry(source, model, cache_root, study.dtype, study.views, study.resize,
                                            study.engine, study.resampler)
            entries[source.name] = CacheEntry(entry_dir) if not todo else None
            total = len(source.records)
            steps.append(Step("extract", f"extract {backbone} on {source.name}", not todo,
                              f"{total - todo} of {total} images cached"))
        for pool in study.pools or list(model.model.pools):
            data = test_data = None
            if entries[train.name] is not None and (test is None or entries[test.name] is not None):
                data = labeled_features(train, entries[train.name], pool, study.data.get("label_map"), classes,
                                        protocol.meta, groups=protocol.groups)
                if test is not None:
                    test_data = labeled_features(test, entries[test.name], pool, study.data.get("label_map"),
                                                 classes, protocol.meta, data.meta_spec, groups=test_grouping(protocol),
                                                 audit=False)
            for head in study.heads:
                if data is None:
                    steps.append(Step("fit", f"fit {backbone}/{pool}/{head}", None, "after extraction"))
                    continue
                run = run_dir_for(data, entries[train.name], head, pool, protocol, test_data)
                done = is_finished(run)
                steps.append(Step("fit", f"fit {backbone}/{pool}/{head}", done,
                                  f"finished: {run}" if done else "to fit"))
    if study.fuse:  # whether fused runs exist is only known once every backbone is extracted
        steps += [Step("fit", f"fit {'+'.join(study.backbones)}/{pool}/{head}", None, "fusion")
                  for pool in study.pools for head in study.heads]
    return steps


def run_study(study: Study | dict, cache_root: Path | None = None, reporter: Reporter | None = None,
              dry_run: bool = False, base: str | Path = ".", cluster: RayCluster | None = None) -> StudyResult:
    """Run a study (a :class:`Study` or the study file's content as a dict, paths relative to
    ``base``): every extraction, every fit, the comparison and ``report.html`` in the cache root.
    ``cluster``: extractions and fits on Ray (:mod:`featcache.extraction.ray`), with the same results."""
    from featcache.evaluation.fitting import fit_many
    from featcache.extraction.extract import extract
    from featcache.reporting.report import write_report
    from featcache.store.fusion import FusedEntry
    from featcache.store.naming import default_cache_root

    study = study if isinstance(study, Study) else parse_study(study, base)
    cache_root = Path(cache_root or default_cache_root())
    reporter = reporter or Reporter()
    protocol = _protocol(study)
    models: dict = {}
    steps = plan_study(study, cache_root, models)
    if dry_run:
        return StudyResult([], None, steps)
    train, test = _sources(study)
    classes = ",".join(study.data["classes"]) if study.data.get("classes") else None
    runs: list[Path] = []
    entries: dict[str, tuple] = {}
    overall = reporter.task(f"study {study.name}", total=len(steps), unit="step")
    try:
        for backbone in study.backbones:
            # the loaded model already carries the study's weights and poolings
            options = dict(cache_root=cache_root, dtype=study.dtype, views=study.views, resize=study.resize,
                           reporter=reporter, engine=study.engine, resampler=study.resampler, cluster=cluster)
            entry = extract(train, models[backbone], **options).entry  # loaded once, by the plan
            overall.advance(1)
            test_entry = None
            if test is not None:
                test_entry = extract(test, models[backbone], **options).entry
                overall.advance(1)
            entries[backbone] = (entry, test_entry)
            for pool in study.pools or list(entry.pools):
                found = fit_many(train, entry, study.heads, pool, protocol, study.data.get("label_map"), classes,
                                 test, test_entry, reporter=reporter, on_head=lambda: overall.advance(1),
                                 cluster=cluster)
                runs += found
        for pool in study.pools if study.fuse else []:
            fused = FusedEntry([(entries[b][0], pool) for b in study.backbones])
            fused_test = FusedEntry([(entries[b][1], pool) for b in study.backbones]) if test is not None else None
            runs += fit_many(train, fused, study.heads, None, protocol, study.data.get("label_map"), classes,
                             test, fused_test, reporter=reporter, on_head=lambda: overall.advance(1),
                             cluster=cluster)
    finally:
        overall.close()
    report = write_report(cache_root / f"report-{study.name}.html", runs, title=f"featcache study: {study.name}",
                          metric=study.metric, top=study.report_top, best=study.report_best,
                          ensemble=study.ensemble)
    return StudyResult(runs, report, steps)
