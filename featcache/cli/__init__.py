"""The ``featcache`` command line: a thin layer over the Python API, errors as one line."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from featcache.errors import FeatcacheError
from featcache.options import (
    DEVICE_PATTERN,
    Calibration,
    ClassWeight,
    Dtype,
    Engine,
    Grouping,
    Metric,
    Precision,
    Resampler,
    ResizeMode,
    Split,
    UseViews,
    ViewCount,
)


class _PeopleErrors(TyperGroup):
    """Every command's :class:`FeatcacheError` becomes one red line and exit status 2 (130 for an
    interrupted extraction), in the installed command and under typer's test runner alike."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatcacheError as exc:
            Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(130 if type(exc).__name__ == "ExtractionInterrupted" else 2)


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
console = Console()

CacheOpt = typer.Option(None, "--cache", envvar="FEATCACHE_CACHE",
                        help="Cache root (default ./cache, or $FEATCACHE_CACHE).")
DataOpt = typer.Option(..., "--data", help="Image folder (one sub-folder per class, or with a "
                       "labels.csv), a CSV manifest (generic, HAM10000 metadata, ISIC one-hot) or an .npz.")


PreprocessOpt = typer.Option(None, help="Image filters before the backbone, a comma list in order: hair-removal "
                             "(DullRazor), color-constancy (Shades of Gray, p=6), dataset-norm (last: normalise "
                             "with the dataset's own channel mean/std). Part of the fingerprint.",
                             callback=lambda value: ",".join(_filters(value)) or None)


RayOpt = typer.Option(None, "--ray", metavar="local|auto|ADDRESS", help="Run on Ray: `local` starts a cluster on "
                      "this machine for the run, `auto` joins the one started here with `ray start --head`, or "
                      "a cluster address (ray://host:10001). Same store, fingerprints and results; "
                      "pip install 'featcache[ray]'.")


def _cluster(address: str | None, reporter, actors: int | None = None):
    """The Ray cluster asked for with --ray (None without it)."""
    if not address:
        if actors:
            raise typer.BadParameter("--ray-actors needs --ray", param_hint="--ray-actors")
        return None
    from featcache.extraction.ray import RayCluster

    cluster = RayCluster(address, actors=actors)
    reporter.info(f"--ray: {cluster.describe()}")
    return cluster


def _filters(value: str | None) -> tuple[str, ...]:
    from featcache.data.preprocessing import checked_filters

    try:
        return checked_filters(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


MlflowOpt = typer.Option(False, "--mlflow", help="Log each run to MLflow (default store: CACHE/mlflow.db); "
                         "needs `pip install 'featcache[mlflow]'`.")
MlflowUriOpt = typer.Option(None, "--mlflow-uri", help="MLflow tracking URI (implies --mlflow), e.g. "
                            "http://mlflow.lab:5000 or sqlite:///runs.db.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only errors, warnings and the final lines.")
ImageColOpt = typer.Option(None, "--image-col", help="CSV column with the image path or id (any case).")
LabelColOpt = typer.Option(None, "--label-col", help="CSV column with the label (any case).")
GroupColOpt = typer.Option(None, "--group-col", help="CSV column saying which images belong together "
                          "(patient, lesion, case). Default: the first of group, lesion_id, patient_id, case_id, "
                          "subject_id, participant_id, study_id … (any case).")


def _check_device(value: str) -> str:
    if not DEVICE_PATTERN.match(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def _check_metric(value: str) -> str:
    from featcache.reporting.compare import checked_metric

    try:
        return checked_metric(value)
    except FeatcacheError as exc:
        raise typer.BadParameter(str(exc).split(": ", 1)[-1]) from None


def _say_groups(source, reporter) -> None:
    """Where the groups come from, or loudly that there are none."""
    if source.group_column:
        n = len({r.group for r in source.records if r.group})
        reporter.info(f"groups: column {source.group_column!r} ({n} groups of {len(source.records)} images)")
    elif source.suspect_group_columns:
        reporter.warn(f"no group column recognised in {source.location}, but "
                      f"{', '.join(map(repr, source.suspect_group_columns))} looks like one (ids shared by "
                      "several images): pass --group-col NAME, or --no-groups if the images are independent")


def _cache(cache: Path | None) -> Path:
    from featcache.store.naming import default_cache_root

    return cache or default_cache_root()


def _reporter(quiet: bool):
    from featcache.progress import Reporter

    return Reporter(quiet=quiet)


@app.command()
def extract(
    data: str = DataOpt,
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b",
                                 help="Registry name (see `featcache backbones`) or timm:<model>."),
    images: Path | None = typer.Option(None, help="Folder the CSV's image paths are relative to."),
    pool: str | None = typer.Option(None, help="Comma list of poolings, e.g. `cls,mean,cls+mean` "
                                    "(ViTs) or `gap,fc7` (VGG/AlexNet); default per backbone."),
    weights: str | None = typer.Option(None, help="Local weights file (.pth/.safetensors), or "
                                       "`random` for timing tests only. Default: $FEATCACHE_WEIGHTS_DIR, "
                                       "an installed weights package, then the online download."),
    dtype: Dtype = typer.Option(Dtype.float16, help="Stored feature dtype."),
    batch_size: int | None = typer.Option(None, help="Default 8 on CPU, 128 on CUDA."),
    workers: int | None = typer.Option(None, help="Decoding worker processes."),
    device: str = typer.Option("auto", callback=_check_device, help="auto, cpu, cuda or cuda:N."),
    precision: Precision = typer.Option(Precision.auto, help="CUDA autocast: auto (bf16 if supported), bf16, "
                                        "fp16, fp32. CPUs always compute in fp32."),
    no_jpeg_draft: bool = typer.Option(False, "--no-jpeg-draft", help="Decode JPEGs at full size."),
    input_size: int | None = typer.Option(None, help="Crop size in pixels instead of the backbone's own."),
    preprocess: str | None = PreprocessOpt,
    norm_from: str | None = typer.Option(None, help="With --preprocess ...,dataset-norm: normalise with the "
                                         "statistics of this dataset (cache name, folder or CSV; e.g. the "
                                         "training set when extracting a test set) instead of this one's."),
    engine: Engine = typer.Option(Engine.auto, help="What runs the backbone: auto (on the CPU the engine measured "
                                  "fastest for the backbone, often 1.2-3x PyTorch; on CUDA torch), torch, or its "
                                  "ONNX export on onnxruntime or openvino. Part of the entry's fingerprint."),
    resampler: Resampler = typer.Option(Resampler.pil, help="What resizes the images: pil (the backbone's own eval "
                                        "transform, bit for bit) or torch (PyTorch's uint8 resize of the decoded "
                                        "JPEG: 1.3-2.4x faster decoding, pixels within 3 levels; its own entry)."),
    views: ViewCount = typer.Option(ViewCount.one, help="Views per image stored (mirrors and quarter turns of "
                                    "the input; heads train on all and average over them)."),
    resize: ResizeMode = typer.Option(ResizeMode.crop, help="crop (the backbone's resize + centre crop), full "
                                      "(whole image squeezed to a square) or pad (whole image padded to a square)."),
    shard_size: int = typer.Option(1024, help="Images per committed shard (the unit of resume)."),
    image_col: str | None = ImageColOpt,
    label_col: str | None = LabelColOpt,
    group_col: str | None = GroupColOpt,
    break_lock: bool = typer.Option(False, "--break-lock", help="Clear a lock file left by a dead run on a "
                                    "file system without POSIX locks (others are freed by the kernel)."),
    ray: str | None = RayOpt,
    ray_actors: int | None = typer.Option(None, min=1, help="Backbone actors on Ray (default: one per GPU, "
                                          "else 1)."),
    cache: Path | None = CacheOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run a frozen backbone once over the images and write features to HDF5 shards.

    Reruns skip images already committed (resume after a crash or Ctrl-C); a changed image,
    weights file or preprocessing never reuses old features.

    Example: `featcache extract --backbone efficientnet_lite0 --data ham10000/labels.csv`
    """
    from featcache.data.sources import open_source
    from featcache.extraction.extract import extract as run_extract

    reporter = _reporter(quiet)
    source = open_source(data, images, image_col, label_col, group_col)
    for note in source.notes[:10]:
        reporter.warn(note)
    _say_groups(source, reporter)
    pools = tuple(p.strip() for p in pool.split(",")) if pool else None
    result = run_extract(source, backbone, _cache(cache), pools, dtype.value, weights, batch_size, workers,
                         shard_size, device=device, precision=precision.value, jpeg_draft=not no_jpeg_draft,
                         input_size=input_size, views=int(views.value), resize=resize.value,
                         break_lock=break_lock, reporter=reporter, engine=engine.value,
                         preprocess=preprocess or (), norm_from=norm_from, resampler=resampler.value,
                         cluster=_cluster(ray, reporter, ray_actors))
    for note in result.notes[len(source.notes):]:
        reporter.info(note)
    console.print(result.summary(), highlight=False, soft_wrap=True)


@app.command()
def backbones(quiet: bool = QuietOpt) -> None:
    """List the registered backbones, those whose weights are on this machine first, with their
    poolings (feature dimensions) and where the weights would come from."""
    from featcache.backbones.registry import REGISTRY, weights_available

    found = {spec.name: weights_available(spec) for spec in REGISTRY.values()}
    ordered = sorted(REGISTRY.values(), key=lambda spec: found[spec.name].startswith("download"))
    if quiet:
        console.print("\n".join(s.name for s in ordered if not found[s.name].startswith("download")))
        return
    table = Table(title="featcache backbones, usable here first (any timm model also works as timm:<name>)")
    for col in ("name", "poolings (dim)", "default", "weights here", "description"):
        table.add_column(col)
    for spec in ordered:
        table.add_row(spec.name, ", ".join(f"{p} ({d})" for p, d in spec.dims.items()),
                      ",".join(spec.default_pools), found[spec.name], spec.description)
    console.print(table)


@app.command()
def fit(
    data: str = DataOpt,
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b",
                                 help="The backbone whose features to use; `a+b` fuses several (their features "
                                      "side by side, rows aligned by image id)."),
    head: str = typer.Option("fast", help="A head, a comma list, `fast` (logreg,svm-linear,knn,mlp) "
                             "or `all` (+svm-rbf,xgboost); baselines majority/stratified come with both. "
                             "Also: svm-rbf-exact (libsvm, slow beyond a few thousand images)."),
    pool: str | None = typer.Option(None, help="Pooling to use (default: the entry's first)."),
    cv: int = typer.Option(5, help="Folds; grouped by the source's group column when it has one."),
    split: Split = typer.Option(Split.cv, help="`cv`; `official` to use the source's split column (validation "
                                "rows are left out); `random712` for an image-level 70/10/20 split (DermaMNIST's "
                                "protocol: it ignores lesion groups)."),
    seeds: int = typer.Option(1, min=1, help="Repeat the CV with this many seeds; scores are averaged over all."),
    class_weight: ClassWeight = typer.Option(ClassWeight.balanced, help="Weigh classes equally in training."),
    pca: int | None = typer.Option(None, help="Reduce features to N principal components (fit per fold)."),
    tune: bool = typer.Option(False, "--tune", help="Choose hyper-parameters by inner CV on training folds."),
    tune_budget: float = typer.Option(300.0, help="Seconds per inner search (each outer fold and the "
                                      "final refit); candidates after it are skipped, defaults come first."),
    no_standardize: bool = typer.Option(False, "--no-standardize",
                                        help="Skip the per-fold StandardScaler (for ablations only)."),
    views: ViewCount | None = typer.Option(None, help="Use the entry extracted with this many views "
                                           "(default: the newest entry)."),
    resize: ResizeMode | None = typer.Option(None, help="Use the entry extracted with this --resize."),
    engine: Engine | None = typer.Option(None, help="Use the entry extracted with this --engine (torch, "
                                         "onnxruntime or openvino; default: the newest entry, named on screen)."),
    resampler: Resampler | None = typer.Option(None, help="Use the entry extracted with this --resampler."),
    preprocess: str | None = typer.Option(None, help="Use the entry extracted with these --preprocess filters "
                                          "(default: the unfiltered one)."),
    use_views: UseViews = typer.Option(UseViews.all, help="On multi-view entries: `all` (train on every view, "
                                       "average predictions over them), `train` (no test-time averaging), "
                                       "`first` (original only)."),
    meta: str | None = typer.Option(None, help="Metadata columns as extra features, e.g. `age,sex,localization` "
                                    "(imputed and encoded inside the pipeline)."),
    calibrate: Calibration | None = typer.Option(None, help="Recalibrate probabilities: `sigmoid`, `isotonic` or "
                                         "`temperature` (keeps each view's predicted class), on 3 inner folds "
                                         "of the training rows, weighted like the head (--class-weight)."),
    label_map: str | None = typer.Option(None, help="Merge labels: `akiec=malignant,mel=malignant,*=benign`."),
    classes: str | None = typer.Option(None, help="Keep only these classes, e.g. `mel,nv`."),
    test_data: str | None = typer.Option(None, help="A held-out source scored after refitting on all of --data."),
    images: Path | None = typer.Option(None, help="Folder the CSV's image paths are relative to."),
    image_col: str | None = ImageColOpt,
    label_col: str | None = LabelColOpt,
    group_col: str | None = GroupColOpt,
    test_group_col: str | None = typer.Option(None, help="Group column of --test-data, if its name differs."),
    no_groups: bool = typer.Option(False, "--no-groups", help="Cross-validate without groups, on purpose "
                                   "(every image independent); the protocol line records it."),
    groups: Grouping = typer.Option(Grouping.auto, help="`auto`: the group column when there is one; "
                                    "`near-duplicates`: identical and near-identical images form groups "
                                    "(for data without a patient/lesion column); `none` = --no-groups."),
    near_dup_threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Cosine similarity above "
                                                    "which two images count as near-duplicates (default: "
                                                    "calibrated per backbone on HAM10000)."),
    force: bool = typer.Option(False, "--force", help="Redo runs that already finished."),
    ray: str | None = RayOpt,
    mlflow: bool = MlflowOpt,
    mlflow_uri: str | None = MlflowUriOpt,
    cache: Path | None = CacheOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train heads on cached features (scaler fit on training folds only) and score them.

    Example: `featcache fit --data ham10000/labels.csv --head all --classes mel,nv`
    """
    from featcache.data.sources import open_source
    from featcache.evaluation.fitting import find_entry, fit_many
    from featcache.evaluation.heads import parse_heads
    from featcache.evaluation.protocol import Protocol

    if no_groups and groups not in (Grouping.auto, Grouping.none):
        raise typer.BadParameter(f"--no-groups contradicts --groups {groups.value}; give one", param_hint="--groups")
    if no_groups and group_col:
        raise typer.BadParameter("--no-groups contradicts --group-col; give one", param_hint="--group-col")
    reporter = _reporter(quiet)
    root = _cache(cache)
    source = open_source(data, images, image_col, label_col, group_col)
    _say_groups(source, reporter)
    filters = _filters(preprocess)
    if engine == Engine.auto:
        raise typer.BadParameter("auto names no entry: give the engine the entry was extracted with (torch, "
                                 "onnxruntime or openvino; `featcache extract` says which auto took)",
                                 param_hint="--engine")
    entries = [find_entry(root, source, name, pool, int(views.value) if views else None,
                          resize.value if resize else None, filters, engine.value if engine else None,
                          resampler.value if resampler else None, reporter) for name in backbone.split("+")]
    test_source = test_entries = None
    if test_data:
        test_source = open_source(test_data, group_col=test_group_col)
        test_entries = [find_or_extract_like(root, test_source, e, reporter) for e in entries]
    entry, test_entry = entries[0], test_entries[0] if test_entries else None
    if len(entries) > 1:  # --backbone a+b: fusion
        from featcache.store.fusion import FusedEntry

        entry = FusedEntry([(e, pool or e.pools[0]) for e in entries])
        test_entry = FusedEntry([(e, pool or e.pools[0]) for e in test_entries]) if test_entries else None
    protocol = Protocol(cv=cv, split=split, seeds=seeds, class_weight=class_weight, pca=pca, tune=tune,
                        tune_budget_s=tune_budget, standardize=not no_standardize, views=use_views,
                        meta=meta or "", calibrate=calibrate, groups=Grouping.none if no_groups else groups,
                        near_dup_threshold=near_dup_threshold)
    runs = fit_many(source, entry, parse_heads(head), pool, protocol, label_map, classes,
                    test_source, test_entry, force, reporter, cluster=_cluster(ray, reporter))
    _track(runs, root, mlflow, mlflow_uri)
    _compare(root, source.name, backbone, None, Metric.balanced_accuracy.value, runs=runs)


def _track(runs: list[Path], root: Path, mlflow: bool, uri: str | None) -> None:
    if mlflow or uri:
        from featcache.reporting.tracking import default_uri, log_runs

        log_runs(runs, root, uri)
        console.print(f"logged {len(runs)} run(s) to MLflow at {uri or default_uri(root)}", highlight=False,
                      soft_wrap=True)


def find_or_extract_like(root: Path, source, entry, reporter):
    """Features of ``source`` made exactly like ``entry`` (same fingerprint), extracting if needed."""
    from featcache.extraction.extract import extract_like

    result = extract_like(source, entry, root, reporter=reporter)
    if result.entry.fingerprint != entry.fingerprint:
        raise FeatcacheError(f"--test-data features ({result.entry.fingerprint}) were not made like the "
                             f"training features ({entry.fingerprint}); extract both with the same options")
    return result.entry


def _compare(root: Path, dataset: str | None, backbone: str | None, head: str | None, metric: str,
             out: Path | None = None, runs: list[Path] | None = None, ensemble: str | None = None,
             paths: bool = False, quiet: bool = False) -> None:
    from featcache.reporting.compare import (
        checked_metric,
        collect_runs,
        ensemble_rows,
        print_table,
        sort_rows,
        unique_rows,
        write_outputs,
    )

    metric = checked_metric(metric)
    rows = collect_runs(root, dataset, backbone, head, metric)
    if runs is not None:
        wanted = {Path(r).resolve() for r in runs}
        rows = [r for r in rows if r.run.resolve() in wanted]
    if not rows:
        raise FeatcacheError(f"no finished runs in {root} match; run `featcache fit` first")
    checked_metric(metric, rows)
    rows = unique_rows(rows)
    if ensemble:
        try:
            rows += ensemble_rows(rows, ensemble, metric)
        except ValueError as exc:
            raise FeatcacheError(str(exc)) from None
    rows = sort_rows(rows, metric)
    if not quiet:
        print_table(rows, metric, console, paths)
    files = write_outputs(rows, metric, out or root)
    console.print(f"written: {files['csv']}, {files['md']}, {files['png']}", highlight=False, soft_wrap=True)


@app.command()
def compare(
    data: str | None = typer.Option(None, help="Only runs on this source (folder/CSV/npz)."),
    backbone: str | None = typer.Option(None, "--backbone", "-b"),
    head: str | None = typer.Option(None, help="Only these heads (comma list)."),
    metric: str = typer.Option("balanced_accuracy", callback=_check_metric,
                               help="Sort key: balanced_accuracy, macro_f1, auroc, accuracy, or auroc:<class> "
                                    "(one-vs-rest AUROC of one class)."),
    out: Path | None = typer.Option(None, help="Folder for compare.csv/.md/.png (default: the cache root)."),
    ensemble: str | None = typer.Option(None, help="Add soft-vote ensembles of the best runs of each "
                                        "comparable group, e.g. `top3` (scored on the same out-of-fold predictions)."),
    paths: bool = typer.Option(False, "--paths", help="Show each run's folder (the files always have it)."),
    cache: Path | None = CacheOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Tabulate every finished run side by side (mean ± std over folds, pooled value with 95% CI).

    Example: `featcache compare --metric auroc`
    """
    dataset = None
    if data:
        from featcache.data.sources import source_name

        if not Path(data).exists():
            raise FeatcacheError(f"--data {data}: no such file or folder")
        dataset = source_name(data)
    _compare(_cache(cache), dataset, backbone, head, metric, out, ensemble=ensemble, paths=paths, quiet=quiet)


@app.command()
def predict(
    run: Path = typer.Option(..., help="A run directory written by `featcache fit`."),
    inputs: list[str] = typer.Argument(..., help="Image files and/or folders (or one CSV/.npz)."),
    out: Path = typer.Option(Path("predictions.csv"), help="Output CSV."),
    weights: str | None = typer.Option(None, help="The same --weights used at extraction, if any."),
    group_col: str | None = GroupColOpt,
    cache: Path | None = CacheOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Class probabilities for new images with a saved run (features go through the cache); warns
    when a new image is identical or nearly identical to a training image.

    Example: `featcache predict --run cache/…/runs/logreg-gap-… new_images/`
    """
    from featcache.evaluation.predict import predict as run_predict

    path = run_predict(run, inputs, _cache(cache), out, _reporter(quiet), weights, group_col)
    console.print(f"predictions written to {path}")


@app.command()
def verify(
    entry: Path | None = typer.Argument(None, help="A cache entry folder, or a cache root to check every "
                                        "entry in it (default: the cache root)."),
    data: str | None = typer.Option(None, help="The source to hash the images against (default: the one "
                                    "recorded at extraction)."),
    repair: bool = typer.Option(False, "--repair", help="Drop damaged shards and leftovers of interrupted writes and "
                                "rewrite the manifest, so the next extract redoes only those images."),
    quick: bool = typer.Option(False, "--quick", help="Skip re-hashing the image files."),
    break_lock: bool = typer.Option(False, "--break-lock", help="See `extract --break-lock`."),
    cache: Path | None = CacheOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Check cache entries: every shard opens, shapes/dtypes/ids are sound, no NaN/Inf, fingerprints
    agree, and the images still hash to what was extracted. Exit status 1 when something is wrong.

    Example: `featcache verify cache/ham10000_200x150/efficientnet_lite0-0e1ebd8d300e6c4f --repair`
    """
    from featcache.data.sources import open_source
    from featcache.store.entries import MANIFEST, SHARD_GLOB, entry_dirs
    from featcache.store.verify import verify_entry

    target = entry or _cache(cache)
    if (target / MANIFEST).is_file() or any(target.glob(SHARD_GLOB)):
        entries = [target]
    else:
        entries = entry_dirs(target)
        if not entries:
            raise FeatcacheError(f"{target}: neither a cache entry nor a cache root with entries in it")
    source = open_source(data) if data else None
    all_ok = True
    for entry_dir in entries:
        if repair:
            fixed = verify_entry(entry_dir, source, repair=True, check_files=False, break_lock=break_lock)
            for line in fixed.repaired:
                console.print(f"[green]repaired[/] {entry_dir.name}: {line}", highlight=False, soft_wrap=True)
        report = verify_entry(entry_dir, source, check_files=not quick)
        all_ok &= report.ok
        if quiet and not report.findings:
            continue
        status = "[green]ok[/]" if report.ok else "[red]PROBLEMS[/]"
        console.print(f"{status} {entry_dir}: {report.shards} shards, {report.images} images, "
                      f"{report.failed} failed at extraction, {report.checked_files} files re-hashed",
                      highlight=False, soft_wrap=True)
        for finding in report.findings:
            colour = "red" if finding.severity == "error" else "yellow"
            console.print(f"  [{colour}]{finding.severity}[/] {finding.line()}", highlight=False, soft_wrap=True)
        for note in report.notes:
            console.print(f"  note: {note}", highlight=False, soft_wrap=True)
    if not all_ok:
        raise typer.Exit(1)


@app.command()
def demo(cache: Path | None = CacheOpt, quiet: bool = QuietOpt) -> None:
    """Whole pipeline on 200 CC0 ISIC images shipped with featcache: melanoma vs nevus.

    Extracts EfficientNet-Lite0 features (ImageNet weights, offline), fits the fast heads with
    5-fold stratified CV and prints the comparison. A second run reuses the cache.
    """
    from featcache.evaluation.fitting import run_demo

    root = _cache(cache)
    entry, runs = run_demo(root, _reporter(quiet))
    _compare(root, entry.manifest["dataset"], None, None, "balanced_accuracy", runs=runs)
    console.print(f"features: {entry.path}\nruns: {entry.path / 'runs'}", highlight=False, soft_wrap=True)


@app.command()
def show(run: Path = typer.Argument(..., help="A run folder (see `featcache compare --paths`)."),
         quiet: bool = QuietOpt) -> None:
    """Print a run's protocol, scores, confusion matrix and per-class precision/recall/F1.

    Example: `featcache show cache/ham10000_200x150/efficientnet_lite0-…/runs/logreg-gap-…`
    """
    from featcache.store.runs import read_metrics

    result = read_metrics(run)
    pooled, classes = result["pooled"], result["config"]["classes"]
    console.print(f"[bold]{result['config']['head']}[/] on {result['config']['backbone']}/{result['config']['pool']}"
                  f" — {result['protocol']}, {result['n_images']} images", highlight=False, soft_wrap=True)
    ci = pooled.get("ci95", {})
    for metric in ("balanced_accuracy", "macro_f1", "auroc", "accuracy"):
        if metric in pooled:
            interval = f" [{ci[metric][0]:.3f}, {ci[metric][1]:.3f}]" if metric in ci else ""
            console.print(f"  {metric}: {pooled[metric]:.3f}{interval}", highlight=False)
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
    if not quiet:
        console.print(matrix)
        console.print(per_class)
    for line in result.get("notes", [])[:5]:
        console.print(f"  note: {line}", highlight=False, soft_wrap=True)


@app.command()
def report(
    data: str | None = typer.Option(None, help="Only runs on this source (default: every run in the cache)."),
    out: Path | None = typer.Option(None, help="Where to write the page (default: CACHE/report.html)."),
    metric: str = typer.Option("balanced_accuracy", callback=_check_metric, help="Ranking metric."),
    top: int = typer.Option(20, min=1, help="Runs shown per protocol in the leaderboard."),
    best: int = typer.Option(3, min=0, help="Best runs shown with confusion matrix, ROC and reliability."),
    ensemble: int | None = typer.Option(None, min=2, help="Add a soft-vote ensemble of the N best runs."),
    cache: Path | None = CacheOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Write one self-contained report.html (no network requests, figures inline): leaderboard with
    intervals, best runs' confusion matrices, per-class tables, ROC and reliability, every run's folder
    and predict command, grouping and leakage warnings, and the features' provenance.

    Example: `featcache report --data ham10000/labels.csv`
    """
    from featcache.data.sources import source_name
    from featcache.reporting.report import write_report

    root = _cache(cache)
    dataset = source_name(data) if data else None
    path = write_report(out or root / "report.html", cache_root=root, dataset=dataset, metric=metric, top=top,
                        best=best, ensemble=ensemble)
    console.print(f"report written to {path}", highlight=False, soft_wrap=True)


@app.command()
def run(
    study: Path = typer.Argument(..., help="A study file (TOML): [data], [extract], [fit], [compare], [report]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and what is already cached; do nothing."),
    ray: str | None = RayOpt,
    mlflow: bool = MlflowOpt,
    mlflow_uri: str | None = MlflowUriOpt,
    cache: Path | None = CacheOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run a whole study: every extraction and fit in order with one progress display, reusing
    everything already finished (rerun the same command after a kill to resume), then the report.

    Example: `featcache run study.toml --dry-run`
    """
    from featcache.study import load_study, run_study

    plan = load_study(study)
    reporter = _reporter(quiet)
    result = run_study(plan, _cache(cache), reporter, dry_run=dry_run,
                       cluster=None if dry_run else _cluster(ray, reporter))
    done = sum(1 for step in result.steps if step.done)
    if dry_run:
        table = Table(title=f"plan of {study.name}")
        for column in ("step", "status", "detail"):
            table.add_column(column, overflow="fold")
        for step in result.steps:
            status = {True: "[green]done[/]", False: "to do", None: "to do"}[step.done]
            table.add_row(step.label, status, step.detail)
        console.print(table)
        console.print(f"{done} of {len(result.steps)} steps already done", highlight=False)
        return
    _track(result.runs, _cache(cache), mlflow, mlflow_uri)
    console.print(f"{len(result.runs)} runs ({done} of {len(result.steps)} steps were already done); "
                  f"report: {result.report}", highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
