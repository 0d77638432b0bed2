"""Heatmaps: where in a photo the evidence for a class lies, and the similar training cases beside it.

Two methods, each named with every map it makes:

- ``cam`` (exact): a run of gap-pooled CNN features under a linear head (logistic regression, or the linear
  SVM, whose decision is the mean of its calibration folds' linear decisions). Its decision for a class is
  ``w . (mean_hw F - mu) / sigma + b``, linear in the final feature map ``F``; so the map
  ``sum_j w_j / sigma_j F_j(h, w) + (b - sum_j w_j mu_j / sigma_j)`` has that decision as its spatial mean, to the
  last rounding (tested): the class activation map of Zhou et al. (2016), through the run's own scaler. (The
  linear SVM's probability is a calibrated sigmoid of each fold's decision, so it rises with the mapped decision
  but is not a function of it alone.)
- ``occlusion`` (any backbone, pooling and head): a square of the blurred photo is slid over the backbone's
  input in a 7 x 7 grid of half-overlapping squares; a pixel's evidence is how much the class's probability
  falls when the squares over it are covered, averaged over them.

The map is computed on the backbone's own input (its crop, after the entry's filters) and placed back on the
photo: an array of the photo's own height x width, NaN where the backbone never looked (outside its centre crop).
A run with several views is explained on the original view. Faithfulness is measured in
``benchmarks/faithfulness.py`` (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featcache.errors import RunError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from featcache.backbones.models import LoadedBackbone
    from featcache.data.images import Preprocess
    from featcache.evaluation.predict import NewImages

GRID = 7  # occlusion squares per side (stride half a square)


@dataclass
class Explanation:
    """One image's prediction, the evidence map for one class, and its most similar training cases."""

    id: str
    path: Path
    predicted: str
    probabilities: dict[str, float]
    cls: str  # the class the map is for: the predicted one unless another was asked for
    heatmap: np.ndarray  # the photo's height x width; higher = more evidence for ``cls``; NaN outside the crop
    method: str  # cam or occlusion
    neighbours: pd.DataFrame = field(repr=False, default=None)  # id, rank, neighbour, label, group, similarity…


def method_for(saved: dict) -> str:
    """``cam`` where the run's map can be exact (gap features, logistic regression, scaler only), else
    ``occlusion``."""
    pipeline = saved["pipeline"]
    if hasattr(pipeline, "estimator_"):
        pipeline = pipeline.estimator_
    steps = [step for _, step in pipeline.steps[:-1] if step != "passthrough"]
    linear = linear_decision(pipeline.steps[-1][1]) is not None
    only_scaler = all(type(step).__name__ == "StandardScaler" for step in steps)
    return "cam" if saved["pool"] == "gap" and linear and only_scaler else "occlusion"


def _head_pipeline(saved: dict):  # noqa: ANN202 - the sklearn pipeline of one view
    pipeline = saved["pipeline"]
    return pipeline.estimator_ if hasattr(pipeline, "estimator_") else pipeline


def linear_decision(head) -> tuple[np.ndarray, np.ndarray] | None:  # noqa: ANN001 - any fitted head
    """``(coef, intercept)`` of a head whose decision is linear in its input: logistic regression's own, and the
    linear SVM's averaged over its calibration folds' models (its decision is their mean); None for any other."""
    if type(head).__name__ == "LogisticRegression":
        return head.coef_, head.intercept_
    if type(head).__name__ == "SVMHead" and head.kernel == "linear":
        members = [member.estimator for member in head.model_.calibrated_classifiers_]
        return (np.mean([m.coef_ for m in members], axis=0), np.mean([m.intercept_ for m in members], axis=0))
    return None


def class_weights(saved: dict, cls: str) -> tuple[np.ndarray, float]:
    """The run's decision for ``cls`` as ``(v, c)`` with decision = ``v . gap + c``: the head's weights through
    the scaler (a two-class head's one decision, negated for the first class)."""
    pipeline = _head_pipeline(saved)
    head = pipeline.steps[-1][1]
    classes = [str(c) for c in head.classes_]
    k = classes.index(cls)
    coef, intercept = linear_decision(head)
    if coef.shape[0] == 1:
        sign = 1.0 if k == 1 else -1.0
        w, b = sign * coef[0].astype(np.float64), sign * float(intercept[0])
    else:
        w, b = coef[k].astype(np.float64), float(intercept[k])
    scaler = next((step for _, step in pipeline.steps[:-1] if step != "passthrough"), None)
    if scaler is None:
        return w.astype(np.float64), b
    return w / scaler.scale_, b - float(np.sum(w * scaler.mean_ / scaler.scale_))


def cam(model: LoadedBackbone, x: torch.Tensor, saved: dict, cls: str) -> tuple[np.ndarray, float]:
    """The class activation map of ``cls`` on the normalised input ``x`` (1, 3, s, s), at the feature map's
    resolution, and the decision value it averages to."""
    import torch

    v, c = class_weights(saved, cls)
    with torch.inference_mode():
        fmap = model.model.feature_map(x)[0].double().numpy()  # (channels, h, w)
    heat = np.tensordot(v, fmap, axes=(0, 0)) + c
    return heat, float(v @ fmap.mean(axis=(1, 2)) + c)


def class_probability(model: LoadedBackbone, saved: dict, batch: torch.Tensor, cls: str) -> np.ndarray:
    """The run's probability of ``cls`` for each normalised input of ``batch`` (its original view)."""
    import torch

    with torch.inference_mode():
        features = model.model(batch)[saved["pool"]].double().numpy()
    pipeline = saved["pipeline"]
    X = features[:, None, :] if hasattr(pipeline, "estimator_") else features
    classes = [str(c) for c in pipeline.classes_]
    return pipeline.predict_proba(X)[:, classes.index(cls)]


def blurred(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its detail removed (a Gaussian of a twentieth of its side): what covers a region. A grey square
    would add edges the photo never had, and the network reacts to those wherever they are."""
    from torchvision.transforms.functional import gaussian_blur

    sigma = max(x.shape[-1] / 20, 1.0)
    return gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)


def occlusion(model: LoadedBackbone, x: torch.Tensor, saved: dict, cls: str) -> np.ndarray:
    """Per pixel of the input: the mean fall of ``cls``'s probability over the occluding squares covering it
    (each square replaced by the blurred photo)."""
    import torch

    size = x.shape[-1]
    cover = blurred(x)
    square = int(np.ceil(2 * size / (GRID + 1)))
    starts = np.linspace(0, size - square, GRID).round().astype(int)
    batch, boxes = [], []
    for top in starts:
        for left in starts:
            covered = x.clone()
            covered[:, :, top:top + square, left:left + square] = cover[:, :, top:top + square, left:left + square]
            batch.append(covered)
            boxes.append((top, left))
    base = class_probability(model, saved, x, cls)[0]
    drops = base - np.concatenate([class_probability(model, saved, torch.cat(batch[k:k + 16]), cls)
                                   for k in range(0, len(batch), 16)])
    total, count = np.zeros((size, size)), np.zeros((size, size))
    for (top, left), drop in zip(boxes, drops, strict=True):
        total[top:top + square, left:left + square] += drop
        count[top:top + square, left:left + square] += 1
    return total / np.maximum(count, 1)


def to_photo(heat: np.ndarray, preprocess: Preprocess, width: int, height: int) -> np.ndarray:
    """A map on the backbone's input (any resolution, covering its crop) placed on the photo: height x width,
    NaN where the crop does not reach."""
    from PIL import Image

    from featcache.data.images import crop_corner

    crop = preprocess.crop_size
    on_crop = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((crop, crop), Image.BILINEAR))
    if preprocess.resize_mode == "full":
        return np.asarray(Image.fromarray(on_crop, mode="F").resize((width, height), Image.BILINEAR), dtype=np.float64)
    if preprocess.resize_mode == "pad":  # the photo sits in the middle of a square, padded
        side = max(width, height)
        square = np.asarray(Image.fromarray(on_crop, mode="F").resize((side, side), Image.BILINEAR))
        top, left = (side - height) // 2, (side - width) // 2
        return square[top:top + height, left:left + width].astype(np.float64)
    short = min(width, height)
    scale = preprocess.resize_size / short
    new_w, new_h = (preprocess.resize_size, int(preprocess.resize_size * height / width)) if width <= height else \
        (int(preprocess.resize_size * width / height), preprocess.resize_size)
    canvas = np.full((new_h, new_w), np.nan)
    top, left = crop_corner(new_h, crop, preprocess.crop_corner), crop_corner(new_w, crop, preprocess.crop_corner)
    rows, cols = slice(max(top, 0), top + crop), slice(max(left, 0), left + crop)
    canvas[rows, cols] = on_crop[max(-top, 0):max(-top, 0) + canvas[rows, cols].shape[0],
                                 max(-left, 0):max(-left, 0) + canvas[rows, cols].shape[1]]
    ys = np.clip((np.arange(height) + 0.5) * scale - 0.5, 0, new_h - 1).round().astype(int)
    xs = np.clip((np.arange(width) + 0.5) * scale - 0.5, 0, new_w - 1).round().astype(int)
    return canvas[np.ix_(ys, xs)]


def explain_image(model: LoadedBackbone, saved: dict, path: Path, cls: str, method: str) -> np.ndarray:
    """The evidence map of ``cls`` for the photo at ``path``, at its own height x width."""
    from PIL import Image

    content = Path(path).read_bytes()
    with Image.open(path) as photo:
        width, height = photo.size
    try:
        x = model.preprocess.normalize(model.preprocess.load(content)[None])
    except ValueError as exc:
        raise RunError(f"{path}: cannot be read as an image ({exc})") from None
    heat = cam(model, x, saved, cls)[0] if method == "cam" else occlusion(model, x, saved, cls)
    return to_photo(heat, model.preprocess, width, height)


def heat_rgb(heatmap: np.ndarray) -> np.ndarray:
    """The map in colour (matplotlib's inferno, from its 2nd to its 98th percentile): height x width x 3, 0-255."""
    from matplotlib import colormaps

    shown = heatmap[~np.isnan(heatmap)]
    low, high = (np.percentile(shown, [2, 98]) if shown.size else (0.0, 1.0))
    scaled = np.clip((np.nan_to_num(heatmap, nan=low) - low) / max(high - low, 1e-12), 0, 1)
    return colormaps["inferno"](scaled)[..., :3] * 255.0


def overlay_png(path: Path, heatmap: np.ndarray, out: Path) -> Path:
    """The photo and, beside it, the photo under the map (bright: most evidence; darkened where the backbone
    never looked), as one PNG."""
    from PIL import Image

    with Image.open(path) as photo:
        rgb = np.asarray(photo.convert("RGB"), dtype=np.float64)
    mixed = np.where(np.isnan(heatmap)[..., None], rgb * 0.35, 0.4 * rgb + 0.6 * heat_rgb(heatmap))
    side = np.concatenate([rgb, np.full((rgb.shape[0], 8, 3), 255.0), mixed], axis=1).clip(0, 255).astype(np.uint8)
    Image.fromarray(side).save(out)
    return out


def explain_run(run_dir: Path, images: NewImages, k: int = 5, cls: str | None = None,
                reporter=None) -> list[Explanation]:  # noqa: ANN001
    """:class:`Explanation` of each of ``images`` (files or folders of photos), in order."""
    from featcache.evaluation.predict import PredictSettings, images_source, predict_frame
    from featcache.extraction.extract import backbone_of
    from featcache.store.fusion import FusedEntry, trained_entry
    from featcache.store.model_files import load_model

    saved = load_model(run_dir)
    classes = [str(c) for c in saved["pipeline"].classes_]
    if cls is not None and cls not in classes:
        raise RunError(f"--class {cls}: the run has no such class; its classes are {', '.join(classes)}")
    entry = trained_entry(run_dir, saved)
    if isinstance(entry, FusedEntry):
        raise RunError(f"{run_dir} was fit on fused features of several backbones: explain takes a run of one "
                       "backbone (its map would need every backbone's); explain a run of each")
    if saved["config"].get("meta_spec"):
        raise RunError(f"{run_dir} was fit with --meta: its head needs each image's metadata, which a photo alone does "
                       "not have; explain a run fit without --meta")
    paths = {r.id: Path(r.path) for r in images_source(list(images.inputs)).records}
    frame = predict_frame(run_dir, images, PredictSettings(neighbours=k), reporter)
    model = backbone_of(entry, images.weights)
    method = method_for(saved)
    cases = frame.attrs["neighbours"]
    out = []
    for image_id, row in frame.iterrows():
        if row["failed"]:
            raise RunError(f"{image_id}: {row['failed']}")
        target = cls or row["predicted"]
        out.append(Explanation(
            id=image_id, path=paths[image_id], predicted=row["predicted"],
            probabilities={c: float(row[f"p_{c}"]) for c in classes}, cls=target,
            heatmap=explain_image(model, saved, paths[image_id], target, method), method=method,
            neighbours=_own(cases, image_id)))
    return out


def _own(cases: pd.DataFrame, image_id: str) -> pd.DataFrame:
    """An image's similar cases, each named by its own id: ``id`` (the training image), ``label``, ``group``,
    ``similarity``, ``rank``, ``agrees``; best first."""
    mine = cases[cases["id"] == image_id] if len(cases) else cases
    return mine.drop(columns=["id"]).rename(columns={"neighbour": "id"})[
        ["id", "label", "group", "similarity", "rank", "agrees"]].reset_index(drop=True)


def write_explanations(found: list[Explanation], out: Path) -> Path:
    """``out/<image>-heatmap.png`` for each explanation, ``explanations.csv`` (id, predicted, class mapped,
    method, each class's probability, the PNG) and ``neighbours.csv`` (every image's similar cases)."""
    import csv

    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    classes = list(found[0].probabilities) if found else []
    taken: set[str] = set()
    rows = []
    for e in found:
        stem = e.path.stem
        while stem in taken:  # two photos of one name in different folders
            stem += "_"
        taken.add(stem)
        png = overlay_png(e.path, e.heatmap, out / f"{stem}-heatmap.png")
        rows.append([e.id, e.predicted, e.cls, e.method, *(repr(e.probabilities[c]) for c in classes), png.name])
    table = out / "explanations.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "predicted", "class_mapped", "method", *[f"p_{c}" for c in classes], "heatmap_png"])
        writer.writerows(rows)
    frames = [e.neighbours.assign(image=e.id) for e in found if e.neighbours is not None and len(e.neighbours)]
    if frames:
        pd.concat(frames)[["image", "rank", "id", "label", "group", "similarity", "agrees"]].rename(
            columns={"id": "neighbour"}).to_csv(out / "neighbours.csv", index=False)
    return table
