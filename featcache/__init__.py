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
    from featcache.api import (
        Comparison,
        Ensemble,
        Run,
        audit,
        best_model,
        compare,
        demo,
        export,
        extract,
        fit,
        load_run,
        predict_onnx,
        report,
        run_study,
    )
    from featcache.errors import FeatcacheError
    from featcache.store.entries import CacheEntry as Entry

_EXPORTS = {
    "extract": "featcache.api", "fit": "featcache.api", "compare": "featcache.api", "report": "featcache.api",
    "run_study": "featcache.api", "audit": "featcache.api", "load_run": "featcache.api", "Run": "featcache.api",
    "Comparison": "featcache.api", "demo": "featcache.api", "Entry": "featcache.store.entries",
    "FeatcacheError": "featcache.errors", "export": "featcache.api", "predict_onnx": "featcache.api",
    "Ensemble": "featcache.api", "best_model": "featcache.api",
}
__all__ = ["Comparison", "Ensemble", "Entry", "FeatcacheError", "Run", "__version__", "audit", "best_model", "compare",
           "demo", "export", "extract", "fit", "load_run", "predict_onnx", "report", "run_study"]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_EXPORTS[name])
    value = getattr(module, "CacheEntry" if name == "Entry" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
