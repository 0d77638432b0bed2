"""A run's model on disk, without pickles: what :mod:`featcache.store.runs` writes and reads.

A pickle runs whatever code it names when it is loaded, so a run folder received from someone else
could not be opened safely. Instead a run's model is kept as:

- ``model.skops``: the scikit-learn pipeline (scaler, PCA, head) in skops' format, which holds data
  and type names but no code; loading it accepts only the types listed in :data:`TRUSTED_TYPES`
  and refuses any other by name, before anything is built;
- ``xgboost-<k>.json``: each XGBoost booster in XGBoost's own JSON format;
- ``mlp-<k>.safetensors`` and ``mlp-<k>.json``: each MLP's weights (safetensors) and settings (JSON);
- ``model.json``: the rest (classes, pooling, feature fingerprint, training ids for the duplicate check).

A held-out evaluation folder inside a run (:func:`featcache.store.naming.heldout_path`) holds only its own
``model.json`` (the run's facts with the evaluation's config and test images); the model is the run's.

The booster and the network leave the skops file through their estimators' ``__getstate__``: while
:func:`save_model` or :func:`load_model` runs, :func:`side_files` is the folder they go to and come
from (a context variable, so parallel pickling by joblib's workers is not affected).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

from featcache.errors import RunError
from featcache.store.entries import write_json_atomic
from featcache.store.naming import trained_run

MODEL_SKOPS = "model.skops"
MODEL_JSON = "model.json"
LEGACY_PICKLE = "model.joblib"  # featcache before 0.3
SIDE_FILE_GLOBS = ("xgboost-*.json", "mlp-*.safetensors", "mlp-*.json")

# Every type a run's pipeline may hold besides plain data (PLAIN_TYPES). Anything else in a model.skops,
# scikit-learn's other classes included, is refused by name. Kept explicit on purpose: a new head or step
# must be added here, and tests/test_model_files.py saves every head to check the list. XGBoost has no
# type here: its boosters are not in the skops file but in their own JSON files.
TRUSTED_TYPES = (
    "featcache.evaluation.heads.CalibratedHead",
    "featcache.evaluation.heads.CosineKNN",
    "featcache.evaluation.heads.SVMHead",
    "featcache.evaluation.heads.TorchMLPClassifier",
    "featcache.evaluation.heads.ViewEnsemble",
    "featcache.evaluation.heads.XGBHead",
    "featcache.evaluation.heads.ZeroShotHead",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.calibration._TemperatureScaling",
    "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.decomposition._pca.PCA",
    "sklearn.dummy.DummyClassifier",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.isotonic.IsotonicRegression",
    "sklearn.kernel_approximation.Nystroem",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.linear_model._ridge.RidgeClassifier",
    "sklearn.linear_model._sgd_fast.Hinge",
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._encoders.OneHotEncoder",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.svm._classes.SVC",
    "numpy.dtype",
)
PLAIN_TYPES = frozenset({
    "builtins.bool", "builtins.bytes", "builtins.dict", "builtins.float", "builtins.int", "builtins.list",
    "builtins.NoneType", "builtins.slice", "builtins.str", "builtins.tuple", "numpy.ndarray", "numpy.float16",
    "numpy.float32", "numpy.float64", "numpy.int32", "numpy.int64", "numpy.bool_", "numpy.bool", "numpy.str_",
})

_side: contextvars.ContextVar[SideFiles | None] = contextvars.ContextVar("featcache_side_files", default=None)


class SideFiles:
    """The run folder that boosters and networks are written to (``writing``) or read from."""

    def __init__(self, folder: Path, writing: bool):
        self.folder, self.writing, self._count = Path(folder), writing, 0

    def new_name(self, kind: str, suffix: str) -> str:
        name = f"{kind}-{self._count}{suffix}"
        self._count += 1
        return name

    def path(self, name: str) -> Path:
        if Path(name).name != name or not name.startswith(("xgboost-", "mlp-")):
            raise RunError(f"{self.folder / MODEL_SKOPS}: names a side file {name!r}, which is not one featcache "
                           "writes; the run folder was changed by hand")
        path = self.folder / name
        if not path.is_file():
            raise RunError(f"{self.folder}: {name} is missing (the model's booster or weights); copy the whole run "
                           "folder, or fit the run again")
        return path


def side_files() -> SideFiles | None:
    """Where a model's booster or network goes to or comes from, while :func:`save_model` or
    :func:`load_model` runs; None otherwise (plain pickling, e.g. to joblib's workers)."""
    return _side.get()


@contextlib.contextmanager
def _side_files_at(folder: Path, writing: bool) -> Iterator[SideFiles]:
    token = _side.set(SideFiles(folder, writing))
    try:
        yield _side.get()
    finally:
        _side.reset(token)


def save_model(folder: Path, payload: dict) -> None:
    """Write ``payload`` (``pipeline`` and JSON-able facts about it) into ``folder``, without pickles."""
    import skops.io as sio

    with _side_files_at(folder, writing=True):
        sio.dump(payload["pipeline"], folder / MODEL_SKOPS)
    write_json_atomic(folder / MODEL_JSON, {k: v for k, v in payload.items() if k != "pipeline"})


def holds_only_pickle(run_dir: Path) -> bool:
    """A run folder of featcache before 0.3, whose model is a pickle."""
    run_dir = Path(run_dir)
    return (run_dir / LEGACY_PICKLE).is_file() and not (run_dir / MODEL_SKOPS).is_file()


def load_model(run_dir: Path, trust_pickle: bool = False) -> dict:
    """The model of a run folder: ``pipeline`` and the facts saved beside it.

    Refuses a model that holds a type outside :data:`TRUSTED_TYPES`, naming it, before anything is
    built; and a pickle (``model.joblib`` of featcache before 0.3) unless ``trust_pickle``. For a held-out
    evaluation folder: its run's model, with the evaluation's own facts."""
    facts_dir, run_dir = Path(run_dir), trained_run(run_dir)
    if holds_only_pickle(run_dir):
        if not trust_pickle:
            raise RunError(f"{run_dir} holds {LEGACY_PICKLE}, a pickle written by featcache before 0.3: loading it can "
                           "run any code it contains. Fit the run again (the same `featcache fit` command refits it "
                           "without pickles), or, only for a folder you made yourself, pass --trust-pickle")
        import joblib

        _loud(f"loading the pickle {run_dir / LEGACY_PICKLE} because --trust-pickle was given: it can run any code "
              "it contains; fit the run again to save it without pickles")
        return joblib.load(run_dir / LEGACY_PICKLE)
    path = run_dir / MODEL_SKOPS
    if not path.is_file():
        raise RunError(f"{run_dir}: no {MODEL_SKOPS}; pass a run folder written by `featcache fit`")
    import skops.io as sio

    try:
        found = sio.get_untrusted_types(file=path)
        named = types_in(path)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise RunError(f"{path} is not a readable skops file ({type(exc).__name__}: {exc}); copy the run folder "
                       "again, or fit the run again") from None
    refused = sorted((set(found) | named) - set(TRUSTED_TYPES) - PLAIN_TYPES)
    if refused:
        raise RunError(f"{path} holds types featcache does not load: {', '.join(refused)}. A run written by "
                       "`featcache fit` holds none; this file was made or changed elsewhere, so nothing in it was "
                       "loaded")
    with _side_files_at(run_dir, writing=False):
        pipeline = sio.load(path, trusted=list(found))
    try:
        facts = json.loads((facts_dir / MODEL_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{facts_dir / MODEL_JSON}: not readable ({exc}); copy the whole run folder, or fit the run "
                       "again") from None
    return {**facts, "pipeline": pipeline}


def types_in(path: Path) -> set[str]:
    """Every type a skops file names (``module.class``), read from its schema without building anything."""
    with zipfile.ZipFile(path) as archive:
        schema = json.loads(archive.read("schema.json"))
    names: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("__class__"), str) and isinstance(node.get("__module__"), str):
                names.add(f"{node['__module__']}.{node['__class__']}")
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    return names


def model_files(run_dir: Path) -> list[Path]:
    """The files that make up a run's model (for copying or logging it)."""
    facts_dir, run_dir = Path(run_dir), trained_run(run_dir)
    files = [run_dir / MODEL_SKOPS, facts_dir / MODEL_JSON]
    for pattern in SIDE_FILE_GLOBS:
        files += sorted(run_dir.glob(pattern))
    return [f for f in files if f.is_file()]


def _loud(message: str) -> None:
    """Said on screen whatever the command's verbosity."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
