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

import inspect
import os
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import FeatcacheError
from featcache.option_checks import CHECKS
from featcache.option_rules import broken_rules, cli_spelling, keyword_spelling
from featcache.options import BY_NAME, DOOR, Option, OptionError, options_for, python_spelling
from featcache.progress import Reporter
from featcache.recipes import ReportView
from featcache.workflow.audit import audit_data
from featcache.workflow.common import cache_root, reporter_for
from featcache.workflow.compare import compare_runs, report_runs
from featcache.workflow.deploy import export_model, predict_with_onnx
from featcache.workflow.extract import extract_data
from featcache.workflow.fit import fit_data
from featcache.workflow.results import Comparison, Ensemble, Run, best_model, load_run

if TYPE_CHECKING:
    import pandas as pd

    from featcache.study import Study, StudyResult
    from featcache.workflow.results import Entry as CacheEntry

__all__ = ["Comparison", "Ensemble", "Run", "audit", "best_model", "compare", "demo", "export", "extract", "fit",
           "load_run", "predict_onnx", "report", "run_study"]


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
                for rule in broken_rules(command, values):  # before any work
                    raise OptionError(rule.message(values, keyword_spelling if python else cli_spelling))
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


def _flag_value(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name}={value!r}: expected True or False")
    return value


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
    result = extract_data(reporter, options)
    return [r.entry for r in result] if isinstance(result, list) else result.entry


# ---------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------

@takes_options("fit", positional=("data",))
def fit(*, reporter: Reporter | None = None, **options: Any) -> list[Run]:
    """Train heads on the cached features of ``data`` and score them honestly.

    Every head runs inside a pipeline whose standardization is fit on training folds only, under
    grouped, stratified cross-validation (or the split asked for); a run already finished with the
    same inputs is reused. With ``test_data`` each head's model, refit on all of ``data``, is scored on it: a
    held-out evaluation folder inside the run, which is what the returned ``Run`` then is (another
    ``test_align`` on the same test set scores the same model again, without cross-validating).

    Parameters
    ----------
    reporter : Reporter, optional
        Where progress and notes go (default: the terminal, unless ``quiet``).

    Returns
    -------
    list of Run
        One per head, in the order of ``heads``.
    """
    return [Run(path) for path in fit_data(reporter, options)]


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
    return compare_runs(data, backbone, head, runs, options)


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
    return report_runs(data, out, runs, ReportView.from_options(options, title=title), options)


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
    from featcache.workflow.demo import run_demo

    paths = run_demo(cache_root(options["cache"]), reporter_for(options["quiet"], reporter))
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
    return export_model(run, out, weights, options["trust_pickle"], reporter_for(options["quiet"], reporter))


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
    return predict_with_onnx(model, images, group_col, image_col, reporter_for(quiet, reporter))


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
    return audit_data(reporter, options, BY_NAME["heads"].checked(heads, "heads=", checks=CHECKS), out)


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
    from featcache.study import run_study as run

    return run(study, options, reporter_for(options["quiet"], reporter), dry_run)
