"""What the workflows hand back: a finished run (:class:`Run`), runs that predict as one (:class:`Ensemble`)
and runs side by side (:class:`Comparison`); ``featcache.Entry`` is the store's
:class:`~featcache.store.entries.CacheEntry`."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.errors import RunError
from featcache.options import BY_NAME, OptionError
from featcache.progress import Reporter
from featcache.workflow.common import cache_root, reporter_for, similar_cases_count

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console, ConsoleOptions, RenderResult

    from featcache.evaluation.predict import NewImages, PredictSettings
    from featcache.reporting.compare import Row
    from featcache.store.entries import CacheEntry as Entry  # noqa: F401 - named by __getattr__ below



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
    # load a model saved as a pickle by featcache before 0.3 (it can run any code it holds): see load_run
    trust_pickle: bool = field(default=False, repr=False, compare=False)

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
        return predictions_frame(self.path, "oof")

    @property
    def test(self) -> pd.DataFrame | None:
        """The held-out set's predictions (``id``, ``label``, ``p_<class>`` …), when the run had one."""
        from featcache.store.runs import has_test_predictions

        return predictions_frame(self.path, "test") if has_test_predictions(self.path) else None

    def predict(self, images: str | os.PathLike | Sequence[str | os.PathLike], *,
                cache: str | os.PathLike | None = None, weights: str | None = None, group_col: str | None = None,
                image_col: str | None = None, test_align: str = "none", align_from: str | os.PathLike | None = None,
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

        new = new_images(self.path, images, cache, weights, group_col, image_col)
        settings = predict_settings(test_align, align_from, self.trust_pickle, similar_cases_count(neighbours,
                                                                                                   "neighbours"))
        return predict_frame(self.path, new, settings, reporter_for(quiet, reporter))

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

        new = new_images(self.path, images, cache, weights)
        return explain_run(self.path, new, similar_cases_count(k, "k"), cls, reporter_for(quiet, reporter))

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


for _name in ("test_align", "align_from"):
    Run.predict.__doc__ = Run.predict.__doc__.replace("{" + _name + "}", BY_NAME[_name].help)


def new_images(run: Path, images: str | os.PathLike | Sequence[str | os.PathLike], cache: str | os.PathLike | None,
               weights: str | None = None, group_col: str | None = None, image_col: str | None = None) -> NewImages:
    """The images a run is asked to predict or explain, their features cached in ``cache`` (default: the run's
    own cache)."""
    from featcache.evaluation.predict import NewImages
    from featcache.store.naming import cache_root_of_run

    inputs = [images] if isinstance(images, str | os.PathLike) else list(images)
    root = Path(cache) if cache else cache_root_of_run(Path(run).resolve())
    return NewImages(tuple(str(i) for i in inputs), root, group_col, image_col, weights)


def predict_settings(test_align: str, align_from: str | os.PathLike | None, trust_pickle: bool,
                     neighbours: int = 0) -> PredictSettings:
    """How a batch is predicted, each value checked by its option, in the Python keywords' spelling."""
    from featcache.evaluation.predict import PredictSettings

    return PredictSettings(BY_NAME["test_align"].checked(test_align, "test_align="),
                           BY_NAME["align_from"].checked(align_from, "align_from="), neighbours,
                           BY_NAME["trust_pickle"].checked(trust_pickle, "trust_pickle="))


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
                image_col: str | None = None, test_align: str = "none", align_from: str | os.PathLike | None = None,
                quiet: bool = True, reporter: Reporter | None = None) -> pd.DataFrame:
        """Class probabilities for new images: every member predicts them (see ``Run.predict``, whose
        keywords these are), then they are averaged or stacked. Returns a row per image, indexed by id:
        ``predicted``, ``p_<class>`` per class, ``group`` and ``failed``."""
        from featcache.evaluation.predict import predict_ensemble_frame

        new = new_images(self.runs[0].path, images, cache, weights, group_col, image_col)
        # a pickle of featcache before 0.3 is loaded only when every member was loaded trusting it (load_run)
        settings = predict_settings(test_align, align_from, all(r.trust_pickle for r in self.runs))
        return predict_ensemble_frame([r.path for r in self.runs], self.spec, new, settings,
                                      reporter_for(quiet, reporter))

    def __repr__(self) -> str:
        return f"Ensemble({self.spec} of {len(self.runs)} runs: {', '.join(r.head for r in self.runs)})"


def best_model(study: str | os.PathLike | dict, *, cache: str | os.PathLike | None = None,
               trust_pickle: bool = False) -> Run | Ensemble:
    """The best model of a study that ``featcache run`` finished: its first row in the report's ranking,
    a single run or the ensemble the study's ``[compare] ensemble`` asked for.

    Parameters
    ----------
    study : path or dict
        The study file (TOML), or its content as given to ``run_study``.
    cache : path, optional
        The cache root the study ran in (default ./cache, or $FEATCACHE_CACHE).
    trust_pickle : bool, default False
        As for :func:`load_run`.

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
        return Ensemble(tuple(Run(path, trust_pickle) for path in best.members), best.ensemble)
    return Run(best.run, trust_pickle)


def predictions_frame(run_dir: Path, which: str) -> pd.DataFrame:
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


def load_run(path: str | os.PathLike, *, trust_pickle: bool = False) -> Run:
    """A finished run folder as a ``Run`` (its ``metrics``, ``oof`` and ``predict``).

    Parameters
    ----------
    path : path
        A run folder written by ``fit`` (``featcache compare --paths`` lists them).
    trust_pickle : bool, default False
        {trust_pickle}

    Returns
    -------
    Run
    """
    return Run(Path(path), BY_NAME["trust_pickle"].checked(trust_pickle, "trust_pickle="))


load_run.__doc__ = load_run.__doc__.replace("{trust_pickle}", BY_NAME["trust_pickle"].help)


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


def __getattr__(name: str) -> object:
    """``Entry``: a cache entry (its features, ids and provenance), imported when first asked for, so that importing
    this module stays light."""
    if name == "Entry":
        from featcache.store.entries import CacheEntry

        return CacheEntry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
