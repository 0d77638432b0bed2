"""Experiment tracking: each finished run logged to MLflow (parameters, metrics, artefacts).

Optional: ``pip install 'featcache[mlflow]'``. By default the store is local, inside the cache
(``<cache>/mlflow.db``, artefacts under ``<cache>/mlflow-artifacts``); any tracking URI works
(a server, a database). A run is logged once: its featcache run id is a tag, and a run already
logged in the experiment is not logged again.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from featcache.errors import FeatcacheError
from featcache.reporting.plots import confusion_figure
from featcache.store.model_files import model_files
from featcache.store.naming import trained_run
from featcache.store.runs import CONFIG, METRICS, OOF, TEST, TEST_UNALIGNED, read_metrics

EXPERIMENT = "featcache"
TAG = "featcache.run"


def default_uri(cache_root: Path) -> str:
    return f"sqlite:///{Path(cache_root).resolve() / 'mlflow.db'}"


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise FeatcacheError("--mlflow needs MLflow: pip install 'featcache[mlflow]' (or mlflow)") from None
    return mlflow


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (str, int, float, bool)) or value is None:
        out[prefix] = str(value)[:500]


def log_runs(runs: list[Path], cache_root: Path, uri: str | None = None, experiment: str = EXPERIMENT) -> list[str]:
    """Log every run folder of ``runs`` that the experiment does not hold yet; returns the MLflow
    run ids (of new and already-logged runs alike, in the order of ``runs``)."""
    mlflow = _mlflow()
    from mlflow.tracking import MlflowClient

    uri = uri or default_uri(cache_root)
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=(Path(cache_root).resolve() / "mlflow-artifacts").as_uri())
    except Exception as exc:  # MLflow raises many kinds for a bad URI or an unreachable server
        raise FeatcacheError(f"--mlflow {uri}: cannot open the tracking store ({exc})") from None
    ids = []
    for run in runs:
        existing = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}` = '{Path(run).name}'",
                                      max_results=1)
        if existing:
            ids.append(existing[0].info.run_id)
            continue
        ids.append(_log_one(mlflow, client, experiment_id, Path(run)))
    return ids


def _log_one(mlflow, client, experiment_id: str, run: Path) -> str:
    result = read_metrics(run)
    config = result["config"]
    params: dict[str, str] = {}
    for key in ("head", "pool", "backbone", "dataset", "feature_fingerprint", "labels"):
        params[key] = str(config.get(key))[:500]
    _flat("protocol", config.get("protocol", {}), params)
    _flat("estimator", config.get("estimator", {}), params)
    metrics = {key: value for key, value in result["pooled"].items() if isinstance(value, float)}
    for key, (low, high) in result["pooled"].get("ci95", {}).items():
        metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = low, high
    for key, value in (result.get("test") or {}).items():
        if isinstance(value, float):
            metrics[f"test_{key}"] = value
    metrics = {key.replace(":", "_"): value for key, value in metrics.items()}  # MLflow names: no ':'
    tracked = client.create_run(experiment_id, run_name=run.name,
                                tags={TAG: run.name, "featcache.folder": str(run.resolve()),
                                      "featcache.protocol": result["protocol"][:500]})
    run_id = tracked.info.run_id
    items = list(params.items())
    for start in range(0, len(items), 100):
        for key, value in items[start:start + 100]:
            client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path in [run / name for name in (METRICS, CONFIG, TEST, TEST_UNALIGNED)] + [trained_run(run) / OOF] \
            + model_files(run):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    with tempfile.TemporaryDirectory() as tmp:
        figure = Path(tmp) / "confusion_matrix.png"
        figure.write_bytes(confusion_figure(result["pooled"]["confusion_matrix"], config["classes"]))
        client.log_artifact(run_id, str(figure))
    client.set_terminated(run_id)
    return run_id
