"""featcache: frozen-backbone features cached once, light heads compared honestly.

The public API (see :mod:`featcache.api`)::

    import featcache as fc
    entry = fc.extract("images/")                       # features once, in ./cache
    runs = fc.fit("images/", heads=["logreg", "mlp"])   # grouped, stratified CV
    fc.compare().to_pandas()                            # side by side, ranked
    fc.load_run(runs[0].path).predict(["new.jpg"])      # probabilities for new images

Names are imported on first use, so that ``import featcache`` (and the ``featcache`` command) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featcache.version import __version__

if TYPE_CHECKING:
    from featcache.api import audit, compare, demo, export, extract, fit, predict_onnx, report, run_study
    from featcache.errors import FeatcacheError
    from featcache.workflow.results import Comparison, Ensemble, Entry, Run, best_model, load_run

_RESULTS = "featcache.workflow.results"
_EXPORTS = {
    "extract": "featcache.api", "fit": "featcache.api", "compare": "featcache.api", "report": "featcache.api",
    "run_study": "featcache.api", "audit": "featcache.api", "demo": "featcache.api", "export": "featcache.api",
    "predict_onnx": "featcache.api", "load_run": _RESULTS, "Run": _RESULTS, "Comparison": _RESULTS,
    "Ensemble": _RESULTS, "best_model": _RESULTS, "Entry": _RESULTS,
    "FeatcacheError": "featcache.errors",
}
__all__ = ["Comparison", "Ensemble", "Entry", "FeatcacheError", "Run", "__version__", "audit", "best_model", "compare",
           "demo", "export", "extract", "fit", "load_run", "predict_onnx", "report", "run_study"]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_EXPORTS[name])
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
