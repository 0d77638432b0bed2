"""--precision int8 against fp32, all in one run: the bare forward, the features, the heads.

1. Bare forward (OpenVINO, 2 cores, pre-made uint8 batches of 1, 8 and 32, the best of them), fp32 and
   int8 interleaved over ``--repeats``: EfficientNet-Lite0 (its ImageNet weights) and ResNet-50 (random
   weights: no ResNet-50 weights exist on this machine; the speed does not depend on the values).
2. Features: the cosine of each HAM10000 image's int8 features to its fp32 ones (Lite0, gap), and for
   ResNet-50 on 300 HAM10000 images not used for its calibration (random weights: a check that the
   quantizer keeps what the network computes, not a statement about trained ResNet-50 features).
3. Heads: lesion-grouped 5-fold balanced accuracy on HAM10000 of logreg, svm-rbf and mlp on the fp32 and the
   int8 entry (same folds: same images, groups and seed).

Writes the block `int8` of docs/benchmarks.md.

Run: python benchmarks/int8.py [--cache cache] [--repeats 3]
Needs ../shared/data/ham10000_200x150 (extracts the fp32 and int8 Lite0 entries when missing: ~3 min).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from docs_blocks import replace_block
from efficiency import bare_forward_ips

import featcache
from featcache.backbones.models import load_backbone
from featcache.data.sources import open_source
from featcache.extraction.engines import make_forward
from featcache.extraction.extract import name_entry
from featcache.extraction.loader import _ImageDataset
from featcache.extraction.quantize import calibration_records, ensure_int8
from featcache.progress import Reporter
from featcache.recipes import ExecutionPlan, FeatureRecipe

REPO = Path(__file__).resolve().parents[1]
HAM = REPO.parent / "shared" / "data" / "ham10000_200x150"
HEADS = ("logreg", "svm-rbf", "mlp")
BATCHES = (1, 8, 32)  # each precision at its best batch (int8 Lite0 ran fastest at 1, fp32 at 1 or 8)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def quantized(name: str, cache: Path, reporter: Reporter):
    """The backbone, its int8 model calibrated on HAM10000 (as `extract --precision int8` makes it)."""
    model = load_backbone(name, weights=None if name == "efficientnet_lite0" else "random")
    source = open_source(HAM / "labels.csv")
    named = name_entry(source, model, cache, recipe=FeatureRecipe(precision="int8", engine="openvino"),
                       plan=ExecutionPlan(device="cpu"))
    return model, ensure_int8(model, cache, named.inputs["calibration"], source, reporter), source


def forward_rows(cache: Path, repeats: int, reporter: Reporter) -> list[dict]:
    rows = []
    for name in ("efficientnet_lite0", "resnet50"):
        model, xml, source = quantized(name, cache, reporter)
        for repeat in range(repeats):  # interleaved: each ratio within one repeat
            n = 1024 if name == "efficientnet_lite0" else 256
            fp32 = max(bare_forward_ips(model, b, n, "openvino", cache) for b in BATCHES)
            int8 = max(bare_forward_ips(model, b, n, "openvino", cache, export=xml) for b in BATCHES)
            rows.append({"backbone": name, "repeat": repeat + 1, "fp32": fp32, "int8": int8})
            print(rows[-1], flush=True)
    return rows


def resnet_cosine(cache: Path, reporter: Reporter) -> np.ndarray:
    model, xml, source = quantized("resnet50", cache, reporter)
    used = {r.id for r in calibration_records(source)}
    records = [r for r in source.records if r.id not in used][:300]
    dataset = _ImageDataset(records, model.preprocess)
    images = torch.stack([dataset[i]["image"] for i in range(len(records))])
    fp32, int8 = (make_forward("openvino", model, cache, export=e) for e in (None, xml))
    a = np.concatenate([fp32(images[i:i + 50])["gap"].numpy() for i in range(0, len(images), 50)])
    b = np.concatenate([int8(images[i:i + 50])["gap"].numpy() for i in range(0, len(images), 50)])
    return _cosine(a, b)


def heads(cache: Path) -> tuple[dict, np.ndarray, float]:
    common = dict(data=str(HAM / "labels.csv"), group_col="lesion_id", cache=str(cache), quiet=True)
    started = time.perf_counter()
    entries = {p: featcache.extract(**common, precision=p, engine="openvino") for p in ("fp32", "int8")}
    seconds = time.perf_counter() - started
    ids = entries["fp32"].ids
    cosine = _cosine(entries["fp32"].read("gap", ids).astype(np.float32),
                     entries["int8"].read("gap", ids).astype(np.float32))
    scores = {}
    for precision in ("fp32", "int8"):
        for run in featcache.fit(**common, heads=",".join(HEADS), precision=precision, engine="openvino",
                                 backbone="efficientnet_lite0"):
            scores[(precision, run.config["head"])] = run.metrics["pooled"]["balanced_accuracy"]
    return scores, cosine, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    reporter = Reporter(quiet=True)
    scores, cosine, _ = heads(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        rows = forward_rows(Path(tmp), args.repeats, reporter)
        resnet = resnet_cosine(Path(tmp), reporter)
    lines = ["## int8: the quantized backbone against fp32", "",
             f"`python benchmarks/int8.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f": OpenVINO on {torch.get_num_threads()} CPU cores, NNCF post-training quantization calibrated on "
             "300 HAM10000 images (`--precision int8`), all in this run.", "",
             "| backbone | repeat | bare forward fp32 (img/s) | int8 (img/s) | int8 / fp32 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['repeat']} | {r['fp32']:.1f} | {r['int8']:.1f} | "
                     f"{r['int8'] / r['fp32']:.2f} |")
    ratio = {name: statistics.median(r["int8"] / r["fp32"] for r in rows if r["backbone"] == name)
             for name in ("efficientnet_lite0", "resnet50")}
    lines += ["", "| features (gap) | images | mean cosine int8 to fp32 | 1st percentile | min |",
              "|---|---|---|---|---|",
              f"| efficientnet_lite0, HAM10000 | {len(cosine)} | {cosine.mean():.4f} | "
              f"{np.percentile(cosine, 1):.4f} | {cosine.min():.4f} |",
              f"| resnet50 (random weights), HAM10000 not calibrated on | {len(resnet)} | {resnet.mean():.4f} | "
              f"{np.percentile(resnet, 1):.4f} | {resnet.min():.4f} |", "",
              "| head (Lite0 gap, lesion-grouped 5-fold) | balanced accuracy fp32 | int8 | int8 - fp32 |",
              "|---|---|---|---|"]
    for head in HEADS:
        fp32, int8 = scores[("fp32", head)], scores[("int8", head)]
        lines.append(f"| {head} | {fp32:.3f} | {int8:.3f} | {int8 - fp32:+.3f} |")
    worst = max(abs(scores[("int8", h)] - scores[("fp32", h)]) for h in HEADS)
    met = {"forward": all(v >= 1.8 for v in ratio.values()), "cosine": cosine.mean() >= 0.99, "heads": worst <= 0.005}
    lines += ["", f"Median int8 / fp32 bare forward: Lite0 **{ratio['efficientnet_lite0']:.2f}x**, ResNet-50 "
              f"**{ratio['resnet50']:.2f}x** (target >= 1.8: {'met' if met['forward'] else 'NOT met'}); mean cosine "
              f"{cosine.mean():.4f} (target >= 0.99: {'met' if met['cosine'] else 'NOT met'}); largest change of "
              f"balanced accuracy {worst:.3f} (target <= 0.005: {'met' if met['heads'] else 'NOT met'})."]
    replace_block(args.out, "int8", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
