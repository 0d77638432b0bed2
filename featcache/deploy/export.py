"""``featcache export``: a run as one ONNX graph from images to class probabilities.

The graph takes ``image``: uint8, ``n x size x size x 3`` (height, width, RGB), the backbone's resized and
cropped input as featcache's preprocessing makes it (metadata key ``featcache.preprocess``). Inside it:
the views the run averaged (flips and quarter turns), the backbone with its normalisation (the very
export that ``--engine`` runs), the pooling the head read, the rounding to the stored feature dtype, the
scaler, PCA and head (:mod:`featcache.deploy.head_graph`) and the mean over views. Out comes
``probabilities``: float32, ``n x classes``, in the order of ``featcache.classes``.

A fused run has one backbone per part; backbones that prepare the image the same way share an input,
others get their own (``image_1``…). A run with metadata columns takes them as a second input, ``metadata``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from featcache.data.images import Preprocess
from featcache.deploy.head_graph import FEATURES, OPSET, PROBABILITIES, NotExportable, chain, head_graph, normalised
from featcache.errors import RunError
from featcache.progress import Reporter
from featcache.store.entries import CacheEntry
from featcache.store.fusion import FusedEntry, trained_entry
from featcache.store.naming import cache_root_of_run, card_beside
from featcache.store.runs import read_metrics
from featcache.version import __version__

IMAGE = "image"
METADATA = "metadata"  # the second input of a run with --meta
METADATA_KEY = "featcache"  # the JSON of everything a user of the graph needs (see export_run)
_INT64_MIN = np.iinfo(np.int64).min


def export_run(run_dir: Path, out: Path, *, weights: str | None = None, trust_pickle: bool = False,
               reporter: Reporter | None = None) -> Path:
    """Write ``out``: the run in ``run_dir`` as one ONNX graph (see the module's docstring)."""
    from featcache.store.model_files import load_model

    reporter = reporter or Reporter(quiet=True)
    run_dir = Path(run_dir).resolve()
    saved = load_model(run_dir, trust_pickle)
    metrics = read_metrics(run_dir)
    trained = trained_entry(run_dir, saved)
    parts = list(trained.parts) if isinstance(trained, FusedEntry) else [(trained, saved["pool"])]
    quantized = [e.manifest["backbone"] for e, _ in parts if e.manifest["fingerprint_inputs"]["precision"] == "int8"]
    if quantized:  # the graph would compute fp32 features, not the quantized ones the head was trained on
        raise RunError(f"{run_dir.name} was trained on int8 features of {', '.join(quantized)} (the backbone quantized "
                       "for OpenVINO), and the ONNX hand-over holds the fp32 backbone, whose features differ: fit the "
                       "head on an fp32 entry (--precision fp32) for the hand-over, or use `featcache predict --run`")
    cache_root = cache_root_of_run(run_dir)
    pipeline = saved["pipeline"]
    views, test_views = parts[0][0].views, "all"
    if hasattr(pipeline, "estimator_"):  # a ViewEnsemble: the head runs on each view, its outputs averaged
        test_views, pipeline = pipeline.test_views, pipeline.estimator_
    used_views = _view_names(views if test_views == "all" else 1)
    # one image input per distinct way of preparing the image (the normalisation is inside each backbone)
    prepared: list[Preprocess] = []
    input_of = []
    for entry, _ in parts:
        preprocess = Preprocess.from_fields(entry.manifest["fingerprint_inputs"]["preprocess"])
        key = [_geometry(p) for p in prepared]
        if _geometry(preprocess) not in key:
            prepared.append(preprocess)
        input_of.append([_geometry(p) for p in prepared].index(_geometry(preprocess)))
    meta_spec = saved["config"].get("meta_spec") or []
    head_name = type(pipeline.steps[-1][1]).__name__
    reporter.info(f"exporting {' + '.join(e.manifest['backbone'] for e, _ in parts)} with its {head_name} head")
    engines = {entry.manifest["fingerprint_inputs"].get("engine", "torch") for entry, _ in parts} - {"onnxruntime"}
    if head_name == "XGBHead" and (engines or "pca" in pipeline.named_steps or meta_spec):
        why = (f"the features this run was trained on came from {', '.join(sorted(engines))} and the graph computes "
               "them with ONNX Runtime, about 1e-6 apart" if engines else
               "the graph scales or projects the features with other float32 rounding than NumPy, about 1e-7 apart")
        reporter.warn(f"{why}: an XGBoost tree can go the other way at a split value, so some probabilities may "
                      "differ from `predict --run` (up to ~0.01 on ham70). For identical numbers extract with "
                      "--engine onnxruntime and fit without --pca and --meta")
    aligned = (saved["config"].get("protocol") or {}).get("test_align")
    if aligned and aligned != "none":
        reporter.warn(f"this run scored its test set with --test-align {aligned}; the graph holds the model as "
                      "trained, without the alignment (it needs a batch's own statistics): for aligned predictions "
                      f"use `featcache predict --run RUN --test-align {aligned}` on a batch")
    dims = [entry.manifest["dims"][pool] for entry, pool in parts]
    head = head_graph(pipeline, sum(dims) + len(meta_spec))
    backbones = [_backbone_features(entry, pool, cache_root, weights, k) for k, (entry, pool) in enumerate(parts)]
    graph = _assemble(backbones, input_of, [p.crop_size for p in prepared], head, used_views,
                      parts[0][0].manifest["fingerprint_inputs"]["dtype"], len(saved["classes"]), len(meta_spec))
    graph.metadata_props.extend(_metadata(saved, metrics, prepared, parts, used_views, run_dir, meta_spec))
    onnx.checker.check_model(graph, full_check=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        onnx.save(graph, str(tmp))
        os.replace(tmp, out)
        card_beside(out).write_text(card_of(run_dir, metrics))  # the same card as in the file's metadata
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {out} ({exc.strerror or exc}); pass --out with a writable path") from None
    return out


def input_names(count: int) -> list[str]:
    """The graph's image inputs: ``image``, then ``image_1``… for fused backbones that prepare images otherwise."""
    return [IMAGE] + [f"{IMAGE}_{k}" for k in range(1, count)]


def _geometry(preprocess: Preprocess) -> str:
    """What shapes the uint8 input (size, resize, crop, filters, decoding), not the normalisation."""
    fields = {k: v for k, v in preprocess.to_dict().items() if k not in ("mean", "std")}
    return json.dumps(fields, sort_keys=True, default=list)


def _backbone_features(entry: CacheEntry, pool: str, cache_root: Path, weights: str | None,
                       k: int) -> onnx.ModelProto:
    """The backbone of ``entry`` as ONNX, from uint8 NCHW ``x`` to the pooling ``pool`` only: the export
    the extraction engines run (checksum checked), rebuilt if missing."""
    from featcache.extraction.engines import onnx_path
    from featcache.extraction.extract import backbone_of

    manifest = entry.manifest
    if manifest["backbone"] == "scattering" or manifest["backbone"].startswith("scattering"):
        raise NotExportable(f"{manifest['backbone']}: its FFTs do not export to ONNX")
    model = backbone_of(entry, weights)
    full = onnx.load(str(onnx_path(model, cache_root)))
    from onnx.utils import Extractor

    only = Extractor(full).extract_model(["x"], [pool])
    only.graph.name = f"backbone{k}"
    return only


def _view_names(count: int) -> tuple[str, ...]:
    from featcache.data.images import views_for

    return views_for(count)


def _view_nodes(source: str, view: str, out: str) -> list[onnx.NodeProto]:
    """``view`` (featcache.data.images.VIEWS) of an N x C x H x W tensor, by slices and transposes, as
    :func:`featcache.data.images.apply_view` moves the pixels."""
    def flip(x: str, axes: list[int], name: str) -> list[onnx.NodeProto]:
        n = len(axes)
        consts = {"starts": [-1] * n, "ends": [_INT64_MIN] * n, "axes": axes, "steps": [-1] * n}
        made = [helper.make_node("Constant", [], [f"{name}/{key}"], value=numpy_helper.from_array(
            np.array(value, dtype=np.int64))) for key, value in consts.items()]
        return [*made, helper.make_node("Slice", [x, *(f"{name}/{key}" for key in consts)], [name])]

    def swap(x: str, name: str) -> list[onnx.NodeProto]:
        return [helper.make_node("Transpose", [x], [name], perm=[0, 1, 3, 2])]

    if view == "identity":
        return [helper.make_node("Identity", [source], [out])]
    if view == "hflip":
        return flip(source, [3], out)
    if view == "vflip":
        return flip(source, [2], out)
    if view == "rot180":
        return flip(source, [2, 3], out)
    if view == "rot90":  # torch.rot90(x, 1, (H, W)) = the width flipped, then H and W swapped
        return flip(source, [3], f"{out}/flipped") + swap(f"{out}/flipped", out)
    if view == "rot270":  # torch.rot90(x, -1, (H, W)) = H and W swapped, then the width flipped
        return swap(source, f"{out}/swapped") + flip(f"{out}/swapped", [3], out)
    if view == "transpose":
        return swap(source, out)
    if view == "antitranspose":
        return swap(source, f"{out}/swapped") + flip(f"{out}/swapped", [2, 3], out)
    raise NotExportable(f"view {view!r} has no ONNX form")


def _assemble(backbones: list[onnx.ModelProto], input_of: list[int], sizes: list[int], head: onnx.ModelProto,
              views: tuple[str, ...], dtype: str, n_classes: int, meta_columns: int) -> onnx.ModelProto:
    """image(s) (uint8 NHWC) -> views stacked on the batch axis -> each backbone's pooling, rounded to the
    stored dtype, side by side (then the metadata columns, repeated per view) -> head -> mean over views."""
    names = input_names(len(sizes))
    nodes, inputs = [], []
    for k, (name, size) in enumerate(zip(names, sizes, strict=True)):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.UINT8, ["n", size, size, 3]))
        nodes.append(helper.make_node("Transpose", [name], [f"nchw{k}"], perm=[0, 3, 1, 2]))
        for v, view in enumerate(views):
            nodes += _view_nodes(f"nchw{k}", view, f"in{k}/view{v}")
        nodes.append(helper.make_node("Concat", [f"in{k}/view{v}" for v in range(len(views))], [f"x{k}"], axis=0))
    front_outputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.UINT8, [None, 3, size, size])
                     for k, size in enumerate(sizes)]
    if meta_columns:  # the metadata of each image, once per view (rows are view-major)
        inputs.append(helper.make_tensor_value_info(METADATA, TensorProto.FLOAT, ["n", meta_columns]))
        repeats = numpy_helper.from_array(np.array([len(views), 1], dtype=np.int64))
        nodes += [helper.make_node("Constant", [], ["meta/repeats"], value=repeats),
                  helper.make_node("Tile", [METADATA, "meta/repeats"], ["meta_rows"])]
        front_outputs.append(helper.make_tensor_value_info("meta_rows", TensorProto.FLOAT, [None, meta_columns]))
    merged = helper.make_model(helper.make_graph(nodes, "views", inputs, front_outputs),
                               opset_imports=[helper.make_opsetid("", OPSET)])
    stored = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}.get(dtype)
    if stored is None:
        raise NotExportable(f"features stored as {dtype}: only float16 and float32 export")
    from onnx.compose import add_prefix, merge_graphs

    carried = [o.name for o in front_outputs]
    pools = []
    for b, (backbone, k) in enumerate(zip(backbones, input_of, strict=True)):
        piece = add_prefix(normalised(backbone), f"b{b}/")
        (pool_out,) = [o.name for o in piece.graph.output]
        graph = merge_graphs(merged.graph, piece.graph, io_map=[(f"x{k}", f"b{b}/x")],
                             outputs=[*carried, *pools, pool_out])
        merged = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        pools.append(pool_out)
    # each pooling rounded as the cache stores it and read back as float32, side by side, then the metadata
    tail = [helper.make_node("Cast", [o], [f"{o}/stored"], to=stored) for o in pools]
    tail += [helper.make_node("Cast", [f"{o}/stored"], [f"{o}/read"], to=TensorProto.FLOAT) for o in pools]
    columns = [f"{o}/read" for o in pools] + (["meta_rows"] if meta_columns else [])
    tail.append(helper.make_node("Concat", columns, [FEATURES], axis=1) if len(columns) > 1
                else helper.make_node("Identity", columns, [FEATURES]))
    graph = merged.graph
    graph.node.extend(tail)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, None))
    body = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    # the head on every view's row, then the mean over views
    shape = numpy_helper.from_array(np.array([len(views), -1, n_classes], dtype=np.int64), "mean/shape")
    mean_nodes = [helper.make_node("Reshape", ["per_view", "mean/shape"], ["by_view"]),
                  helper.make_node("ReduceMean", ["by_view"], [PROBABILITIES], axes=[0], keepdims=0)]
    mean = helper.make_graph(mean_nodes, "view_mean",
                             [helper.make_tensor_value_info("per_view", TensorProto.FLOAT, [None, n_classes])],
                             [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["n", n_classes])],
                             initializer=[shape])
    mean_model = helper.make_model(mean, opset_imports=[helper.make_opsetid("", OPSET)])
    whole = chain([body, head, mean_model], [(FEATURES, FEATURES), (PROBABILITIES, "per_view")])
    return _ends_named(whole, names + ([METADATA] if meta_columns else []))


def _ends_named(model: onnx.ModelProto, inputs: list[str]) -> onnx.ModelProto:
    """The graph's inputs and output under their plain names (``image``…, ``metadata``, ``probabilities``):
    the pieces' prefixes taken off."""
    graph = model.graph
    renamed = {graph.output[0].name: PROBABILITIES}
    for value in graph.input:
        renamed[value.name] = next(name for name in inputs if value.name.endswith("/" + name) or value.name == name)
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    for value in [*graph.input, *graph.output]:
        value.name = renamed[value.name]
    return model


def _metadata(saved: dict, metrics: dict, prepared: list[Preprocess], parts: list, views: tuple[str, ...],
              run_dir: Path, meta_spec: list[dict]) -> list[onnx.StringStringEntryProto]:
    pooled = metrics.get("pooled", {})
    headline = {name: {"value": pooled[name], "ci95": pooled.get("ci95", {}).get(name)}
                for name in ("balanced_accuracy", "macro_f1", "auroc") if name in pooled}

    def described(preprocess: Preprocess) -> dict:
        return preprocess.to_dict() | {"resize_mode": preprocess.resize_mode, "resampler": preprocess.resampler,
                                       "filters": list(preprocess.filters)}

    inputs = [{"name": name, "size": p.crop_size, "preprocess": described(p)}
              for name, p in zip(input_names(len(prepared)), prepared, strict=True)]
    info = {
        "format": 1, "featcache_version": __version__, "inputs": inputs, "output": PROBABILITIES,
        "input_layout": "NHWC uint8 RGB", "input_size": prepared[0].crop_size, "preprocess": inputs[0]["preprocess"],
        "classes": [str(c) for c in saved["pipeline"].classes_],
        "normalisation": {"mean": list(prepared[0].mean), "std": list(prepared[0].std), "inside_graph": True},
        "backbones": [entry.manifest["backbone"] for entry, _ in parts], "pools": [pool for _, pool in parts],
        "views": list(views), "feature_fingerprint": saved["feature_fingerprint"], "head": saved["config"]["head"],
        "protocol": metrics.get("protocol"), "metrics": headline, "run": run_dir.name,
        "conformal": metrics.get("conformal"),
        # --meta: the second input's columns, numeric ones as numbers and categorical ones as their index in
        # `categories`; NaN where missing
        "metadata": meta_spec or None,
    }
    if "test" in metrics:
        info["test_metrics"] = {k: metrics["test"].get(k) for k in ("balanced_accuracy", "macro_f1", "auroc")
                                if k in metrics["test"]}
    plain = {"featcache.classes": ",".join(info["classes"]), "featcache.input_size": str(prepared[0].crop_size),
             "featcache.feature_fingerprint": saved["feature_fingerprint"]}
    plain["featcache.model_card"] = card_of(run_dir, metrics)
    entries = [onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(info, default=str))]
    entries += [onnx.StringStringEntryProto(key=k, value=v) for k, v in plain.items()]
    return entries


def card_of(run_dir: Path, metrics: dict) -> str:
    """The run's MODEL_CARD.md (made from its metrics.json for a run from before featcache wrote cards)."""
    from featcache.evaluation.model_card import model_card
    from featcache.store.runs import read_model_card

    return read_model_card(run_dir) or model_card(metrics)
