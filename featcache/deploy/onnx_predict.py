"""``featcache predict --onnx``: class probabilities from an exported graph, with ONNX Runtime and
featcache's image preprocessing only (no cache entry, no scikit-learn or XGBoost model, no backbone
weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.errors import RunError
from featcache.progress import Reporter

BATCH = 16


def onnx_session(path: Path):  # noqa: ANN201 - an onnxruntime.InferenceSession
    try:
        import onnxruntime as ort
    except ImportError:
        raise RunError("predict --onnx needs ONNX Runtime: pip install onnxruntime") from None
    if not Path(path).is_file():
        raise RunError(f"--onnx {path}: no such file; make one with `featcache export RUN --out {path}`")
    options = ort.SessionOptions()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own kinds for a damaged or foreign file
        raise RunError(f"--onnx {path}: ONNX Runtime cannot load it ({str(exc)[:200]}); export the run again") from None


def graph_info(session) -> dict:  # noqa: ANN001
    """What ``featcache export`` put in the graph's metadata: classes, preprocessing, views, metrics."""
    from featcache.deploy.export import METADATA_KEY

    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise RunError("this ONNX file has no featcache metadata; pass a file written by `featcache export`")
    return json.loads(text)


def predict_onnx_frame(path: Path, inputs: list[str], reporter: Reporter | None = None,
                       group_col: str | None = None, image_col: str | None = None):  # noqa: ANN201 - a pandas DataFrame
    """The same table as :func:`featcache.evaluation.predict.predict_frame` (``predicted``, ``p_<class>``,
    the prediction set where the run had one, ``failed``), from the exported graph ``path``."""
    import pandas as pd

    from featcache.data.images import Preprocess
    from featcache.data.sources import read_record
    from featcache.deploy.export import METADATA
    from featcache.evaluation.conformal import set_column, set_labels
    from featcache.evaluation.evidence import grouped_sets
    from featcache.evaluation.features import encode_meta
    from featcache.evaluation.predict import batch_strata, images_source

    reporter = reporter or Reporter(quiet=True)
    session = onnx_session(path)
    info = graph_info(session)
    inputs_info = info.get("inputs") or [{"name": "image", "preprocess": info["preprocess"]}]
    preprocesses = []
    for given in inputs_info:
        fields = dict(given["preprocess"])
        for key in ("mean", "std", "filters"):
            fields[key] = tuple(fields.get(key, ()))
        preprocesses.append(Preprocess(**fields))
    source = images_source(inputs, group_col, image_col)
    classes = info["classes"]
    ids, images, failed, arrays = [], [], {}, {}
    for record in source.records:
        try:
            content, _ = read_record(record, arrays)
            images.append([p.load(content).permute(1, 2, 0).numpy() for p in preprocesses])
            ids.append(record.id)
        except (OSError, ValueError) as exc:
            failed[record.id] = str(exc)
            reporter.warn(f"no prediction for {record.id}: {exc}")
    if not ids:
        raise RunError(f"none of the {len(failed)} images could be read, so nothing was predicted")
    feeds = {given["name"]: np.stack([image[k] for image in images]) for k, given in enumerate(inputs_info)}
    if info.get("metadata"):  # --meta: the same columns, coded as at training
        by_id = {r.id: r for r in source.records}
        if not any(by_id[i].meta for i in ids):
            names = ", ".join(c["name"] for c in info["metadata"])
            raise RunError(f"this model also reads metadata columns ({names}); predict from a CSV that has them")
        feeds[METADATA], _ = encode_meta([by_id[i] for i in ids], [], info["metadata"], str(source.location))
        feeds[METADATA] = feeds[METADATA].astype(np.float32)
    proba = np.concatenate([session.run(["probabilities"], {k: v[start:start + BATCH] for k, v in feeds.items()})[0]
                            for start in range(0, len(ids), BATCH)])
    groups = {r.id: r.group or "" for r in source.records}
    rows = [{"id": i, "group": groups[i], "predicted": classes[int(np.argmax(p))],
             **{f"p_{c}": float(v) for c, v in zip(classes, p, strict=True)}, "near_duplicate_of": "",
             "similarity": np.nan, "failed": ""} for i, p in zip(ids, proba, strict=True)]
    rows += [{"id": i, "group": groups[i], "predicted": "", **{f"p_{c}": np.nan for c in classes},
              "near_duplicate_of": "", "similarity": np.nan, "failed": why} for i, why in failed.items()]
    columns = ["id", "predicted", *[f"p_{c}" for c in classes], "near_duplicate_of", "similarity", "group", "failed"]
    frame = pd.DataFrame(rows, columns=columns).set_index("id")
    conformal = info.get("conformal")
    if conformal:  # as predict with the run folder: each image its group's thresholds (--conformal-by)
        if conformal.get("shift") == "weighted":  # the graph carries no training features to weigh a batch against
            reporter.warn(f"{path.name}: the run's prediction sets were shift-weighted (--conformal-shift weighted), "
                          "which needs the run's training features; the exported model has only the unweighted "
                          "thresholds, so these sets use them. Predict with the run folder for weighted sets")
        found, unseen = grouped_sets(proba, conformal, batch_strata(conformal, source, ids, reporter))
        if unseen and conformal.get("by"):
            reporter.warn(f"{unseen} of {len(ids)} images belong to no {conformal['by']['column']} group the run was "
                          "calibrated on: their sets use the threshold calibrated on all training images")
        sets = set_labels(found, classes)
        frame.insert(len(classes) + 1, set_column(conformal["level"]), [*sets, *[""] * (len(frame) - len(sets))])
    return frame
