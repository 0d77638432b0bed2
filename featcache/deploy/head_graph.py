"""A fitted head pipeline (scaler, PCA, head) as an ONNX graph from features to class probabilities.

Each piece is converted by the library that knows it (skl2onnx for scikit-learn's, onnxmltools for
XGBoost's boosters, PyTorch's exporter for the MLP), the Nystroem map of the RBF SVM by hand (no
converter has it), and the pieces are joined in order. A head that cannot be expressed is refused
with its name and the reason (:class:`NotExportable`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from featcache.errors import RunError
from featcache.evaluation.head_registry import HEAD_REGISTRY

OPSET = 17  # the backbone exports' opset (featcache.extraction.engines.ONNX_OPSET)
ML_OPSET = 3
IR_VERSION = 8  # the IR version of opset 17
FEATURES, PROBABILITIES = "features", "probabilities"


class NotExportable(RunError):
    """A run's head, or a part of its run, that has no ONNX form."""


def refusal(config: dict) -> str | None:
    """Why a run with this ``config.json`` cannot be exported, or None: checked before any work."""
    from featcache.backbones.catalog import get_spec
    from featcache.errors import WeightsUnavailable

    for name in str(config.get("backbone") or "").split("+"):
        try:
            why = get_spec(name).torch_only if name else ""
        except WeightsUnavailable:  # a folder backbone moved away: the export would fail later, say it now
            why = "its model folder is not where the run was made"
        if why:
            return (f"its backbone {name} runs on PyTorch only ({why}), so the run cannot become one ONNX graph; "
                    "predict with `featcache predict --run RUN`")
    head = config.get("head")
    spec = HEAD_REGISTRY.get(head)
    if spec is not None and spec.onnx_refusal:  # refused by name, from a run's config alone
        return f"the {head} head does not export to ONNX: {spec.onnx_refusal}"
    calibrate = (config.get("protocol") or {}).get("calibrate")
    if calibrate:
        return (f"--calibrate {calibrate}: the recalibrated head (a CalibratedClassifierCV around a featcache head) "
                "has no ONNX converter; fit without --calibrate to export")
    return None


def normalised(model: onnx.ModelProto) -> onnx.ModelProto:
    """One IR version and one opset per domain for every piece, so that they can be joined."""
    model.ir_version = IR_VERSION
    versions = {"": OPSET, "ai.onnx.ml": ML_OPSET}
    for entry in model.opset_import:
        entry.version = versions.get(entry.domain, entry.version)
    return model


def chain(models: list[onnx.ModelProto], names: list[tuple[str, str]]) -> onnx.ModelProto:
    """Join single-input pieces in order: ``names[k]`` is (output of piece k, input of piece k + 1).
    Every piece's names get a prefix of its own, so no two collide."""
    from onnx.compose import add_prefix, merge_models

    joined = add_prefix(normalised(models[0]), "p0/")
    for k, (model, (out, into)) in enumerate(zip(models[1:], names, strict=True), start=1):
        piece = add_prefix(normalised(model), f"p{k}/")
        outputs = [o.name for o in piece.graph.output]
        joined = merge_models(joined, piece, io_map=[(f"p{k - 1}/{out}", f"p{k}/{into}")], outputs=outputs)
    return joined


def head_graph(pipeline, dim: int) -> onnx.ModelProto:  # noqa: ANN001 - a fitted scikit-learn Pipeline
    """``features`` (float32, n x ``dim``: the image features, then any metadata columns) ->
    ``probabilities`` (float32, n x classes, in the order of the pipeline's ``classes_``)."""
    from sklearn.pipeline import Pipeline

    from featcache.evaluation.heads import CalibratedHead, SVMHead, TorchMLPClassifier, XGBHead

    if not isinstance(pipeline, Pipeline):
        raise NotExportable(f"{type(pipeline).__name__}: only featcache's head pipelines export")
    steps = [(name, step) for name, step in pipeline.steps if step != "passthrough"]
    (_, head), prefix = steps[-1], steps[:-1]
    pieces: list[onnx.ModelProto] = []
    width = dim
    if prefix:
        for _, step in prefix:  # a StandardScaler, PCA, or with --meta the ColumnTransformer of features and metadata
            if type(step).__name__ == "StandardScaler":
                pieces.append(_scaler(step, width))
            else:
                pieces.append(_sklearn(step, width, "features"))
                width = step.transform(np.zeros((1, width), dtype=np.float32)).shape[1]
    if isinstance(head, CalibratedHead):
        raise NotExportable(f"--calibrate {head.method}: the recalibrated head (a CalibratedClassifierCV around a "
                            "featcache head) has no ONNX converter; fit without --calibrate to export")
    if isinstance(head, SVMHead):
        if head.kernel == "rbf-exact":
            raise NotExportable("svm-rbf-exact: skl2onnx's SVC converter differs from libsvm's calibrated "
                                "probabilities here; export svm-rbf (the Nystroem SVM) instead")
        if head.kernel_map_ is not None:
            pieces.append(_nystroem(head.kernel_map_, width))
            width = head.kernel_map_.normalization_.shape[0]
        pieces.append(_sklearn(head.model_, width, "classifier"))
    elif isinstance(head, XGBHead):
        pieces.append(_xgboost(head.model_, width))
    elif isinstance(head, TorchMLPClassifier):
        pieces.append(_mlp(head.model_, width))
    elif type(head).__name__ == "LogisticRegression":
        pieces.append(_sklearn(head, width, "classifier"))
    else:
        name = type(head).__name__
        head_of = {"KNeighborsClassifier": "knn", "CosineKNN": "knn", "DummyClassifier": "majority"}
        why = HEAD_REGISTRY[head_of[name]].onnx_refusal if name in head_of else "no converter"
        raise NotExportable(f"the {name} head does not export to ONNX: {why}")
    pieces[0] = _renamed_input(pieces[0], FEATURES)
    links = [(_output(piece), piece_next.graph.input[0].name)
             for piece, piece_next in zip(pieces[:-1], pieces[1:], strict=True)]
    model = chain(pieces, links) if len(pieces) > 1 else _prefixed(pieces[0])
    return _keep_probabilities(model)


def _prefixed(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx.compose import add_prefix

    return add_prefix(normalised(model), "p0/")


def _output(model: onnx.ModelProto) -> str:
    """The output of a piece that the next piece reads: a transform's only output, or a classifier's
    probabilities."""
    names = [o.name for o in model.graph.output]
    return next((n for n in names if "probabilit" in n), names[-1]) if len(names) > 1 else names[0]


def _renamed_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    old = model.graph.input[0].name
    if old == name:
        return model
    model.graph.input[0].name = name
    for node in model.graph.node:
        node.input[:] = [name if i == old else i for i in node.input]
    return model


def _keep_probabilities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inputs ``features``, one output ``probabilities``: the prefixes taken off the ends."""
    graph = model.graph
    (entry,) = graph.input
    target = _output(model)
    renamed = {entry.name: FEATURES, target: PROBABILITIES}
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    entry.name = FEATURES
    kept = [o for o in graph.output if o.name == target]
    del graph.output[:]
    kept[0].name = PROBABILITIES
    graph.output.extend(kept)
    return onnx.shape_inference.infer_shapes(model)


def _sklearn(estimator, dim: int, kind: str) -> onnx.ModelProto:  # noqa: ANN001
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(estimator): {"zipmap": False}} if kind == "classifier" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_sklearn(estimator, initial_types=[("X", FloatTensorType([None, dim]))],
                               target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET}, options=options)


def _scaler(scaler, dim: int) -> onnx.ModelProto:  # noqa: ANN001 - a fitted StandardScaler
    """``(x - mean) / scale`` in float32, as scikit-learn computes it on float32 features. skl2onnx multiplies
    by ``1 / scale`` instead, which moves values by one unit in the last place: enough to send a tree's
    branch the other way at a split value (XGBoost's probabilities were off by up to 0.15)."""
    mean = scaler.mean_ if scaler.with_mean else np.zeros(dim)
    scale = scaler.scale_ if scaler.with_std else np.ones(dim)
    nodes = [helper.make_node("Sub", ["X", "mean"], ["centred"]),
             helper.make_node("Div", ["centred", "scale"], ["scaled"])]
    graph = helper.make_graph(
        nodes, "standard_scaler", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, dim])],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [None, dim])],
        initializer=[numpy_helper.from_array(np.asarray(mean, dtype=np.float32), "mean"),
                     numpy_helper.from_array(np.asarray(scale, dtype=np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _xgboost(booster, dim: int) -> onnx.ModelProto:  # noqa: ANN001 - an XGBClassifier
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # onnxmltools converts XGBoost for opsets up to 15; its operators are the same in 17
        return convert_xgboost(booster, initial_types=[("X", FloatTensorType([None, dim]))], target_opset=15)


def _mlp(network, dim: int) -> onnx.ModelProto:  # noqa: ANN001 - the MLP's torch Sequential
    import torch

    wrapper = torch.nn.Sequential(network, torch.nn.Softmax(dim=1)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (torch.zeros(2, dim),), buffer, input_names=["X"], output_names=["probabilities"],
                          dynamic_axes={"X": {0: "n"}, "probabilities": {0: "n"}}, opset_version=OPSET, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _nystroem(kernel_map, dim: int) -> onnx.ModelProto:  # noqa: ANN001 - a fitted Nystroem (rbf)
    """``exp(-gamma |x - c|^2) @ normalization.T`` over the landmarks ``c``, in float64 as scikit-learn
    computes the distances."""
    if kernel_map.kernel != "rbf":
        raise NotExportable(f"Nystroem kernel {kernel_map.kernel!r}: only rbf is exported")
    centres = kernel_map.components_.astype(np.float64)
    constants = {
        "centres_t": centres.T, "centres_sq": (centres ** 2).sum(axis=1)[None, :],
        "minus_two": np.array(-2.0), "zero": np.array(0.0), "minus_gamma": np.array(-float(kernel_map.gamma)),
        "normalization_t": kernel_map.normalization_.T.astype(np.float64), "axes": np.array([1], dtype=np.int64)}
    nodes = [
        helper.make_node("Cast", ["X"], ["x64"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["x64", "x64"], ["x_sq_each"]),
        helper.make_node("ReduceSum", ["x_sq_each", "axes"], ["x_sq"], keepdims=1),
        helper.make_node("MatMul", ["x64", "centres_t"], ["cross"]),
        helper.make_node("Mul", ["cross", "minus_two"], ["cross2"]),
        helper.make_node("Add", ["x_sq", "cross2"], ["partial"]),
        helper.make_node("Add", ["partial", "centres_sq"], ["distance_raw"]),
        helper.make_node("Max", ["distance_raw", "zero"], ["distance"]),
        helper.make_node("Mul", ["distance", "minus_gamma"], ["exponent"]),
        helper.make_node("Exp", ["exponent"], ["kernel"]),
        helper.make_node("MatMul", ["kernel", "normalization_t"], ["embedded64"]),
        helper.make_node("Cast", ["embedded64"], ["embedded"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "nystroem", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, dim])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [None, centres.shape[0]])],
        initializer=[numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
