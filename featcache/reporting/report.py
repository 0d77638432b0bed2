"""``report.html``: one self-contained page a person reads, for the runs of a dataset or a study.

No network requests: styles are inline and every figure is a matplotlib PNG embedded as a data
URI. The page holds a forest-plot leaderboard per protocol, the best runs' confusion matrices,
per-class tables, one-vs-rest ROC curves and reliability diagrams, every run's folder with the
exact ``featcache predict`` command and its grouping/leakage warnings, and the provenance of the
features (backbone, weights SHA-256, fingerprint, versions, date, machine).
"""

from __future__ import annotations

import datetime as _dt
import html
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featcache.data.sources import in_reading_order
from featcache.errors import CacheError, FeatcacheError
from featcache.evaluation.head_registry import ZERO_SHOT
from featcache.recipes import ReportView
from featcache.reporting.compare import (
    Row,
    alignment_note,
    forest_png,
    is_baseline_head,
    select_rows,
    sets_text,
)
from featcache.reporting.plots import confusion_figure, forest_figure, png_base64, reliability_figure, roc_figure
from featcache.store.entries import CacheEntry
from featcache.store.naming import cache_root_of_run, entry_of_run
from featcache.store.runs import read_metrics, read_predictions
from featcache.version import __version__


def forest_png_of(labels: list[str], points: list[float], intervals: list, colours: list[str], overall: float,
                  title: str) -> bytes:
    """A subgroup forest plot: the run's own score drawn as the reference line."""
    return forest_figure(labels, points, intervals, colours,
                         "balanced accuracy, 95 % bootstrap interval", title, overall, "the whole run")


def _img(png: str, alt: str) -> str:
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def predict_command(run: Path) -> str:
    return f"featcache predict --run {run} NEW_IMAGES/ --out predictions.csv"


def _ci_text(entry: dict | None) -> str:
    if not entry or entry.get("pooled") is None:
        return "–"
    ci = entry.get("ci")
    return f"{entry['pooled']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _warnings(result: dict) -> list[str]:
    from featcache.evaluation.audit import leakage_message

    found = []
    grouping = result.get("grouping", {})
    split = result.get("config", {}).get("protocol", {}).get("split", "cv")
    if grouping and not grouping.get("grouped") and split == "cv":  # a fixed split is not a CV to group
        found.append(f"not grouped: {grouping.get('by')}")
    message, serious = leakage_message(result.get("leakage") or {}, grouping)
    if serious:
        found.append(message)
    return found


def _provenance(rows: list[Row]) -> str:
    entries = {}
    for row in rows:
        if row.backbone != "ensemble":
            entries.setdefault(entry_of_run(row.run), row)
    lines = []
    for path in sorted(entries):
        try:
            manifest = CacheEntry(path).manifest
        except (CacheError, ValueError, KeyError):
            continue
        prov, inputs = manifest.get("provenance", {}), manifest.get("fingerprint_inputs", {})
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            manifest.get("backbone"), manifest.get("dataset"), inputs.get("weights_sha256", "–"),
            prov.get("weights_origin", "–"), manifest.get("fingerprint"), prov.get("featcache"), prov.get("torch"),
            prov.get("timm"), prov.get("device"), prov.get("host"), prov.get("date"), path)) + "</tr>")
    header = ("backbone", "dataset", "weights SHA-256", "weights from", "fingerprint", "featcache", "torch", "timm",
              "device", "host", "extracted", "entry folder")
    return (f"<table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{''.join(lines)}</table>")


def _per_class_table(per_class: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                   f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>" for c, v in per_class.items())
    return ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>images</th></tr>"
            f"{rows}</table>")


def _best_run_section(row: Row, metric: str) -> str:
    result = read_metrics(row.run)
    pooled = result["pooled"]
    oof = read_predictions(row.run)
    first = oof.seeds == oof.seeds.min()
    labels, proba = oof.labels[first], oof.proba[first]
    seeds = "" if len(np.unique(oof.seeds)) == 1 else " (figures: seed 0; numbers: mean over seeds)"
    held_out = f" &middot; {html.escape(row.held_out)}" if row.held_out else ""
    parts = [f"<h3>{html.escape(row.backbone)} / {html.escape(row.pool)} / {html.escape(row.head)}{held_out}</h3>",
             f"<p>{html.escape(result['protocol'])} &middot; {metric} {_ci_text(row.metrics.get(metric))}{seeds}</p>",
             _img(png_base64(confusion_figure(pooled["confusion_matrix"], oof.classes)), "confusion matrix"),
             _per_class_table(pooled["per_class"]),
             '<div class="pair">', _img(png_base64(roc_figure(labels, proba, oof.classes)), "ROC curves"),
             _img(png_base64(reliability_figure(labels, proba, oof.classes)), "reliability diagram"), "</div>"]
    parts += _subgroup_section(result)
    return "\n".join(parts)


def _subgroup_section(result: dict) -> list[str]:
    """A forest plot of balanced accuracy by subgroup (out of fold), one per column, the run's score as the line;
    the worst subgroup red when its interval lies below it."""
    subgroups = result.get("subgroups") or {}
    if not subgroups:
        return []
    overall = result["pooled"]["balanced_accuracy"]
    parts = ["<h4>By subgroup (out of fold)</h4>"]
    bands = result.get("subgroup_bands") or {}
    for column, groups in subgroups.items():
        shown = [(v, e) for v, e in in_reading_order(groups) if e.get("balanced_accuracy")]
        if not shown:
            continue
        labels = [f"{column} = {v} (n {e['n']})" for v, e in shown]
        points = [e["balanced_accuracy"]["pooled"] for _, e in shown]
        intervals = [tuple(e["balanced_accuracy"]["ci"] or (p, p)) for (_, e), p in zip(shown, points, strict=True)]
        colours = ["#c53030" if e.get("below_overall") else "#2b6cb0" for _, e in shown]
        banded = f" (quartile bands of {column}: edges {', '.join(f'{b:g}' for b in bands[column])})" \
            if column in bands else ""
        parts.append(_img(png_base64(forest_png_of(labels, points, intervals, colours, overall,
                                                   f"balanced accuracy by {column}{banded}")),
                          f"subgroups {column}"))
    return parts


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: #f3f3f3; } code { font-size: 0.9em; word-break: break-all; } .warn { color: #a33; }
img.figure { max-width: 100%; display: block; margin: 0.6em 0; } .pair { display: flex; flex-wrap: wrap; gap: 1em; }
.pair img.figure { max-width: 48%; } .muted { color: #777; }
.case { display: flex; flex-wrap: wrap; gap: 0.5em; align-items: flex-start; margin: 0.4em 0; }
.case figure { margin: 0; max-width: 130px; font-size: 0.75em; } img.thumb { display: block; max-height: 120px; }
.wide { overflow-x: auto; } .wide th { white-space: nowrap; overflow-wrap: normal; }
"""


def report_rows(view: ReportView, runs: list[Path] | None = None, cache_root: Path | None = None,
                dataset: str | None = None) -> tuple[list[Row], list[str]]:
    """The rows a report shows, ranked (:func:`featcache.reporting.compare.select_rows`, as compare ranks them): of
    ``runs`` (run folders), or of every run of ``dataset`` in ``cache_root``; and the notes of what was left out."""
    roots = sorted({cache_root_of_run(r) for r in runs}) if runs else [Path(cache_root or ".")]
    notes: list[str] = []
    rows = select_rows(roots, view.metric, dataset=dataset, runs=runs, ensemble=view.ensemble, notes=notes)
    if not rows:
        raise FeatcacheError("no finished runs to report; run `featcache fit` (or `featcache run`) first")
    return rows, notes


def _groups(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.protocol), []).append(row)
    return groups


def _leading_and_galleried(members: list[Row], view: ReportView) -> tuple[list[Row], list[Row]]:
    """A protocol's runs in ranked order (no baselines, no ensembles), and those that get a gallery: heatmaps need
    one backbone and no metadata columns, so a fused or --meta leader gives its gallery to the best run that can
    have one."""
    leading = [r for r in members if r.config and not is_baseline_head(r.head)]
    return leading, [r for r in leading if "+" not in r.backbone and not r.config.get("meta_spec")][:view.gallery]


def gallery_runs(rows: list[Row], view: ReportView) -> list[Path]:
    """The run folders whose gallery the page shows (their evidence is made before the page is written)."""
    return [row.run for members in _groups(rows).values() for row in _leading_and_galleried(members, view)[1]]


def write_report(path: Path, view: ReportView, rows: list[Row], notes: Sequence[str] = ()) -> Path:
    """Write ``report.html`` of ``rows`` (:func:`report_rows`) as ``view`` says (:class:`featcache.recipes.ReportView`),
    the galleries as their runs' folders hold them. Returns the path."""
    title, metric, top, best = view.title, view.metric, view.top, view.best
    groups = _groups(rows)
    runs_listed = [r for r in rows if r.config]
    ensembles = len(rows) - len(runs_listed)
    counted = f"{len(runs_listed)} runs" + (f" and {ensembles} ensemble(s) of them" if ensembles else "")
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class='muted'>{counted} &middot; made {_dt.datetime.now().isoformat(timespec='seconds')} by "
            f"featcache {__version__} on {html.escape(platform.node())} ({html.escape(platform.platform())}, "
            f"Python {platform.python_version()})</p>"] + [f"<p class='warn'>{html.escape(n)}</p>" for n in notes]
    for (dataset_name, protocol), members in groups.items():
        shown = members[:top]
        more = f" (top {top} of {len(members)})" if len(members) > top else ""
        body.append(f"<h2>{html.escape(dataset_name)}: {html.escape(protocol)}</h2>")
        if "UNGROUPED" in protocol:
            body.append("<p class='warn'>Cross-validation was not grouped: images of one patient or lesion may "
                        "sit on both sides of a split, and the scores may be optimistic.</p>")
        body.append(_img(png_base64(forest_png(shown, metric, f"{dataset_name} · {protocol}{more}")),
                         f"leaderboard {dataset_name}"))
        if any(is_baseline_head(r.head) for r in shown):
            body.append("<p class='muted'>Grey rows are baselines that never look at the image: <em>majority</em> "
                        "always answers the commonest training class and <em>stratified</em> guesses at the training "
                        "class rates, so they sit at chance (the dashed line), or below it where a held-out part's "
                        "commonest class is not the training set's.</p>")
        if any(r.head.split(" (")[0] == ZERO_SHOT for r in shown):
            body.append("<p class='muted'>Purple rows are <em>zero-shot</em>: the backbone's text tower reads each "
                        "class's prompts and an image goes to the class whose prompts its embedding is closest to. "
                        "Nothing is learnt from the images, so it is the baseline a probe trained on the same features "
                        "must beat (its run's model card lists the prompts).</p>")
        body.append(_leaderboard_table(shown, metric))
        leading, galleried = _leading_and_galleried(members, view)
        def among(row: Row, rows: list[Row]) -> bool:
            return any(row is other for other in rows)

        for row in [*leading[:best], *[r for r in galleried if not among(r, leading[:best])]]:
            if among(row, leading[:best]):
                body.append(_best_run_section(row, metric))
            else:
                body.append(f"<h3>{html.escape(row.backbone)} / {html.escape(row.pool)} / {html.escape(row.head)}</h3>")
            if among(row, galleried):
                from featcache.reporting.gallery import gallery_section

                if row is galleried[0] and leading and row is not leading[0]:
                    body.append("<p class='muted'>The leading run reads several backbones' features or metadata "
                                "columns, so a heatmap cannot show what drove it; the gallery is that of the best run "
                                "of one backbone.</p>")
                left = int(view.max_mb * 1e6) - sum(len(part) for part in body) - 200_000  # room for the rest
                body.append(gallery_section(row.run, max(left, 0))[0])
    body += ["<h2>Runs</h2>", _runs_table(runs_listed), "<h2>Provenance of the features</h2>",
             "<div class='wide'>", _provenance(rows), "</div>"]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page)
    except OSError as exc:
        raise CacheError(f"cannot write {path} ({exc.strerror or exc}); pass --out with a writable path") from None
    return path


def _leaderboard_table(rows: list[Row], metric: str) -> str:
    has_test, has_sets = any(r.test for r in rows), any(r.conformal for r in rows)
    held_out = any(r.held_out for r in rows)
    header = ["#", "backbone / pool / head", *(["held-out settings"] if held_out else []), f"{metric} [95% CI]",
              "folds mean ± std", "macro F1", "AUROC", *(["prediction sets: coverage, mean size"] if has_sets else [])]
    header += ["test balanced accuracy [95% CI]", "test unaligned", "test shift (domain AUROC)"] if has_test else []
    header += ["test prediction sets"] if has_test and has_sets else []
    lines = []
    for rank, row in enumerate(rows, start=1):
        m = row.metrics.get(metric) or {}
        spread = f"{m['mean']:.3f} ± {m['std']:.3f}" if m.get("n_folds", 2) > 1 and "mean" in m else "(one split)"
        cells = [str(rank), f"{row.backbone} / {row.pool} / {row.head}", *([row.held_out or "–"] if held_out else []),
                 _ci_text(m), spread, _ci_text(row.metrics.get("macro_f1")), _ci_text(row.metrics.get("auroc")),
                 *([sets_text(row.conformal)] if has_sets else [])]
        if has_test:
            test = row.test or {}
            shift, unaligned = test.get("shift") or {}, test.get("unaligned") or {}
            note = f" ({alignment_note(test)})" if alignment_note(test) else ""
            cells += [_ci_text({"pooled": test.get("balanced_accuracy"),
                                "ci": test.get("ci95", {}).get("balanced_accuracy")}) + note,
                      _ci_text({"pooled": unaligned.get("balanced_accuracy"),
                                "ci": unaligned.get("ci95", {}).get("balanced_accuracy")}),
                      _ci_text({"pooled": shift.get("domain_auroc"), "ci": shift.get("domain_auroc_ci")})]
            cells += [sets_text(test.get("conformal"), row.conformal)] if has_sets else []
        lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{''.join(lines)}</table>"


def _runs_table(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        result = read_metrics(row.run)
        found = _warnings(result)
        choice = (result.get("test") or {}).get("test_align_choice")
        # not a warning, but what a reader of the test score must know: how its features were treated
        note = (f"<br><span class='muted'>--test-align auto chose {html.escape(choice['chosen'])}: "
                f"{html.escape(choice['reason'])}</span>" if choice else "")
        warnings = (f"<td><span class='warn'>{'<br>'.join(html.escape(w) for w in found)}</span>{note}</td>"
                    if found else f"<td><span class='muted'>none</span>{note}</td>")
        baseline = is_baseline_head(row.head)
        command = ("<span class='muted'>a baseline: it never looks at the image</span>" if baseline
                   else f"<code>{html.escape(predict_command(row.run))}</code>")
        lines.append(f"<tr><td>{html.escape(row.backbone)} / {html.escape(row.pool)} / {html.escape(row.head)}</td>"
                     f"<td>{html.escape(result['protocol'])}</td>{warnings}"
                     f"<td><code>{html.escape(str(row.run))}</code></td><td>{command}</td></tr>")
    return ("<table><tr><th>run</th><th>protocol</th><th>grouping / leakage warnings; test alignment</th>"
            f"<th>folder</th><th>predict with it</th></tr>{''.join(lines)}</table>")
