"""featcache's Python API: extract features once, fit heads honestly, compare, report.

Every function takes its options as keywords declared once in ``featcache.options`` (the CLI flags
and the study-file keys come from the same declarations), checks them where they enter, and returns
typed results. The ``featcache`` command is a thin layer over these functions.

Example::

    import featcache as fc
    fc.extract("images/", cache="cache")
    runs = fc.fit("images/", heads=["logreg", "mlp"], cv=3, cache="cache")
    print(fc.compare(cache="cache").to_pandas())
    fc.load_run(runs[0].path).predict(["new.jpg"])
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import FeatcacheError, RunError
from featcache.option_checks import CHECKS
from featcache.options import BY_NAME, DOOR, Option, OptionError, options_for, python_spelling
from featcache.progress import Reporter

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console, ConsoleOptions, RenderResult

    from featcache.data.sources import ImageSource
    from featcache.extraction.ray import RayCluster
    from featcache.extraction.result import ExtractResult
    from featcache.reporting.compare import Row
    from featcache.store.entries import CacheEntry
    from featcache.study import Study, StudyResult

__all__ = ["Comparison", "Run", "audit", "compare", "demo", "export", "extract", "fit", "load_run", "predict_onnx",
           "report", "run_study"]


# ---------------------------------------------------------------------------------------------------------
# Keywords, signatures and docstrings made from the option declarations
# ---------------------------------------------------------------------------------------------------------

_PY_TYPES = {str: "str", int: "int", float: "float", bool: "bool"}


def _annotation(option: Option, command: str) -> str:
    """The keyword's type, as an annotation string (``"Sequence[str] | str"``, ``"int | None"`` …)."""
    kind = "str" if isinstance(option.kind, type) and issubclass(option.kind, Enum) else _PY_TYPES[option.kind]
    if option.name == "views":
        kind = "int"
    if option.cli_kind is str and kind != "str":  # a number or a word (ensemble: 3 or "stack")
        kind = f"{kind} | str"
    if option.multiple:
        kind = f"Sequence[{kind}] | str"
    elif kind == "str" and option.name in ("data", "test_data", "images", "cache", "norm_from"):
        kind = "str | os.PathLike"
    return kind + (" | None" if option.default_for(command) is None and not option.required else "")


def _doc_type(option: Option, command: str) -> str:
    kind = option.kind
    text = ("{" + ", ".join(repr(c.value) for c in kind) + "}" if isinstance(kind, type) and issubclass(kind, Enum)
            else _PY_TYPES[kind])
    if option.multiple:
        text = f"sequence of {text} or a comma-separated str"
    default = option.default_for(command)
    if option.required:
        return text
    return text + (", optional" if default in (None, ()) else f", default {default!r}")


def takes_options(command: str, positional: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Give the decorated function every option of ``command`` as a keyword (keyword-only but for
    ``positional``), with a signature and a numpydoc ``Parameters`` section made from
    :data:`featcache.options.OPTIONS`; each value is checked by its declaration before the function
    runs, and the function receives them all, checked, as keywords."""

    def wrap(func: Callable) -> Callable:
        declared = options_for(command)
        names = {o.name for o in declared}
        own = [p for p in inspect.signature(func).parameters.values()
               if p.name not in names and p.kind is not inspect.Parameter.VAR_KEYWORD]
        made = [inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD if o.name in positional
                                  else inspect.Parameter.KEYWORD_ONLY,
                                  default=inspect.Parameter.empty if o.required else o.default_for(command),
                                  annotation=_annotation(o, command))
                for o in declared]
        made.sort(key=lambda p: positional.index(p.name) if p.name in positional else len(positional))
        # a CLI alias is a keyword too, with the same meaning (--no-groups: no_groups=True is groups="none")
        aliases = {o.alias[0][2:].replace("-", "_"): o for o in declared if o.alias}
        made += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
                 for name in aliases]
        params = [p for p in made + own if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        params += [p for p in made + own if p.kind is inspect.Parameter.KEYWORD_ONLY]
        signature = inspect.Signature(params, return_annotation=inspect.signature(func).return_annotation)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise OptionError(f"featcache.{func.__name__}(): {exc}; it takes "
                                  f"{', '.join(signature.parameters)}") from None
            bound.apply_defaults()
            values = dict(bound.arguments)
            try:
                for name, option in aliases.items():
                    if _flag_value(values.pop(name), name):
                        value, given = option.alias[1], values[option.name]
                        if given not in (None, option.default, value):
                            raise OptionError(f"{name}=True contradicts {option.name}={given!r}; give one")
                        values[option.name] = value
                python = DOOR.get() == "python"
                for option in declared:
                    values[option.name] = option.checked(values[option.name], f"{option.name}=" if python else None,
                                                         command, CHECKS)
                return func(**values)
            except FeatcacheError as exc:  # from Python, an error names keywords, not the CLI's flags
                if DOOR.get() == "python" and exc.args and isinstance(exc.args[0], str):
                    exc.args = (python_spelling(exc.args[0]), *exc.args[1:])
                raise

        # the made signature is the whole truth (no __wrapped__: tools would show **options instead)
        call.__signature__ = signature  # type: ignore[attr-defined]
        call.__name__, call.__qualname__, call.__module__ = func.__name__, func.__qualname__, func.__module__
        section = "\n".join([f"{o.name} : {_doc_type(o, command)}\n    {o.help}" for o in declared]
                            + [f"{name} : bool, default False\n    {o.alias[2]}" for name, o in aliases.items()])
        doc = inspect.cleandoc(func.__doc__ or "")
        marker = "Parameters\n----------\n"
        call.__doc__ = doc.replace(marker, marker + section + "\n", 1)
        return call

    return wrap


def _similar_cases(value: Any, name: str) -> int:
    """A count of similar cases, checked where it enters."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"{name}={value!r}: give a whole number of similar cases, 0 or more")
    return value


def _flag_value(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name}={value!r}: expected True or False")
    return value


def _reporter(quiet: bool, reporter: Reporter | None) -> Reporter:
    return reporter or Reporter(quiet=quiet)


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache``, else ``$FEATCACHE_CACHE``, else ``./cache``."""
    from featcache.store.naming import default_cache_root

    return Path(cache) if cache else default_cache_root()


def _cluster(address: str | None, reporter: Reporter, actors: int | None = None) -> RayCluster | None:
    """The Ray cluster asked for with ``ray`` (None without it)."""
    if not address:
        if actors:
            raise OptionError("--ray-actors needs --ray (from Python: ray_actors= needs ray=)")
        return None
    from featcache.extraction.ray import RayCluster

    cluster = RayCluster(address, actors=actors)
    reporter.info(f"--ray: {cluster.describe()}")
    return cluster


def _open(data: str, images: str | None, image_col: str | None, label_col: str | None, group_col: str | None,
          reporter: Reporter, labels_required: bool = True, groups: str = "auto") -> ImageSource:
    """The source, with its notes and where its groups come from said once (``labels_required=False``:
    extraction, which needs no labels; ``groups``: the grouping asked for, which a group-column hint serves
    only when it is ``auto``)."""
    from featcache.data.sources import open_source

    source = open_source(data, images and Path(images), image_col, label_col, group_col, labels_required)
    for note in source.notes[:10]:
        reporter.warn(note)
    if source.group_column:
        n = len({r.group for r in source.records if r.group})
        reporter.info(f"groups: column {source.group_column!r} ({n} groups of {len(source.records)} images)",
                      once=True)
    elif source.suspect_group_columns and groups == "auto":
        reporter.warn(f"no group column recognised in {source.location}, but "
                      f"{', '.join(map(repr, source.suspect_group_columns))} looks like one (ids shared by "
                      "several images): pass --group-col NAME, or --no-groups if the images are independent")
    return source


# ---------------------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------------------

@takes_options("extract", positional=("data", "backbone"))
def extract(*, reporter: Reporter | None = None, **options: Any) -> CacheEntry | list[CacheEntry]:
    """Run a frozen backbone once over the images of ``data`` and cache its features (HDF5 shards).

    Reruns skip the images already committed (resume after a crash or Ctrl-C); a changed image, weights
    file or preprocessing never reuses old features. With several backbones (``backbone="a,b,c"``) each
    image is decoded once for all of them, and each gets the entry its own extraction would make.

    Parameters
    ----------
    reporter : Reporter, optional
        Where progress and notes go (default: the terminal, unless ``quiet``).

    Returns
    -------
    Entry, or list of Entry
        The cache entry: ``.path``, ``.fingerprint``, ``.ids``, ``.read(pool)`` …; one per backbone, in
        order, when ``backbone`` names several.
    """
    result = _extract(reporter, options)
    return [r.entry for r in result] if isinstance(result, list) else result.entry


def _extract(reporter: Reporter | None, o: dict[str, Any]) -> ExtractResult | list[ExtractResult]:
    from featcache.extraction.warm import engine_key, recipe_key, record_recipe, warm_result

    reporter = _reporter(o["quiet"], reporter)
    source = _open(o["data"], o["images"], o["image_col"], o["label_col"], o["group_col"], reporter,
                   labels_required=False)
    root = cache_root(o["cache"])
    if "," in o["backbone"]:
        return _extract_many(source, root, reporter, o)
    recipe = recipe_key(source, o)
    result = warm_result(source, root, recipe)  # every image cached: no backbone, no PyTorch
    if result is not None:
        reporter.result(result.summary())
        return result
    from featcache.extraction.lean import lean_extract

    lean_key = engine_key(o)
    result = lean_extract(source, root, lean_key, o, reporter)  # an exported engine: no PyTorch either
    if result is not None:
        record_recipe(root, recipe, result, lean_key)
        reporter.result(result.summary())
        return result
    from featcache.extraction.extract import extract as run_extract

    result = run_extract(source, o["backbone"], cache_root(o["cache"]), o["pools"], o["dtype"], o["weights"],
                         o["batch_size"], o["workers"], o["shard_size"], device=o["device"],
                         precision=o["precision"], jpeg_draft=o["jpeg_draft"], input_size=o["input_size"],
                         views=o["views"], resize=o["resize"], break_lock=o["break_lock"], reporter=reporter,
                         engine=o["engine"], preprocess=o["preprocess"], norm_from=o["norm_from"],
                         resampler=o["resampler"], cluster=_cluster(o["ray"], reporter, o["ray_actors"]),
                         rehash=o["rehash"])
    record_recipe(root, recipe, result, lean_key)
    for note in result.notes[len(source.notes):]:
        reporter.info(note)
    reporter.result(result.summary())
    return result


def _extract_many(source: ImageSource, root: Path, reporter: Reporter, o: dict[str, Any]) -> list[ExtractResult]:
    """``backbone="a,b,c"``: every image decoded once for all of them, an entry each (as its single
    extraction makes it); answered from the recipes when every backbone has every image."""
    from featcache.extraction.warm import recipe_key, record_recipe, split_backbones, warm_result

    names = split_backbones(o["backbone"])
    if o["ray"]:
        raise OptionError(f"backbone {o['backbone']} with ray: one decode for several backbones runs on this machine; "
                          "drop ray, or extract one backbone at a time on the cluster")
    recipes = [recipe_key(source, {**o, "backbone": name}) for name in names]
    warm = [warm_result(source, root, recipe) for recipe in recipes]
    if all(result is not None for result in warm):
        results = warm
    else:
        from featcache.extraction.multi import extract_many

        results = extract_many(source, names, root, pools=o["pools"], dtype=o["dtype"], weights=o["weights"],
                               batch_size=o["batch_size"], workers=o["workers"], shard_size=o["shard_size"],
                               device=o["device"], precision=o["precision"], jpeg_draft=o["jpeg_draft"],
                               input_size=o["input_size"], views=o["views"], resize=o["resize"],
                               break_lock=o["break_lock"], reporter=reporter, engine=o["engine"],
                               preprocess=o["preprocess"], resampler=o["resampler"], norm_from=o["norm_from"],
                               rehash=o["rehash"])
        for recipe, result in zip(recipes, results, strict=True):
            record_recipe(root, recipe, result)
    for result in results:
        reporter.result(result.summary())
    return results


# ---------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------

@takes_options("fit", positional=("data",))
def fit(*, reporter: Reporter | None = None, **options: Any) -> list[Run]:
    """Train heads on the cached features of ``data`` and score them honestly.

    Every head runs inside a pipeline whose standardization is fit on training folds only, under
    grouped, stratified cross-validation (or the split asked for); a run already finished with the
    same inputs is reused. With ``test_data`` each head is refit on all of ``data`` and scored on it.

    Parameters
    ----------
    reporter : Reporter, optional
        Where progress and notes go (default: the terminal, unless ``quiet``).

    Returns
    -------
    list of Run
        One per head, in the order of ``heads``.
    """
    from featcache.evaluation.features import check_test_classes, label_counts
    from featcache.evaluation.fitting import find_entry, fit_many
    from featcache.evaluation.protocol import Protocol
    from featcache.extraction.extract import find_or_extract_like
    from featcache.store.fusion import FusedEntry, fused_pools

    o = options
    reporter = _reporter(o["quiet"], reporter)
    if o["groups"] == "near-duplicates" and o["group_col"]:
        raise OptionError("--groups near-duplicates contradicts --group-col; give one")
    if o["groups"] == "none" and o["group_col"]:
        raise OptionError("--no-groups contradicts --group-col; give one")
    if o["test_align"] != "none" and not o["test_data"]:
        raise OptionError(f"--test-align {o['test_align']} aligns a held-out set's features, and no --test-data is "
                          "given: add the other clinic's images, or drop --test-align")
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
    source = _open(o["data"], o["images"], o["image_col"], o["label_col"], o["group_col"], reporter,
                   groups=o["groups"])
    backbones = o["backbone"].split("+") if o["backbone"] else [None]
    if len(set(backbones)) != len(backbones):
        raise OptionError(f"--backbone {o['backbone']}: a backbone is named twice; fuse different backbones (a+b)")
    pools = fused_pools(o["pool"], backbones)
    entries = [find_entry(root, source, name, pool, o["views"], o["resize"], o["preprocess"], o["engine"],
                          o["resampler"], reporter, precision=o["precision"])
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
    paths = fit_many(source, entry, list(o["heads"]), pool, Protocol.from_options(o), o["label_map"], classes,
                     test_source, test_entry, o["force"], reporter,
                     cluster=_cluster(o["ray"], reporter))
    _track(paths, root, o["mlflow"], o["mlflow_uri"], reporter)
    return [Run(path) for path in paths]


def _track(runs: list[Path], root: Path, mlflow: bool, uri: str | None, reporter: Reporter) -> None:
    if mlflow or uri:
        from featcache.reporting.tracking import default_uri, log_runs

        log_runs(runs, root, uri)
        reporter.result(f"logged {len(runs)} run(s) to MLflow at {uri or default_uri(root)}")


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A finished run folder written by ``fit``: its scores, its out-of-fold predictions and a
    model that predicts new images.

    Attributes
    ----------
    path : Path
        The run folder (``<cache>/<dataset>/<entry>/runs/<head>-<pool>-<id>``), or one held-out evaluation
        of it (``<run>/heldout/<test dataset>-<id>``: the run's model and cross-validation, scored on a test set).
    """

    path: Path

    def __post_init__(self) -> None:
        from featcache.store.runs import is_finished

        object.__setattr__(self, "path", Path(self.path))
        if not is_finished(self.path):
            raise RunError(f"{self.path}: not a finished run folder (no metrics.json); pass a folder written by "
                           "`featcache fit` (`featcache compare --paths` lists them)")

    @functools.cached_property
    def metrics(self) -> dict:
        """The content of ``metrics.json``: protocol, pooled scores with intervals, folds, config."""
        from featcache.store.runs import read_metrics

        return read_metrics(self.path)

    @property
    def config(self) -> dict:
        return self.metrics["config"]

    @property
    def head(self) -> str:
        return self.config["head"]

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    @property
    def oof(self) -> pd.DataFrame:
        """Out-of-fold predictions: a row per image and seed (``seed``, ``fold``, ``id``, ``group``,
        ``label``, then one ``p_<class>`` column per class)."""
        return _predictions_frame(self.path, "oof")

    @property
    def test(self) -> pd.DataFrame | None:
        """The held-out set's predictions (``id``, ``label``, ``p_<class>`` …), when the run had one."""
        from featcache.store.runs import has_test_predictions

        return _predictions_frame(self.path, "test") if has_test_predictions(self.path) else None

    def predict(self, images: str | os.PathLike | Sequence[str | os.PathLike], *,
                cache: str | os.PathLike | None = None, weights: str | None = None, group_col: str | None = None,
                image_col: str | None = None,
                test_align: str = "none", align_from: str | os.PathLike | None = None, trust_pickle: bool = False,
                neighbours: int = 5, quiet: bool = True, reporter: Reporter | None = None) -> pd.DataFrame:
        """Class probabilities for new images (files, folders, or one CSV/.npz), their features made
        exactly like the training features (through the cache), with each image's most similar training
        images.

        Parameters
        ----------
        images : path or sequence of paths
            Image files and/or folders (searched recursively), or one CSV/.npz source.
        cache : path, optional
            Cache root for the new images' features (default: the run's own cache).
        weights : str, optional
            The same local weights file given at extraction, if any.
        group_col : str, optional
            Group column, when ``images`` is a CSV.
        image_col : str, optional
            Image column, when ``images`` is a CSV whose column is not one featcache finds by itself.
        test_align : {'none', 'moments', 'coral', 'auto'}, default 'none'
            {test_align}
        align_from : path, optional
            {align_from}
        trust_pickle : bool, default False
            {trust_pickle}
        neighbours : int, default 5
            How many of the most similar training images to find for each image, in the run's own feature
            space (its scaler and PCA; cosine); 0 for none.
        quiet : bool, default True
            No progress display.
        reporter : Reporter, optional
            Where progress and warnings go.

        Returns
        -------
        pandas.DataFrame
            A row per image, indexed by id: ``predicted``, ``p_<class>`` per class,
            ``near_duplicate_of`` and ``similarity`` (a training image it is identical or nearly
            identical to), ``neighbours_agree`` (the share of its similar cases labelled as predicted),
            ``ood_score``, ``ood_percentile`` and ``ood`` (how far it lies from the training images; flagged
            above the 95th percentile of held-out training images, so about 5 % of images like the training
            ones are flagged too), ``group``, and ``failed`` (why an image has no prediction).
            ``.attrs["neighbours"]`` holds the similar cases: a row per image and rank (``id``, ``rank``,
            ``neighbour``, ``label``, ``group``, ``similarity``, ``agrees``), best first.
        """
        from featcache.evaluation.predict import predict_frame

        _similar_cases(neighbours, "neighbours")
        inputs, root, options = _prediction_options(self.path, images, cache, weights, group_col, image_col,
                                                    test_align, align_from, trust_pickle)
        return predict_frame(self.path, inputs, root, _reporter(quiet, reporter), neighbours=neighbours, **options)

    def explain(self, images: str | os.PathLike | Sequence[str | os.PathLike], *, k: int = 5, cls: str | None = None,
                cache: str | os.PathLike | None = None, weights: str | None = None, quiet: bool = True,
                reporter: Reporter | None = None) -> list:
        """For each photo: the prediction, a heatmap of where the evidence for the predicted class (or ``cls``)
        lies, and its ``k`` most similar training images.

        Parameters
        ----------
        images : path or sequence of paths
            Image files and/or folders (searched recursively).
        k : int, default 5
            Similar training cases per image.
        cls : str, optional
            The class whose evidence the map shows (default: each image's predicted class).
        cache : path, optional
            Cache root for the new images' features (default: the run's own cache).
        weights : str, optional
            The same local weights file given at extraction, if any.
        quiet : bool, default True
            No progress display.
        reporter : Reporter, optional
            Where progress and warnings go.

        Returns
        -------
        list of Explanation
            One per image, in order: ``.predicted``, ``.probabilities``, ``.cls``, ``.heatmap`` (a float array of
            the photo's own height x width, higher = more evidence for ``.cls``, NaN outside the backbone's
            crop), ``.method`` (``cam``: the exact class activation map of a linear head on gap features;
            ``occlusion`` otherwise) and ``.neighbours`` (a DataFrame of ``k`` rows: ``neighbour`` id, ``label``,
            ``group``, ``similarity``, best first).
        """
        from featcache.evaluation.explain import explain_run

        _similar_cases(k, "k")
        inputs, root, _ = _prediction_options(self.path, images, cache, weights, None, None, "none", None, False)
        return explain_run(self.path, inputs, root, k, cls, weights, _reporter(quiet, reporter))

    def __repr__(self) -> str:
        pooled = self.metrics["pooled"]
        score = pooled.get("balanced_accuracy")
        ci = pooled.get("ci95", {}).get("balanced_accuracy")
        interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        return (f"Run({self.head} on {self.config['backbone']}/{self.config['pool']}, balanced_accuracy "
                f"{score:.3f}{interval}, {self.metrics['protocol']}, {self.path})" if score is not None
                else f"Run({self.path})")

    def _repr_html_(self) -> str:
        import html

        from featcache.reporting.compare import held_out_label, sets_text

        m = self.metrics
        pooled = m["pooled"]
        facts = [("model", f"{self.config['backbone']} / {self.config['pool']} / {self.head}"),
                 ("protocol", m["protocol"]), ("images scored", str(m.get("n_scored", m["n_images"])))]
        for name in ("balanced_accuracy", "macro_f1", "auroc", "accuracy"):
            if pooled.get(name) is not None:
                ci = pooled.get("ci95", {}).get(name)
                facts.append((name, f"{pooled[name]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")))
        if held_out_label(self.config):
            facts.append(("held-out settings", held_out_label(self.config)))
        test = m.get("test") or {}
        if test.get("balanced_accuracy") is not None:
            ci = test.get("ci95", {}).get("balanced_accuracy")
            facts.append(("test balanced_accuracy", f"{test['balanced_accuracy']:.3f}"
                          + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")))
        if m.get("conformal"):
            facts.append(("prediction sets", sets_text(m["conformal"])))
        facts.append(("folder", str(self.path)))
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{html.escape(v)}</td>"
                       "</tr>" for k, v in facts)
        return f"<table><caption>featcache run</caption>{rows}</table>"


for _name in ("test_align", "align_from", "trust_pickle"):
    Run.predict.__doc__ = Run.predict.__doc__.replace("{" + _name + "}", BY_NAME[_name].help)


def _prediction_options(run: Path, images: str | os.PathLike | Sequence[str | os.PathLike],
                        cache: str | os.PathLike | None, weights: str | None, group_col: str | None,
                        image_col: str | None, test_align: str, align_from: str | os.PathLike | None,
                        trust_pickle: bool) -> tuple[list[str], Path, dict]:
    """What ``Run.predict`` and ``Ensemble.predict`` take, checked: the inputs, the cache root (default:
    the run's own) and the keywords of the prediction functions."""
    from featcache.store.naming import cache_root_of_run

    inputs = [images] if isinstance(images, str | os.PathLike) else list(images)
    root = Path(cache) if cache else cache_root_of_run(Path(run).resolve())
    options = {"weights": weights, "group_col": group_col, "image_col": image_col,
               "test_align": BY_NAME["test_align"].checked(test_align, "test_align="),
               "align_from": BY_NAME["align_from"].checked(align_from, "align_from="),
               "trust_pickle": BY_NAME["trust_pickle"].checked(trust_pickle, "trust_pickle=")}
    return [str(i) for i in inputs], root, options


@dataclass(frozen=True)
class Ensemble:
    """Finished runs that predict as one, the way ``featcache compare --ensemble`` scored them.

    Attributes
    ----------
    runs : tuple of Run
        The members, best first.
    spec : str
        ``topN`` (the runs' probabilities averaged) or ``stack`` (a meta-learner over them, fit on their
        out-of-fold probabilities).
    """

    runs: tuple[Run, ...]
    spec: str

    def __post_init__(self) -> None:
        spec = BY_NAME["ensemble"].checked(self.spec, "ensemble=")
        if len(self.runs) < 2:
            raise OptionError(f"an ensemble needs two or more runs; got {len(self.runs)}")
        if spec != "stack" and spec != f"top{len(self.runs)}":
            raise OptionError(f"ensemble {self.spec}: {len(self.runs)} runs are given, so their soft vote is "
                              f"{len(self.runs)} (or stack for the meta-learner)")
        object.__setattr__(self, "runs", tuple(r if isinstance(r, Run) else Run(r) for r in self.runs))
        object.__setattr__(self, "spec", spec)

    def predict(self, images: str | os.PathLike | Sequence[str | os.PathLike], *,
                cache: str | os.PathLike | None = None, weights: str | None = None, group_col: str | None = None,
                image_col: str | None = None,
                test_align: str = "none", align_from: str | os.PathLike | None = None, trust_pickle: bool = False,
                quiet: bool = True, reporter: Reporter | None = None) -> pd.DataFrame:
        """Class probabilities for new images: every member predicts them (see ``Run.predict``, whose
        keywords these are), then they are averaged or stacked. Returns a row per image, indexed by id:
        ``predicted``, ``p_<class>`` per class, ``group`` and ``failed``."""
        from featcache.evaluation.predict import predict_ensemble_frame

        inputs, root, options = _prediction_options(self.runs[0].path, images, cache, weights, group_col, image_col,
                                                    test_align, align_from, trust_pickle)
        return predict_ensemble_frame([r.path for r in self.runs], self.spec, inputs, root,
                                      _reporter(quiet, reporter), **options)

    def __repr__(self) -> str:
        return f"Ensemble({self.spec} of {len(self.runs)} runs: {', '.join(r.head for r in self.runs)})"


def best_model(study: str | os.PathLike | dict, *, cache: str | os.PathLike | None = None) -> Run | Ensemble:
    """The best model of a study that ``featcache run`` finished: its first row in the report's ranking,
    a single run or the ensemble the study's ``[compare] ensemble`` asked for.

    Parameters
    ----------
    study : path or dict
        The study file (TOML), or its content as given to ``run_study``.
    cache : path, optional
        The cache root the study ran in (default ./cache, or $FEATCACHE_CACHE).

    Returns
    -------
    Run or Ensemble
    """
    import json

    from featcache.reporting.compare import select_rows
    from featcache.store.naming import study_record_path
    from featcache.study import StudyError, load_study, parse_study

    checked = parse_study(study) if isinstance(study, dict) else load_study(study)
    record_file = study_record_path(cache_root(cache), checked.name)
    if not record_file.is_file():
        raise StudyError(f"{study}: no finished run of this study in {cache_root(cache)} ({record_file.name} is "
                         f"missing); run `featcache run {study}` first")
    record = json.loads(record_file.read_text())
    missing = [r for r in record["runs"] if not Path(r, "metrics.json").is_file()]
    if missing:
        raise StudyError(f"{study}: {len(missing)} of its runs are gone from the cache (first: {missing[0]}); run "
                         f"`featcache run {study}` again")
    rows = select_rows(cache_root(cache), record["metric"], runs=[Path(r) for r in record["runs"]],
                       ensemble=record["ensemble"])
    best = rows[0]
    if best.members:
        return Ensemble(tuple(Run(path) for path in best.members), best.ensemble)
    return Run(best.run)


def _predictions_frame(run_dir: Path, which: str) -> pd.DataFrame:
    import pandas as pd

    from featcache.store.runs import read_predictions

    p = read_predictions(run_dir, which)
    frame = pd.DataFrame({"id": p.ids, "label": p.labels})
    if which == "oof":
        frame.insert(0, "fold", p.folds)
        frame.insert(0, "seed", p.seeds)
        frame.insert(3, "group", p.groups)
    for k, name in enumerate(p.classes):
        frame[f"p_{name}"] = p.proba[:, k]
    return frame


def load_run(path: str | os.PathLike) -> Run:
    """A finished run folder as a ``Run`` (its ``metrics``, ``oof`` and ``predict``).

    Parameters
    ----------
    path : path
        A run folder written by ``fit`` (``featcache compare --paths`` lists them).

    Returns
    -------
    Run
    """
    return Run(Path(path))


# ---------------------------------------------------------------------------------------------------------
# compare and report
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """Finished runs side by side, ranked within each dataset and protocol by the pooled score of
    ``metric`` (the fold mean beside it): a table on screen (rich), in Jupyter (HTML) and as pandas.

    Attributes
    ----------
    rows : list of Row
        One per distinct result (a fit kept in two entries appears once; baselines once per protocol).
    metric : str
        The ranking metric.
    """

    rows: list[Row]
    metric: str

    def to_pandas(self) -> pd.DataFrame:
        """A row per run, ranked: ``model`` (backbone/pool/head), the metric's pooled value with its
        interval (``_ci_low``, ``_ci_high``) and fold mean and spread, the other metrics, the test
        scores when there is a test set, then ``dataset``, ``protocol``, ``run`` (the folder),
        ``backbone``, ``pool``, ``head``, ``baseline`` and ``n``."""
        import pandas as pd

        from featcache.reporting.compare import frame_records

        return pd.DataFrame(frame_records(self.rows, self.metric))

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """``compare.csv``, ``compare.md`` and ``compare.png`` (a forest plot) in the folder ``out``."""
        from featcache.reporting.compare import write_outputs

        return write_outputs(self.rows, self.metric, Path(out))

    def table(self, paths: bool = False):  # noqa: ANN201 - rich's Table, imported lazily
        """The comparison as a rich Table (columns equal in every row move into its caption)."""
        from featcache.reporting.compare import rich_table

        return rich_table(self.rows, self.metric, paths)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table()

    def _repr_html_(self) -> str:
        """The CLI's table in Jupyter: intervals as ``0.511 [0.338, 0.634]``, columns with one value for
        every row in the caption."""
        import html

        from featcache.reporting.compare import table_parts

        if not self.rows:
            return "<p>featcache compare: no finished runs match</p>"
        header, body, caption = table_parts(self.rows, self.metric)
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header)
        lines = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in line) + "</tr>"
                        for line in body)
        title = f"featcache compare — ranked by {self.metric} (pooled)" + (f"; {caption}" if caption else "")
        return f"<table><caption>{html.escape(title)}</caption><tr>{head}</tr>{lines}</table>"

    def __repr__(self) -> str:
        from featcache.reporting.compare import table_parts

        if not self.rows:
            return "Comparison(no runs)"
        header, body, caption = table_parts(self.rows, self.metric)
        widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
        return "\n".join([f"featcache compare — ranked by {self.metric} (pooled)" + (f"; {caption}" if caption else ""),
                          *lines])

    def __len__(self) -> int:
        return len(self.rows)


@takes_options("compare")
def compare(data: str | os.PathLike | None = None, *, backbone: str | None = None, head: str | None = None,
            runs: Sequence[str | os.PathLike] | None = None, **options: Any) -> Comparison:
    """Every finished run in the cache (or of ``data``), side by side.

    Parameters
    ----------
    data : path, optional
        Only runs on this source (folder, CSV or .npz).
    backbone : str, optional
        Only runs on this backbone.
    head : str, optional
        Only these heads (a comma list).
    runs : sequence of paths, optional
        Only these run folders (e.g. the ``Run.path`` of what ``fit`` returned).

    Returns
    -------
    Comparison
    """
    from featcache.reporting.compare import select_rows

    dataset = None
    if data is not None:
        from featcache.data.sources import source_name

        if not Path(data).exists():
            raise FeatcacheError(f"--data {data}: no such file or folder")
        dataset = source_name(str(data))
    metric = options["metric"]
    notes: list[str] = []
    rows = select_rows(cache_root(options["cache"]), metric, dataset=dataset, backbone=backbone, head=head,
                       runs=None if runs is None else [Path(r) for r in runs], ensemble=options["ensemble"],
                       notes=notes)
    reporter = _reporter(options["quiet"], None)
    for note in notes:
        reporter.warn(note)
    return Comparison(rows, metric)


@takes_options("report")
def report(data: str | os.PathLike | None = None, *, out: str | os.PathLike | None = None,
           runs: Sequence[str | os.PathLike] | None = None, title: str = "featcache report",
           **options: Any) -> Path:
    """Write one self-contained ``report.html`` (no network requests, figures inline).

    It holds a leaderboard with intervals per dataset and protocol, the best runs' confusion
    matrices, per-class tables, ROC and reliability, every run's folder and predict command, grouping
    and leakage warnings, and the features' provenance.

    Parameters
    ----------
    data : path, optional
        Only runs on this source (default: every run in the cache).
    out : path, optional
        Where to write the page (default: ``<cache>/report.html``).
    runs : sequence of paths, optional
        Only these run folders.
    title : str, default "featcache report"
        The page's title.

    Returns
    -------
    Path
        The page written.
    """
    from featcache.reporting.report import write_report

    root = cache_root(options["cache"])
    dataset = None
    if data is not None:
        from featcache.data.sources import source_name

        dataset = source_name(str(data))
    return write_report(Path(out) if out else root / "report.html", runs=None if runs is None else list(runs),
                        cache_root=root, dataset=dataset, title=title, metric=options["metric"],
                        top=options["top"], best=options["best"], ensemble=options["ensemble"],
                        gallery=options["gallery"], max_mb=options["max_mb"])


@takes_options("demo")
def demo(*, reporter: Reporter | None = None, **options: Any) -> list[Run]:
    """Melanoma vs nevus on the 200 CC0 ISIC images shipped with featcache: EfficientNet-Lite0 features
    (ImageNet weights, offline), then the fast heads and two baselines under 5-fold stratified CV.

    Parameters
    ----------
    reporter : Reporter, optional
        Where progress and notes go.

    Returns
    -------
    list of Run
    """
    from featcache.evaluation.fitting import run_demo

    _, paths = run_demo(cache_root(options["cache"]), _reporter(options["quiet"], reporter))
    return [Run(path) for path in paths]


@takes_options("export")
def export(run: str | os.PathLike | Run, *, out: str | os.PathLike = "model.onnx", weights: str | None = None,
           reporter: Reporter | None = None, **options: Any) -> Path:
    """A finished run as one ONNX file, from images to class probabilities, that runs anywhere ONNX
    Runtime does (no featcache, PyTorch, scikit-learn or XGBoost needed).

    The graph takes ``image`` (uint8, ``n x size x size x 3``: the backbone's resized and cropped input)
    and gives ``probabilities`` (float32, ``n x classes``). It chains the views the run averaged, the
    backbone (the export ``--engine`` runs), its pooling, the scaler and the head; the classes, the
    preprocessing, the feature fingerprint, the protocol and the headline metrics are in its metadata.
    A head without an ONNX form (k-NN, recalibrated heads, metadata columns) is refused, with why.

    Parameters
    ----------
    run : path or Run
        A run folder written by ``fit``.
    out : path, default 'model.onnx'
        The file to write.
    weights : str, optional
        The same local weights file given at extraction, if any.
    reporter : Reporter, optional
        Where progress and notes go.

    Returns
    -------
    Path
        The file written.
    """
    from featcache.deploy.export import export_run
    from featcache.deploy.head_graph import NotExportable, refusal

    path = run.path if isinstance(run, Run) else Path(run)
    why = refusal(Run(path).config)  # Run() refuses what is not a finished run folder
    if why:  # before any model is loaded or any line says it is exporting
        raise NotExportable(f"{path}: {why}")
    return export_run(path, Path(out), weights=weights, trust_pickle=options["trust_pickle"],
                      reporter=_reporter(options["quiet"], reporter))


def predict_onnx(model: str | os.PathLike, images: str | os.PathLike | Sequence[str | os.PathLike], *,
                 group_col: str | None = None, image_col: str | None = None, quiet: bool = True,
                 reporter: Reporter | None = None) -> pd.DataFrame:
    """Class probabilities for new images from a file written by ``export``, with ONNX Runtime and
    featcache's image preprocessing only.

    Parameters
    ----------
    model : path
        The ``.onnx`` file.
    images : path or sequence of paths
        Image files and/or folders (searched recursively), or one CSV/.npz source.
    group_col : str, optional
        Group column, when ``images`` is a CSV.
    image_col : str, optional
        Image column, when ``images`` is a CSV whose column is not one featcache finds by itself.
    quiet : bool, default True
        No progress display.
    reporter : Reporter, optional
        Where warnings go.

    Returns
    -------
    pandas.DataFrame
        A row per image, indexed by id: ``predicted``, ``p_<class>`` per class (and the prediction set
        where the run had one), ``group`` and ``failed``.
    """
    from featcache.deploy.onnx_predict import predict_onnx_frame

    inputs = [images] if isinstance(images, str | os.PathLike) else list(images)
    return predict_onnx_frame(Path(model), [str(i) for i in inputs], _reporter(quiet, reporter), group_col, image_col)


@takes_options("audit", positional=("data",))
def audit(*, out: str | os.PathLike | None = None, heads: Sequence[str] | str = ("logreg", "mlp"),
          reporter: Reporter | None = None, **options: Any) -> Path:
    """What can be wrong with a dataset, from its cached features: suspected label errors, identical and
    near-identical images, and outliers, with a page that shows each suspect.

    The out-of-fold probabilities are the mean of ``heads`` fit under the same grouped, stratified
    cross-validation as ``fit`` (the runs are kept and reused); suspected label errors are found by
    confident learning (cleanlab) on them. Two different heads find more flipped labels than either alone
    (HAM10000, 5 % flipped: 53 % of them in the top 2x with logistic regression, 60 % with it and the MLP).

    Parameters
    ----------
    out : path, optional
        Folder for ``label_issues.csv`` (``id``, ``given``, ``suggested``, ``score``; most suspect first),
        ``duplicates.csv``, ``outliers.csv`` and ``audit.html`` (default: ``<cache>/audit-<dataset>``).
    reporter : Reporter, optional
        Where progress and notes go.

    Returns
    -------
    Path
        The folder written.
    """
    import numpy as np

    from featcache.evaluation.dataset_audit import audit_dataset, lone_class_rows, scored_part, write_audit
    from featcache.evaluation.features import label_counts, labeled_features
    from featcache.reporting.audit_page import write_audit_page
    from featcache.store.fusion import FusedEntry, trained_entry
    from featcache.store.model_files import load_model

    o = options
    reporter = _reporter(o["quiet"], reporter)
    selection = {k: o[k] for k in ("images", "image_col", "label_col", "group_col", "backbone", "pool", "preprocess",
                                   "engine", "resampler", "precision", "views", "resize", "cv", "groups", "split",
                                   "cache")}
    heads = BY_NAME["heads"].checked(heads, "heads=", checks=CHECKS)
    source = _open(o["data"], o["images"], o["image_col"], o["label_col"], o["group_col"], reporter,
                   groups=o["groups"])
    # a class too small to cross-validate (one image: often a typo) is what an audit is for: it is listed, and
    # the models are fit on the other classes
    counts = label_counts(source, None, ",".join(o["classes"] or ()))
    lone = {label for label, n in counts.items() if n < o["cv"]} if o["split"] == "cv" else set()
    classes = [c for c in (o["classes"] or sorted(counts)) if c not in lone]
    if len(classes) < 2:
        raise OptionError(f"audit: {len(classes)} class(es) have {o['cv']} or more images; an audit needs two")
    runs = fit(o["data"], heads=heads, quiet=o["quiet"], reporter=reporter, classes=classes if lone or o["classes"]
               else None, **selection)
    saved = load_model(runs[0].path)
    entry = trained_entry(runs[0].path, saved)  # the features the heads saw (a fused run: every backbone's)
    data = labeled_features(source, entry, None if isinstance(entry, FusedEntry) else saved["pool"],
                            classes=",".join(classes), groups=o["groups"])
    first = [run.oof[run.oof["seed"] == 0].set_index("id") for run in runs]
    scored = np.isin(data.ids, first[0].index)  # a single split scores its held-out part only
    data = scored_part(data, scored) if not scored.all() else data
    first = [f.loc[data.ids] for f in first]
    oof = np.mean([f.filter(like="p_").to_numpy() for f in first], axis=0)  # the same folds for every head
    lone_rows = lone_class_rows([r.id for r in source.records if r.label in lone],
                                [r.label for r in source.records if r.label in lone], counts, o["cv"])
    found = audit_dataset(data, oof, first[0]["fold"].to_numpy(), lone_rows)
    folder = Path(out) if out else cache_root(o["cache"]) / f"audit-{source.name}"
    files = write_audit(found, folder)
    files["html"] = write_audit_page(found, source, folder / "audit.html")
    warning = found.weak_warning()
    if warning:
        reporter.warn(warning)
    reporter.result(f"{found.sentence()} -> {folder}")
    return folder


# ---------------------------------------------------------------------------------------------------------
# studies
# ---------------------------------------------------------------------------------------------------------

@takes_options("run")
def run_study(study: str | os.PathLike | dict | Study, *, dry_run: bool = False, reporter: Reporter | None = None,
              **options: Any) -> StudyResult:
    """Run a whole study: every extraction and fit in order, reusing what is finished, then the report.

    Parameters
    ----------
    study : path, dict or Study
        A study file (TOML), its content as a dict (paths relative to the working folder), or a
        checked ``Study``.
    dry_run : bool, default False
        Only plan: what would run and what the cache already holds.
    reporter : Reporter, optional
        Where progress and notes go.

    Returns
    -------
    StudyResult
        ``runs`` (run folders), ``report`` (the page) and ``steps`` (the plan, with what was done).
    """
    from featcache.study import Study, execute_study, load_study, parse_study

    plan = study if isinstance(study, Study) else parse_study(study) if isinstance(study, dict) else load_study(study)
    reporter = _reporter(options["quiet"], reporter)
    root = cache_root(options["cache"])
    if not dry_run and (options["mlflow"] or options["mlflow_uri"]):
        from featcache.net import check_tracking_uri

        check_tracking_uri(options["mlflow_uri"], root)
    result = execute_study(plan, root, reporter, dry_run=dry_run,
                           cluster=None if dry_run else _cluster(options["ray"], reporter, plan.extract["ray_actors"]))
    if not dry_run:
        _track(result.runs, root, options["mlflow"], options["mlflow_uri"], reporter)
    return result
