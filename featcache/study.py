"""A whole study from one declarative file: every extraction, every fit, the comparison and the report.

``featcache run STUDY.toml`` and :func:`featcache.run_study` (which also takes the content as a dict)
check the whole file first, so a wrong key or value is one error before any work starts. Its tables
and keys are the options of :mod:`featcache.options` (each one the same option as a CLI flag and an
API keyword): ``[data]`` where the images are, ``[extract]`` the extraction options, ``[fit]`` the fit
options, ``[compare]`` and ``[report]``. Then the steps are planned (each backbone's extraction of the
training and test data, then every backbone x pooling x head fit), run in that order, and end with
``report.html``. Everything already finished is reused, so a killed study resumes when the same
command is run again.

Example::

    [data]
    train = "ham/labels.csv"      # any source featcache reads, relative to the study file
    group_col = "lesion_id"       # optional
    test = "isic2018/labels.csv"  # optional held-out set
    [extract]
    backbones = ["efficientnet_lite0", "squeezenet1_1"]
    pools = ["gap", "penult"]     # optional; each backbone's default otherwise
    preprocess = ["color-constancy"]
    views = 4                     # optional
    [fit]
    heads = ["logreg", "svm-rbf", "mlp"]
    cv = 5
    [compare]
    ensemble = 3                  # optional
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import FeatcacheError
from featcache.option_checks import CHECKS
from featcache.option_rules import broken_rules
from featcache.options import BY_NAME, TABLES, Option, OptionError, study_table
from featcache.progress import Reporter
from featcache.recipes import ExecutionPlan, FeatureRecipe, FitPlan, ReportView
from featcache.store.runs import is_reusable

if TYPE_CHECKING:
    from featcache.data.sources import ImageSource
    from featcache.evaluation.protocol import Protocol
    from featcache.extraction.ray import RayCluster
    from featcache.store.entries import CacheEntry
    from featcache.store.fusion import FusedEntry

# Options that name a file or folder: relative to the study file's folder, checked to exist.
PATHS = ("data", "test_data", "images")


def _study_relative(backbone: str, base: Path) -> str:
    """``hf:<folder>`` / ``open_clip:<folder>`` with a relative folder, made relative to the study file (a hub id,
    ``org/name``, stays one unless a folder of that name is beside the study)."""
    from featcache.backbones.catalog import FAMILIES

    for prefix in (family.prefix for family in FAMILIES.values() if family.reads_folders):
        if backbone.startswith(prefix):
            raw = backbone[len(prefix):]
            target = Path(raw).expanduser()
            if not target.is_absolute() and (raw.startswith(".") or (base / target).is_dir()):
                return prefix + str((base / target).resolve())
    return backbone


class StudyError(FeatcacheError):
    """The study file cannot be run as written; the message names the key."""


@dataclass
class Study:
    """A checked study: every value valid, paths resolved against the study file's folder.

    ``data``, ``extract`` and ``fit`` hold every option of their stage by API name (defaults filled in);
    ``backbones`` the backbones extracted and fitted, ``weights`` a weights file per backbone."""

    backbones: list[str]
    data: dict[str, Any]
    extract: dict[str, Any]
    fit: dict[str, Any]
    weights: dict[str, str | None] = field(default_factory=dict)
    compare: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    name: str = "study"


def load_study(path: str | Path) -> Study:
    """Read and check a study file (TOML)."""
    path = Path(path)
    try:
        content = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StudyError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not UTF-8 text; save the study file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML ({exc})") from None
    return parse_study(content, path.parent, name=path.stem, where=str(path))


def study_keys() -> dict[str, dict[str, Option]]:
    """Every key a study may have, per table (made from the option declarations)."""
    return {table: study_table(table) for table in TABLES}


def parse_study(content: dict, base: str | Path = ".", name: str = "study", where: str = "study") -> Study:
    """Check ``content`` (the study file as a dict): every table and key against the option declarations,
    every value by its option, every path for existence. The first problem is a :class:`StudyError`
    naming ``[table] key``."""
    base = Path(base)
    tables = study_keys()
    for table, value in content.items():
        if table not in tables:
            raise StudyError(f"{where}: unknown table [{table}]; a study has {', '.join(f'[{t}]' for t in tables)}")
        if not isinstance(value, dict):
            raise StudyError(f"{where}: [{table}] must be a table of keys")
        for key in value:
            if key not in tables[table]:
                close = difflib.get_close_matches(key, tables[table], n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise StudyError(f"{where}: [{table}] {key}: unknown key; {hint}[{table}] takes "
                                 f"{', '.join(tables[table])}")
    for table, key in (("data", "train"), ("extract", "backbones"), ("fit", "heads")):
        if key not in content.get(table, {}):
            raise StudyError(f"{where}: [{table}] {key} is missing ({tables[table][key].help})")

    def value(table: str, key: str) -> Any:
        option = tables[table][key]
        given = content.get(table, {}).get(key)
        label = f"{where}: [{table}] {key}"
        try:
            if option.name == "backbone":  # a study extracts and fits every backbone of a list
                if not isinstance(given, list) or not given:
                    raise OptionError(f"{label} must be a non-empty list of names")
                return [option.checked(b, label, checks=CHECKS) for b in given]
            if option.name == "weights" and isinstance(given, dict):  # one file per backbone
                return {b: option.checked(f, f"{label}.{b}", checks=CHECKS) for b, f in given.items()}
            return option.checked(given, label, "fit" if option.selects is False else "extract", CHECKS)
        except OptionError as exc:
            text = str(exc)
            raise StudyError(text if text.startswith(where) else f"{label}: {text}") from None

    checked = {table: {option.name: value(table, key) for key, option in keys.items()}
               for table, keys in tables.items()}
    data, extract, fit = checked["data"], checked["extract"], checked["fit"]
    for key in PATHS:
        if data.get(key):
            path = (base / data[key]).expanduser()
            if not path.exists():
                raise StudyError(f"{where}: [data] {BY_NAME[key].study_key} = {data[key]!r}: no such file or "
                                 f"folder ({path})")
            data[key] = str(path)
    if fit.get("prompts"):
        path = (base / fit["prompts"]).expanduser()
        if not path.is_file():
            raise StudyError(f"{where}: [fit] prompts = {fit['prompts']!r}: no such file ({path})")
        fit["prompts"] = str(path)
    # a model folder (hf:./models/monet, open_clip:./dermlip) is relative to the study file, like its data
    extract["backbone"] = [_study_relative(b, base) for b in extract["backbone"]]
    backbones = extract.pop("backbone")
    if len(set(backbones)) != len(backbones):
        raise StudyError(f"{where}: [extract] backbones names a backbone twice: {', '.join(backbones)}")
    _check_backbones(backbones, extract["pools"], where)
    weights = extract.pop("weights")
    if not isinstance(weights, dict):
        weights = dict.fromkeys(backbones, weights)
    for backbone, file in weights.items():
        if backbone not in backbones:
            raise StudyError(f"{where}: [extract] weights: {backbone!r} is not one of the study's backbones")
        if file not in (None, "random"):
            path = (base / file).expanduser()
            if not path.is_file():
                raise StudyError(f"{where}: [extract] weights.{backbone} = {file!r}: no such file")
            weights[backbone] = str(path)
    if extract["norm_from"] and Path(base / extract["norm_from"]).exists():
        extract["norm_from"] = str(base / extract["norm_from"])
    if fit["fuse"] and (len(backbones) < 2 or not extract["pools"]):
        raise StudyError(f"{where}: [fit] fuse = true needs two or more [extract] backbones and [extract] pools "
                         "(the poolings fused; every backbone must have them)")
    given = {name: value for table in checked.values() for name, value in table.items()}
    for rule in broken_rules("fit", given):  # the rules every door checks, in a study's words
        raise StudyError(f"{where}: {rule.message(given, _study_spelling)}")
    fit_pools = fit["pool"].split("+") if fit["pool"] else []
    if len(fit_pools) > 1 and (not fit["fuse"] or len(fit_pools) != len(backbones)):
        raise StudyError(f"{where}: [fit] pool = {fit['pool']!r}: a pooling per backbone (joined by +) needs "
                         f"fuse = true and one pooling for each of the {len(backbones)} [extract] backbones, in order")
    for pool in fit_pools:
        if extract["pools"] and pool not in extract["pools"]:
            raise StudyError(f"{where}: [fit] pool = {fit['pool']!r}: {pool!r} is not among [extract] pools")
    return Study(backbones=backbones, data=data, extract=extract, fit=fit, weights=weights,
                 compare=checked["compare"], report=checked["report"], name=name)


def _study_spelling(option: Option, value: Any, with_value: bool) -> str:
    """An option as a study file writes it: ``[fit] test_align = 'moments'``, or ``[data] test``."""
    where = f"[{option.table}] {option.study_key}"
    return f"{where} = {value!r}" if with_value else where


def _check_backbones(backbones: list[str], pools: tuple[str, ...] | None, where: str) -> None:
    from featcache.backbones.catalog import get_spec

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
    from featcache.data.sources import open_source, open_test_source

    data = study.data
    images = Path(data["images"]) if data["images"] else None
    train = open_source(data["data"], images, data["image_col"], data["label_col"], data["group_col"])
    test = (open_test_source(data["test_data"], image_col=data["image_col"], label_col=data["label_col"],
                             group_col=data["test_group_col"]) if data["test_data"] else None)
    return train, test


def _protocol(study: Study):
    from featcache.evaluation.protocol import Protocol

    return Protocol.from_options(study.fit)


def _feature_recipe(study: Study) -> FeatureRecipe:
    """What names the study's entries; each backbone is loaded with its own weights and the study's poolings."""
    return FeatureRecipe.from_options({**study.extract, "weights": None})


def _extract_together(study: Study, backbones: list[str], sources: list, models: dict, cache_root: Path,
                      reporter: Reporter, plan: ExecutionPlan, overall: Any) -> dict[str, tuple]:
    """Several backbones on this machine: each source decoded once for all of them
    (:func:`featcache.extraction.multi.extract_many`); ``{backbone: (entry, test entry)}``, empty otherwise."""
    from featcache.extraction.multi import extract_many

    if plan.cluster is not None or len(backbones) < 2:
        return {}
    found: dict[str, list] = {backbone: [None, None] for backbone in backbones}
    for k, source in enumerate(sources):
        if source is None:
            continue
        results = extract_many(source, [models[b] for b in backbones], cache_root, _feature_recipe(study), plan,
                               reporter)
        for backbone, result in zip(backbones, results, strict=True):
            found[backbone][k] = result.entry
            overall.advance(1)
    return {backbone: tuple(pair) for backbone, pair in found.items()}


def _classes(study: Study) -> str | None:
    return ",".join(study.data["classes"]) if study.data["classes"] else None


def plan_study(study: Study, cache_root: Path, models: dict | None = None,
               cached: dict | None = None) -> list[Step]:
    """What the study will do and what the cache already holds. Each backbone is loaded to name its
    entry (the weights decide the fingerprint), and kept in ``models`` for the run; ``cached`` gets
    ``{backbone: {source name: its complete entry, or None}}``. An entry is named by the same code as
    :func:`featcache.extraction.extract.extract`, and a fit is known to be done only once its features
    exist, because a run is named by the rows it uses."""
    from featcache.backbones.models import load_backbone
    from featcache.evaluation.features import check_test_classes, label_counts
    from featcache.extraction.extract import name_entry
    from featcache.extraction.resume import cached_line, images_to_extract
    from featcache.store.entries import CacheEntry
    from featcache.store.fusion import FusedEntry

    train, test = _sources(study)
    protocol = _protocol(study)
    label_map, classes = study.data["label_map"], _classes(study)
    if test is not None:  # before any work: a test class the model never sees is refused by the run too
        check_test_classes(train, test, label_map, classes)
    metric = study.compare["metric"]
    if metric.startswith("auroc:") and metric[6:] not in label_counts(train, label_map, classes):
        known = ", ".join(sorted(label_counts(train, label_map, classes)))
        raise StudyError(f"[compare] metric = {metric!r}: the training data has no class {metric[6:]!r}; its classes "
                         f"are {known} (use auroc:<class>)")
    steps = []
    entries: dict[str, dict] = {}  # backbone -> source name -> complete entry (None: extraction to do)
    for backbone in study.backbones:
        model = load_backbone(backbone, weights=study.weights.get(backbone), pools=study.extract["pools"])
        if models is not None:
            models[backbone] = model
        entries[backbone] = {}
        for source in (s for s in (train, test) if s is not None):
            named = name_entry(source, model, cache_root, _feature_recipe(study), ExecutionPlan.from_options(
                study.extract), plan_only=True)
            total = len(source.records)
            if named is None:
                entries[backbone][source.name] = None
                steps.append(Step("extract", f"extract {backbone} on {source.name}", False,
                                  f"0 of {total} images cached (dataset-norm statistics not computed yet)"))
                continue
            missing = images_to_extract(source, named.entry_dir)[0]
            todo = len(missing)
            entries[backbone][source.name] = CacheEntry(named.entry_dir) if not todo else None
            steps.append(Step("extract", f"extract {backbone} on {source.name}", not todo,
                              f"{cached_line(source, named.entry_dir, missing)}: {named.entry_dir}"))
        for pool in _pools(study, backbone, list(model.model.pools)):
            steps += _fit_steps(study, f"{backbone}/{pool}", pool, protocol, train, test,
                                entries[backbone][train.name], test and entries[backbone][test.name])
    if cached is not None:
        cached.update(entries)

    def fused(source: ImageSource | None, pools: list[str]) -> FusedEntry | None:
        """The backbones' entries of ``source`` read as one, once every one is complete."""
        if source is None or any(entries[b][source.name] is None for b in study.backbones):
            return None
        return FusedEntry([(entries[b][source.name], pool) for b, pool in zip(study.backbones, pools, strict=True)])

    for pools in _fused_pools(study):
        entry = fused(train, pools)
        steps += _fit_steps(study, f"{'+'.join(study.backbones)}/{'+'.join(pools)}", "+".join(pools), protocol,
                            train, test, entry, fused(test, pools))
    return steps


def _fit_steps(study: Study, label: str, pool: str | None, protocol: Protocol, train: ImageSource,
               test: ImageSource | None, entry: CacheEntry | FusedEntry | None,
               test_entry: CacheEntry | FusedEntry | None) -> list[Step]:
    """One plan step per head on ``entry``'s ``pool``: done when its run folder is finished; unknown until
    the features (and the test set's) exist, because a run is named by the rows it uses."""
    from featcache.evaluation.features import labeled_features
    from featcache.evaluation.fitting import test_grouping
    from featcache.evaluation.runner import HeldOut, run_dir_for

    if entry is None or (test is not None and test_entry is None):
        return [Step("fit", f"fit {label}/{head}", None, "after extraction") for head in study.fit["heads"]]
    label_map, classes = study.data["label_map"], _classes(study)
    data = labeled_features(train, entry, pool, label_map, classes, protocol.meta, groups=protocol.groups,
                            near_dup_threshold=protocol.near_dup_threshold)
    test_data = None
    if test is not None:
        test_data = labeled_features(test, test_entry, pool, label_map, classes, protocol.meta, data.meta_spec,
                                     groups=test_grouping(protocol), audit=False)
    steps = []
    for head in study.fit["heads"]:
        run = run_dir_for(data, entry, head, pool, protocol, HeldOut.of(test_data, test.name if test else None))
        done = is_reusable(run)
        steps.append(Step("fit", f"fit {label}/{head}", done, f"finished: {run}" if done else f"to fit: {run}"))
    return steps


def _pools(study: Study, backbone: str, extracted: list[str]) -> list[str]:
    """The poolings ``backbone`` is fitted with: [fit] pool (its own part of ``penult+gap``), else every
    pooling extracted."""
    if study.fit["pool"]:
        parts = study.fit["pool"].split("+")
        return [parts[study.backbones.index(backbone)] if len(parts) > 1 else parts[0]]
    return list(study.extract["pools"] or extracted)


def _fused_pools(study: Study) -> list[list[str]]:
    """The fused fits' poolings, one per backbone: [fit] pool's parts, else each pooling of [extract] pools
    for all backbones in turn (none without fuse = true)."""
    if not study.fit["fuse"]:
        return []
    parts = study.fit["pool"].split("+") if study.fit["pool"] else []
    if len(parts) > 1:
        return [parts]
    return [[pool] * len(study.backbones) for pool in ([parts[0]] if parts else study.extract["pools"])]


def execute_study(study: Study, cache_root: Path, reporter: Reporter, dry_run: bool = False,
                  cluster: RayCluster | None = None) -> StudyResult:
    """Plan ``study``, then (unless ``dry_run``) run every extraction and fit and write the report."""
    from featcache.evaluation.fitting import fit_many
    from featcache.evaluation.protocol import RunRecipe
    from featcache.extraction.extract import extract
    from featcache.store.entries import write_json_atomic
    from featcache.store.fusion import FusedEntry
    from featcache.store.naming import study_record_path, study_report_path
    from featcache.workflow.report import write_report_page

    protocol = _protocol(study)
    models: dict = {}
    cached: dict = {}
    steps = plan_study(study, cache_root, models, cached)
    if dry_run:
        return StudyResult([], None, steps)
    train, test = _sources(study)
    # a backbone whose entries the plan found complete is only read: no extraction, so no entry lock, and
    # studies that share finished entries can run side by side (--rehash still goes through extract)
    ready = {b: (found[train.name], found[test.name] if test is not None else None)
             for b, found in cached.items()
             if not study.extract["rehash"] and all(entry is not None for entry in found.values())}
    label_map, classes = study.data["label_map"], _classes(study)
    heads = tuple(study.fit["heads"])
    runs: list[Path] = []
    entries: dict[str, tuple] = {}
    plan = ExecutionPlan.from_options(study.extract, cluster=cluster)
    fit_plan = FitPlan.from_options(study.fit, cluster=cluster)
    overall = reporter.task(f"study {study.name}", total=len(steps), unit="step")
    try:
        todo = [b for b in study.backbones if b not in ready]
        shared = _extract_together(study, todo, [train, test], models, cache_root, reporter, plan, overall)
        for backbone in study.backbones:
            # the loaded model already carries the study's weights and poolings (loaded once, by the plan)
            if backbone in ready:
                entry, test_entry = ready[backbone]
                overall.advance(1 if test is None else 2)
            elif backbone in shared:
                entry, test_entry = shared[backbone]
            else:
                entry = extract(train, models[backbone], _feature_recipe(study), plan, cache_root, reporter).entry
                overall.advance(1)
                test_entry = None
                if test is not None:
                    test_entry = extract(test, models[backbone], _feature_recipe(study), plan, cache_root,
                                         reporter).entry
                    overall.advance(1)
            entries[backbone] = (entry, test_entry)
            for pool in _pools(study, backbone, list(entry.pools)):
                runs += fit_many(train, entry, RunRecipe(heads, protocol, pool, label_map, classes), test,
                                 test_entry, fit_plan, reporter, on_head=lambda: overall.advance(1))
        for pools in _fused_pools(study):
            fused = FusedEntry([(entries[b][0], pool) for b, pool in zip(study.backbones, pools, strict=True)])
            fused_test = (FusedEntry([(entries[b][1], pool) for b, pool in zip(study.backbones, pools, strict=True)])
                          if test is not None else None)
            runs += fit_many(train, fused, RunRecipe(heads, protocol, None, label_map, classes), test, fused_test,
                             fit_plan, reporter, on_head=lambda: overall.advance(1))
    finally:
        overall.close()
    view = ReportView.from_options({**study.compare, **study.report}, title=f"featcache study: {study.name}")
    report = write_report_page(study_report_path(cache_root, study.name), view, runs, None, None, reporter)
    write_json_atomic(study_record_path(cache_root, study.name),
                      {"study": study.name, "runs": [str(run) for run in runs], "metric": study.compare["metric"],
                       "ensemble": study.compare["ensemble"]})
    return StudyResult(runs, report, steps)


def run_study(study: str | os.PathLike | dict | Study, options: dict[str, Any], reporter: Reporter,
              dry_run: bool = False) -> StudyResult:
    """The run workflow: a study file, its content or a checked ``Study``, planned and (unless ``dry_run``) run
    with the checked options of ``featcache run`` (cache, Ray, MLflow), each run tracked when asked."""
    from featcache.workflow.common import cache_root, ray_cluster
    from featcache.workflow.fit import track_runs

    plan = study if isinstance(study, Study) else parse_study(study) if isinstance(study, dict) else load_study(study)
    root = cache_root(options["cache"])
    if not dry_run and (options["mlflow"] or options["mlflow_uri"]):
        from featcache.net import check_tracking_uri

        check_tracking_uri(options["mlflow_uri"], root)
    cluster = None if dry_run else ray_cluster(options["ray"], reporter, plan.extract["ray_actors"])
    result = execute_study(plan, root, reporter, dry_run=dry_run, cluster=cluster)
    if not dry_run:
        track_runs(result.runs, root, options["mlflow"], options["mlflow_uri"], reporter)
    return result
