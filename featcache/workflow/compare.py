"""The compare and report workflows: finished runs ranked side by side (one ranking, :func:`select_rows`, for the
screen and the page), and the self-contained HTML report (:mod:`featcache.workflow.report`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.progress import Reporter
from featcache.recipes import ReportView
from featcache.workflow.common import cache_root, reporter_for
from featcache.workflow.report import write_report_page
from featcache.workflow.results import Comparison


def dataset_of(data: str | os.PathLike | None) -> str | None:
    """The dataset name the runs of ``data`` (a folder, CSV or .npz) are filed under; None: every dataset."""
    if data is None:
        return None
    from featcache.data.sources import source_name

    if not Path(data).exists():
        raise FeatcacheError(f"--data {data}: no such file or folder")
    return source_name(str(data))


def compare_runs(data: str | os.PathLike | None, backbone: str | None, head: str | None,
                 runs: Sequence[str | os.PathLike] | None, options: dict[str, Any]) -> Comparison:
    """Every finished run of the cache (or of ``data``, ``backbone``, ``head``, or only ``runs``), ranked by the
    checked options' metric, with their ensembles; notes of runs left out are warned."""
    from featcache.reporting.compare import select_rows

    notes: list[str] = []
    rows = select_rows(cache_root(options["cache"]), options["metric"], dataset=dataset_of(data), backbone=backbone,
                       head=head, runs=None if runs is None else [Path(r) for r in runs],
                       ensemble=options["ensemble"], notes=notes)
    reporter = reporter_for(options["quiet"], None)
    for note in notes:
        reporter.warn(note)
    return Comparison(rows, options["metric"])


def report_runs(data: str | os.PathLike | None, out: str | os.PathLike | None,
                runs: Sequence[str | os.PathLike] | None, view: ReportView, options: dict[str, Any],
                reporter: Reporter | None = None) -> Path:
    """The report page of the cache's runs (or of ``data``, or only ``runs``), as ``view`` says; default place:
    ``<cache>/report.html``."""
    root = cache_root(options["cache"])
    return write_report_page(Path(out) if out else root / "report.html", view,
                             None if runs is None else [Path(r) for r in runs], root, dataset_of(data),
                             reporter_for(options["quiet"], reporter))
