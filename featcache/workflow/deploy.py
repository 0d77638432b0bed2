"""The hand-over workflows: a finished run as one ONNX file, and new images predicted from such a file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.progress import Reporter
from featcache.workflow.results import Run

if TYPE_CHECKING:
    import pandas as pd


def export_model(run: str | os.PathLike | Run, out: str | os.PathLike, weights: str | None, trust_pickle: bool,
                 reporter: Reporter) -> Path:
    """``run`` as one ONNX file at ``out``; a head without an ONNX form is refused before any model is loaded or
    any line says it is exporting."""
    from featcache.deploy.export import export_run
    from featcache.deploy.head_graph import NotExportable, refusal

    path = run.path if isinstance(run, Run) else Path(run)
    why = refusal(Run(path).config)  # Run() refuses what is not a finished run folder
    if why:
        raise NotExportable(f"{path}: {why}")
    return export_run(path, Path(out), weights=weights, trust_pickle=trust_pickle, reporter=reporter)


def predict_with_onnx(model: str | os.PathLike, images: str | os.PathLike | Sequence[str | os.PathLike],
                      group_col: str | None, image_col: str | None, reporter: Reporter) -> pd.DataFrame:
    """Class probabilities of ``images`` from a file ``export`` wrote, with ONNX Runtime and featcache's image
    preprocessing only."""
    from featcache.deploy.onnx_predict import predict_onnx_frame

    inputs = [images] if isinstance(images, str | os.PathLike) else list(images)
    return predict_onnx_frame(Path(model), [str(i) for i in inputs], reporter, group_col, image_col)
