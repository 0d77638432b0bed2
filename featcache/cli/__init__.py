"""The ``featcache`` command line: a thin layer over :mod:`featcache.api`, errors as one line.

The flags of ``extract``, ``fit``, ``compare``, ``report`` and ``run`` are made from the option
declarations in :mod:`featcache.options` (the same ones that make the study keys and the API keywords);
each command passes them on to the API function of the same name and prints what it returns.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import click
import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from featcache.errors import FeatcacheError
from featcache.options import BY_NAME, DOOR, Option, options_for
from featcache.progress import make_console
from featcache.workflow.files import card_beside, entry_of_run, free_predictions_path, neighbours_path


class _PeopleErrors(TyperGroup):
    """Every command's :class:`FeatcacheError` becomes one red line and exit status 2 (130 for an
    interrupted extraction), in the installed command and under typer's test runner alike."""

    def invoke(self, ctx: click.Context):
        door = DOOR.set("cli")  # errors name the flags given here (and Python's door again after the command)
        try:
            return super().invoke(ctx)
        except FeatcacheError as exc:
            make_console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(130 if type(exc).__name__ == "ExtractionInterrupted" else 2)
        finally:
            DOOR.reset(door)


_value_type = TyperOption.display_type_rich


def _no_type_for_flags(self: TyperOption, ctx: click.Context) -> str | None:
    """A flag takes no value, so its help shows no type (typer 0.29 prints `<bool>` for it)."""
    return None if self.is_flag else _value_type(self, ctx)


TyperOption.display_type_rich = _no_type_for_flags

app = typer.Typer(cls=_PeopleErrors, add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Cache frozen-backbone image features once (HDF5), then compare light "
                       "classifier heads with grouped, stratified cross-validation.\n\n"
                       "Example: `featcache extract --backbone efficientnet_lite0 --data images/` "
                       "then `featcache fit --data images/ --backbone efficientnet_lite0 --head all` "
                       "then `featcache compare`.")
console = make_console()


def _print_version(asked: bool) -> None:
    if asked:
        from featcache.version import __version__

        print(f"featcache {__version__}")
        raise typer.Exit()


@app.callback()
def _top(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print featcache's version and exit.")) -> None:
    """Cache frozen-backbone image features once (HDF5), then compare light classifier heads with grouped,
    stratified cross-validation."""


# ---------------------------------------------------------------------------------------------------------
# Flags made from the option declarations
# ---------------------------------------------------------------------------------------------------------

def _flag_parameter(option: Option, command: str) -> inspect.Parameter:
    """The typer parameter of ``option`` on ``command``."""
    default = option.default_for(command)
    kind = option.cli_kind or option.kind
    decls = [option.cli_flag] + ([option.short] if option.short else [])
    if option.multiple:
        annotation: Any = str | None
        default = ",".join(default) if default else None
    elif kind is bool:
        annotation = bool
        if default:
            decls[0] = f"{option.cli_flag}/--no-{option.cli_flag[2:]}"
    elif isinstance(kind, type) and issubclass(kind, Enum):
        annotation = kind if default is not None else kind | None
        default = None if default is None else kind(str(default))
    else:
        annotation = kind if default is not None else kind | None
    extra = {k: v for k, v in (("min", option.minimum), ("max", option.maximum), ("envvar", option.envvar),
                                ("metavar", option.metavar)) if v is not None}
    if option.required:
        default = ...
    info = typer.Option(default, *decls, help=option.help, **extra)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def command(name: str, *own: inspect.Parameter) -> Callable[[Callable], Callable]:
    """Register ``func`` as the CLI command ``name``: its ``own`` arguments and flags (see :func:`own`),
    then the declared options of ``name`` as flags; ``func`` receives every value as a keyword."""

    def wrap(func: Callable) -> Callable:
        params = list(own)
        aliases = {}
        for option in options_for(name):
            params.append(_flag_parameter(option, name))
            if option.alias:
                flag, value, help_text = option.alias
                alias_name = flag[2:].replace("-", "_")
                aliases[alias_name] = (option, value)
                params.append(inspect.Parameter(alias_name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                                default=typer.Option(False, flag, help=help_text)))

        def run(**values: Any) -> Any:
            for alias_name, (option, value) in aliases.items():
                if values.pop(alias_name):
                    given = values[option.name]
                    given = given.value if isinstance(given, Enum) else given
                    if given not in (option.default, value):
                        raise typer.BadParameter(f"{option.alias[0]} contradicts {option.cli_flag} {given}; give one",
                                                 param_hint=option.cli_flag)
                    values[option.name] = value
            return func(**values)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__, run.__doc__ = name, func.__doc__
        app.command(name)(run)
        return func

    return wrap


def own(name: str, annotation: Any, info: Any) -> inspect.Parameter:
    """A command's own argument or flag (``info``: ``typer.Argument(...)`` or ``typer.Option(...)``): one
    that is not an option of featcache's stages, such as ``predict``'s images."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=info)


def _print(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------

@command("extract")
def extract(**options: Any) -> None:
    """Run a frozen backbone once over the images and write features to HDF5 shards.

    Reruns skip images already committed (resume after a crash or Ctrl-C); a changed image,
    weights file or preprocessing never reuses old features.

    Example: `featcache extract --backbone efficientnet_lite0 --data ham10000/labels.csv`
    """
    from featcache import api

    api.extract(**options)


@command("fit")
def fit(**options: Any) -> None:
    """Train heads on cached features (scaler fit on training folds only) and score them.

    Example: `featcache fit --data ham10000/labels.csv --head all --classes mel,nv`
    """
    from featcache import api

    runs = api.fit(**options)
    _show(api.compare(cache=options["cache"], runs=[r.path for r in runs]))


def _show(comparison: Any, paths: bool = False) -> None:
    if not comparison.rows:
        raise FeatcacheError("no finished runs match; run `featcache fit` first")
    console.print(comparison.table(paths))


@command("compare",
         own("data", str | None, typer.Option(None, help="Only runs on this source (folder/CSV/npz).")),
         own("backbone", str | None, typer.Option(None, "--backbone", "-b", help="Only runs on this backbone.")),
         own("head", str | None, typer.Option(None, help="Only these heads (comma list).")),
         own("out", Path | None, typer.Option(None, help="Folder for compare.csv/.md/.png (default: the cache "
                                              "root).")),
         own("paths", bool, typer.Option(False, "--paths", help="Show each run's folder (the files always have "
                                         "it).")))
def compare(data: str | None, backbone: str | None, head: str | None, out: Path | None, paths: bool,
            **options: Any) -> None:
    """Tabulate every finished run side by side (pooled value with 95% CI, mean ± std over folds),
    best first by the pooled score, and write compare.csv/.md/.png.

    Example: `featcache compare --metric auroc`
    """
    from featcache import api

    comparison = api.compare(data, backbone=backbone, head=head, **options)
    if not options["quiet"]:
        _show(comparison, paths)
    files = comparison.write(out or api.cache_root(options["cache"]))
    _print(f"written: {files['csv']}, {files['md']}, {files['png']}")


@command("report",
         own("data", str | None, typer.Option(None, help="Only runs on this source (default: every run in the "
                                              "cache).")),
         own("out", Path | None, typer.Option(None, help="Where to write the page (default: CACHE/report.html).")))
def report(data: str | None, out: Path | None, **options: Any) -> None:
    """Write one self-contained report.html (no network requests, figures inline): leaderboard with
    intervals, best runs' confusion matrices, per-class tables, ROC and reliability, every run's folder
    and predict command, grouping and leakage warnings, and the features' provenance.

    Example: `featcache report --data ham10000/labels.csv`
    """
    from featcache import api

    _print(f"report written to {api.report(data, out=out, **options)}")


@command("predict",
         own("run", list[Path] | None, typer.Option(None, help="A run directory written by `featcache fit`; give it "
                                                    "several times with --ensemble for an ensemble of runs.")),
         own("study", Path | None, typer.Option(None, help="A study file that `featcache run` finished: predict with "
                                                "its best model (the report's first row, a run or its ensemble).")),
         own("onnx", Path | None, typer.Option(None, help="A model written by `featcache export` instead of --run: "
                                               "ONNX Runtime and featcache's image preprocessing only (no cache).")),
         own("inputs", list[str], typer.Argument(..., help="Image files and/or folders (or one CSV/.npz).")),
         own("out", Path | None, typer.Option(None, help="Output CSV; it must not exist yet (default: "
                                              "predictions.csv, or predictions-2.csv … when that exists).")),
         own("weights", str | None, typer.Option(None, help="The same --weights used at extraction, if any.")),
         own("group_col", str | None, typer.Option(None, help=BY_NAME["group_col"].help)),
         own("image_col", str | None, typer.Option(None, help=BY_NAME["image_col"].help)),
         own("neighbours", int, typer.Option(5, min=0, help="With one --run: each image's most similar training "
                                             "images, in the run's own feature space, to PREDICTIONS-neighbours.csv "
                                             "(0: none).")))
def predict(run: list[Path] | None, study: Path | None, onnx: Path | None, inputs: list[str], out: Path | None,
            weights: str | None, group_col: str | None, image_col: str | None, neighbours: int,
            **options: Any) -> None:
    """Class probabilities for new images with a saved run (features go through the cache; warns when a
    new image is identical or nearly identical to a training image), or with an exported model (--onnx).

    Example: `featcache predict --run cache/…/runs/logreg-gap-… new_images/`
    """
    from featcache import api
    from featcache.workflow import results

    if out is None:  # never over an earlier prediction: the next free name
        out = free_predictions_path()
    else:
        taken = [p for p in (out, neighbours_path(out)) if p.exists()]
        if taken:
            raise typer.BadParameter(f"{taken[0]} exists (an earlier prediction?); give another --out, or remove it "
                                     "first", param_hint="--out")
    if sum(bool(given) for given in (run, study, onnx)) != 1:
        raise typer.BadParameter("give one of --run (a run folder), --study (a finished study file) or --onnx (an "
                                 "exported model)", param_hint="--run")
    if options["ensemble"] and not (run and len(run) > 1):
        raise typer.BadParameter("--ensemble combines several --run folders (a study's best model carries its own)",
                                 param_hint="--ensemble")
    if run and len(run) > 1 and not options["ensemble"]:
        raise typer.BadParameter(f"{len(run)} runs given: say how to combine them with --ensemble (N to average "
                                 "them, stack for the meta-learner)", param_hint="--ensemble")
    if onnx is not None:
        ignored = [flag for flag, value in (("--weights", weights), ("--test-align", options["test_align"] != "none"),
                                            ("--align-from", options["align_from"]),
                                            ("--trust-pickle", options["trust_pickle"])) if value]
        if ignored:
            raise typer.BadParameter(f"{', '.join(ignored)} apply to --run only: an exported model holds its "
                                     "weights and takes images as they are", param_hint="--onnx")
        frame = api.predict_onnx(onnx, inputs, group_col=group_col, image_col=image_col, quiet=options["quiet"])
    else:
        if study is not None:
            model = results.best_model(study, cache=options["cache"], trust_pickle=options["trust_pickle"])
            _print(f"the best model of {study}: {model!r}")
            first = model.runs[0] if isinstance(model, results.Ensemble) else model
            measured = first.config.get("protocol", {}).get("test_align", "none")
            if measured != options["test_align"]:
                console.print(f"[yellow]warning:[/] the study scored its test set with --test-align {measured}; "
                              f"these images are predicted with --test-align {options['test_align']}, so its test "
                              "score does not describe them", highlight=False)
        elif len(run) > 1:
            model = results.Ensemble(tuple(results.load_run(r, trust_pickle=options["trust_pickle"]) for r in run),
                                     options["ensemble"])
        else:
            model = results.load_run(run[0], trust_pickle=options["trust_pickle"])
        extra = {"neighbours": neighbours} if isinstance(model, results.Run) else {}
        frame = model.predict(inputs, cache=api.cache_root(options["cache"]), weights=weights,
                              group_col=group_col, image_col=image_col, quiet=options["quiet"],
                              test_align=options["test_align"], align_from=options["align_from"], **extra)
    from featcache.workflow.files import write_predictions  # after every check: it imports the whole stack

    written = write_predictions(frame, out)
    if neighbours and "neighbours_agree" not in frame.columns:  # said, not skipped in silence
        _print("no similar cases: they are searched for one --run (not an ensemble or an --onnx model)")
    _print(f"predictions written to {written[0]}" + (f"; each image's most similar training images to {written[1]}"
                                                     if len(written) > 1 else ""))


@command("explain",
         own("run", Path, typer.Argument(..., help="A run directory written by `featcache fit`.")),
         own("images", list[str], typer.Argument(..., help="Image files and/or folders.")),
         own("out", Path, typer.Option(..., help="Folder for one IMAGE-heatmap.png per image, explanations.csv and "
                                       "neighbours.csv (it must not hold an explanations.csv yet).")),
         own("cls", str | None, typer.Option(None, "--class", help="The class whose evidence to map (default: each "
                                             "image's predicted class).")),
         own("neighbours", int, typer.Option(5, min=0, help="Similar training cases per image.")),
         own("weights", str | None, typer.Option(None, help="The same --weights used at extraction, if any.")))
def explain(run: Path, images: list[str], out: Path, cls: str | None, neighbours: int, weights: str | None,
            **options: Any) -> None:
    """Where in each photo the evidence lies: a heatmap beside the photo (the exact class activation map of a
    linear head on gap features, occlusion otherwise), with its most similar training cases.

    Example: `featcache explain cache/…/runs/logreg-gap-… new_images/ --out explained/`
    """
    from featcache import api
    from featcache.workflow import results

    if (out / "explanations.csv").exists():
        raise typer.BadParameter(f"{out / 'explanations.csv'} exists (an earlier explanation?); give another --out",
                                 param_hint="--out")
    from featcache.workflow.files import write_explanations

    found = results.load_run(run).explain(images, k=neighbours, cls=cls, cache=api.cache_root(options["cache"]),
                                      weights=weights, quiet=options["quiet"])
    written = write_explanations(found, out)
    _print(f"{len(found)} heatmaps ({', '.join(sorted({e.method for e in found}))}) in {out}; table: {written}")


@command("export",
         own("run", Path, typer.Argument(..., help="A run directory written by `featcache fit`.")),
         own("out", Path, typer.Option(Path("model.onnx"), help="The ONNX file to write.")),
         own("weights", str | None, typer.Option(None, help="The same --weights used at extraction, if any.")))
def export(run: Path, out: Path, weights: str | None, **options: Any) -> None:
    """One ONNX file from images to class probabilities: views, backbone, pooling, scaler and head in one
    graph, with the classes, preprocessing and metrics in its metadata. Runs with ONNX Runtime alone.

    Example: `featcache export cache/…/runs/logreg-gap-… --out model.onnx`
    """
    from featcache import api

    path = api.export(run, out=out, weights=weights, **options)
    _print(f"model written to {path} ({path.stat().st_size / 1e6:.1f} MB), its model card to {card_beside(path)} "
           f"(and in the file's metadata); use it with `featcache predict --onnx {path} IMAGES` or docs/deploy.md's "
           "script")


@command("verify",
         own("entry", Path | None, typer.Argument(None, help="A cache entry folder, or a cache root to check every "
                                                  "entry in it (default: the cache root).")),
         own("data", str | None, typer.Option(None, help="The source to hash the images against (default: the "
                                              "one recorded at extraction).")),
         own("repair", bool, typer.Option(False, "--repair", help="Drop damaged shards and leftovers of "
                                          "interrupted writes and rewrite the manifest, so the next extract redoes "
                                          "only those images.")),
         own("quick", bool, typer.Option(False, "--quick", help="Skip re-hashing the image files.")),
         own("break_lock", bool, typer.Option(False, "--break-lock", help="See `extract --break-lock`.")))
def verify(entry: Path | None, data: str | None, repair: bool, quick: bool, break_lock: bool,
           **options: Any) -> None:
    """Check cache entries: every shard opens, shapes/dtypes/ids are sound, no NaN/Inf, fingerprints
    agree, and the images still hash to what was extracted. Exit status 1 whenever it reports anything
    (an error: results could be wrong; a warning: work is missing or left over), 0 when all is well.

    Example: `featcache verify cache/ham10000_200x150/efficientnet_lite0-0e1ebd8d300e6c4f --repair`
    """
    from featcache import api
    from featcache.workflow.files import verify as verify_entries

    all_ok = True
    for entry_dir, repaired, found in verify_entries(entry or api.cache_root(options["cache"]), data, repair,
                                                     not quick, break_lock):
        for line in repaired:
            _print(f"[green]repaired[/] {entry_dir.name}: {line}")
        all_ok &= not found.findings  # whatever it reports, a script sees in the exit status
        if options["quiet"] and not found.findings:
            continue
        status = ("[green]ok[/]" if not found.findings else "[red]PROBLEMS[/]" if not found.ok
                  else "[yellow]WARNINGS[/]")
        _print(f"{status} {entry_dir}: {found.shards} shards, {found.images} images, {found.failed} failed at "
               f"extraction, {found.checked_files} files re-hashed")
        for finding in found.findings:
            colour = "red" if finding.severity == "error" else "yellow"
            _print(f"  [{colour}]{finding.severity}[/] {finding.line()}")
        for note in found.notes:
            _print(f"  note: {note}")
    if not all_ok:
        raise typer.Exit(1)


@command("demo")
def demo(**options: Any) -> None:
    """Whole pipeline on 200 CC0 ISIC images shipped with featcache: melanoma vs nevus.

    Extracts EfficientNet-Lite0 features (ImageNet weights, offline), fits the fast heads with
    5-fold stratified CV and prints the comparison. A second run reuses the cache.
    """
    from featcache import api

    runs = api.demo(**options)
    _show(api.compare(cache=options["cache"], runs=[r.path for r in runs]))
    entry = entry_of_run(runs[0].path)
    _print(f"features: {entry}\nruns: {entry / 'runs'}")


@command("run",
         own("study", Path, typer.Argument(..., help="A study file (TOML): [data], [extract], [fit], [compare], "
                                           "[report].")),
         own("dry_run", bool, typer.Option(False, "--dry-run", help="Print the plan and what is already cached; do "
                                           "nothing.")))
def run(study: Path, dry_run: bool, **options: Any) -> None:
    """Run a whole study: every extraction and fit in order with one progress display, reusing
    everything already finished (rerun the same command after a kill to resume), then the report.

    Example: `featcache run study.toml --dry-run`
    """
    from featcache import api

    result = api.run_study(study, dry_run=dry_run, **options)
    done = sum(1 for step in result.steps if step.done)
    if dry_run:
        table = Table(title=f"plan of {study.name}")
        for column in ("step", "status", "detail"):
            table.add_column(column, overflow="fold")
        for step in result.steps:
            table.add_row(step.label, "[green]done[/]" if step.done else "to do", step.detail)
        console.print(table)
        _print(f"{done} of {len(result.steps)} steps already done")
        return
    _print(f"{len(result.runs)} runs ({done} of {len(result.steps)} steps were already done); "
           f"report: {result.report}")


@command("audit", own("out", Path | None, typer.Option(None, help="Folder for label_issues.csv, duplicates.csv, "
                                                      "outliers.csv and audit.html (default: CACHE/audit-<dataset>).")),
         own("head", str, typer.Option("logreg,mlp", help="Heads whose out-of-fold probabilities are averaged "
                                       "(two different heads find more label errors than either alone).")))
def audit(out: Path | None, head: str, **options: Any) -> None:
    """What can be wrong with a dataset, from its cached features: suspected label errors (confident
    learning on out-of-fold probabilities), identical and near-identical images, outliers; a page shows
    each suspect's thumbnail with its given and suggested label.

    Example: `featcache audit --data ham10000/labels.csv --group-col lesion_id --out audit/`
    """
    from featcache import api

    api.audit(out=out, heads=head, **options)


@command("show", own("run", Path, typer.Argument(..., help="A run folder (see `featcache compare --paths`).")))
def show(run: Path, **options: Any) -> None:
    """Print a run's protocol, scores, confusion matrix and per-class precision/recall/F1.

    Example: `featcache show cache/ham10000_200x150/efficientnet_lite0-…/runs/logreg-gap-…`
    """
    from featcache.workflow import results

    result = results.load_run(run).metrics
    pooled, classes = result["pooled"], result["config"]["classes"]
    _print(f"[bold]{escape(result['config']['head'])}[/] on {result['config']['backbone']}/"
           f"{result['config']['pool']} — {result['protocol']}, {result['n_images']} images")
    ci = pooled.get("ci95", {})
    for metric in ("balanced_accuracy", "macro_f1", "auroc", "accuracy"):
        if metric in pooled:
            interval = f" [{ci[metric][0]:.3f}, {ci[metric][1]:.3f}]" if metric in ci else ""
            _print(f"  {metric}: {pooled[metric]:.3f}{interval}")
    matrix = Table(title="confusion matrix (rows: true, columns: predicted)")
    matrix.add_column("true \\ predicted")
    for name in classes:
        matrix.add_column(name, justify="right")
    for name, counts in zip(classes, pooled["confusion_matrix"], strict=True):
        matrix.add_row(name, *[str(c) for c in counts])
    per_class = Table(title="per class")
    for column in ("class", "precision", "recall", "F1", "AUROC (one-vs-rest)", "images"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name, values in pooled["per_class"].items():
        auroc = pooled.get(f"auroc:{name}")
        per_class.add_row(name, f"{values['precision']:.3f}", f"{values['recall']:.3f}", f"{values['f1']:.3f}",
                          "–" if auroc is None else f"{auroc:.3f}", str(values["support"]))
    if not options["quiet"]:
        console.print(matrix)
        console.print(per_class)
    for line in result.get("notes", [])[:5]:
        _print(f"  note: {escape(line)}")


@command("backbones")
def backbones(**options: Any) -> None:
    """List the registered backbones, those whose weights are on this machine first, with their
    poolings (feature dimensions) and where the weights would come from."""
    from featcache.workflow.files import backbone_availability

    available = backbone_availability()
    if options["quiet"]:
        console.print("\n".join(spec.name for spec, _, usable in available if usable == 0))
        return
    table = Table(title="featcache backbones, usable here first (any timm model also works as timm:<name>, any "
                        "transformers or open_clip model as hf:<hub id or folder> / open_clip:<hub id or folder>)")
    for col in ("name", "poolings (dim)", "default", "weights here", "description", "licence"):
        table.add_column(col)
    for spec, where, _ in available:
        described = spec.description + (f" [{spec.hub}]" if spec.hub else "") + (
            f" NOT LOADABLE: {spec.unavailable}" if spec.unavailable else "")
        table.add_row(spec.name, ", ".join(f"{p} ({d})" for p, d in spec.dims.items()),
                      ",".join(spec.default_pools), where, described, spec.licence or "–")
    console.print(table)


def main() -> None:
    app()
