"""The report workflow: ranked runs, the evidence of their galleries, then the page (the API's ``report``, the
command line's and a study's)."""

from __future__ import annotations

from pathlib import Path

from featcache.progress import Reporter
from featcache.recipes import ReportView


def write_report_page(path: Path, view: ReportView, runs: list[Path] | None, root: Path | None,
                      dataset: str | None, reporter: Reporter) -> Path:
    """The report workflow: the runs ranked as compare ranks them, the evidence of the galleries the page shows
    made where a run's folder does not hold it yet (heatmaps and similar cases, with progress), then the page,
    which renders what the folders hold."""
    from featcache.evaluation.gallery import make_gallery
    from featcache.reporting.report import gallery_runs, report_rows, write_report
    from featcache.store.runs import read_gallery

    rows, notes = report_rows(view, runs, root, dataset)
    for run in gallery_runs(rows, view):
        found = read_gallery(run)
        # a gallery is reused; why a run had none (its entry moved, its weights missing here) is asked again
        if found is None or found[0].get("reason"):
            make_gallery(run, reporter)
    return write_report(path, view, rows, notes)
