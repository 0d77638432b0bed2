"""``--precision int8``: the backbone's ONNX export quantized after training (static, int8 weights and
activations) by OpenVINO's NNCF, calibrated on a few hundred of the dataset's own images.

The calibration images are a fixed, evenly spread subset of the dataset (sorted by id), named by their
SHA-256s; that name, the quantizer's settings and NNCF's version join the entry's fingerprint, so int8
features never mix with fp32 ones nor with another calibration's. The quantized model is cached in
``<cache>/.engines/`` beside the fp32 export, named by the hash of all that, and checked by SHA-256 before
every use. A held-out set (``extract_like``, ``predict``) runs the *training* entry's quantized model: its
features come from the same network as the features the head was trained on.

Two settings were measured on Lite0 here (mean cosine to fp32 on 300 HAM10000 images it was not calibrated on):
NNCF's default overflow fix, which halves the weight range for CPUs without VNNI, cost 0.02 (0.968 against
0.990), so it is off (on a CPU without VNNI the cost is speed, not accuracy); the first convolution, which
reads the normalised image with three channels' different ranges in one quantizer, stays in fp32 (0.990 ->
0.993 at the same speed). Percentile activation ranges lost 0.06 and are not used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np

from featcache.backbones.models import LoadedBackbone
from featcache.data.sources import ImageSource
from featcache.errors import CacheError, FeatcacheError
from featcache.extraction.resume import read_item
from featcache.progress import Reporter
from featcache.store.entries import write_text_atomic
from featcache.store.hashing import file_sha256, stable_hash
from featcache.store.naming import engine_int8_path

CALIBRATION_IMAGES = 300  # NNCF's default subset size
# what sets the quantized weights besides the images and the export (part of the fingerprint)
QUANTIZER = {"tool": "nncf.quantize", "preset": "performance", "overflow_fix": "disable",
             "subset": CALIBRATION_IMAGES, "fp32": "first convolution"}
INT8_ENGINE = "openvino"


def quantizer_version() -> str:
    """NNCF's version (its quantization rules set the int8 weights), or a refusal saying what to install."""
    if importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None:
        raise FeatcacheError("--precision int8 quantizes the backbone with OpenVINO's NNCF, which is not installed: "
                             "pip install 'featcache[int8]' (nncf, openvino), or use --precision fp32")
    return importlib.metadata.version("nncf")


def calibration_records(source: ImageSource) -> list:
    """The images that calibrate: up to :data:`CALIBRATION_IMAGES`, evenly spread over the ids in order."""
    records = sorted(source.records, key=lambda r: r.id)
    if len(records) <= CALIBRATION_IMAGES:
        return records
    picks = np.unique(np.linspace(0, len(records) - 1, CALIBRATION_IMAGES).round().astype(int))
    return [records[i] for i in picks]


def _calibration_images(source: ImageSource, model: LoadedBackbone) -> tuple[list[str], list[np.ndarray]]:
    """The calibration images' SHA-256s and preprocessed uint8 arrays (images that cannot be read are left
    out, as extraction leaves them out)."""
    shas, images, npz = [], [], {}
    for index, record in enumerate(calibration_records(source)):
        item = read_item(record, index, model.preprocess.load, npz)
        if item["image"] is not None:
            shas.append(item["sha"])
            images.append(item["image"].numpy())
    return shas, images


def calibration_identity(source: ImageSource, model: LoadedBackbone) -> dict:
    """What names an int8 entry's calibration: the dataset, how many images, the hash of their SHA-256s,
    and the quantizer with its version."""
    version = quantizer_version()
    shas, _ = _calibration_images(source, model)
    if not shas:
        raise FeatcacheError(f"--precision int8: none of the calibration images of {source.location} could be read; "
                             "check the data (featcache extract says which images fail), or use --precision fp32")
    return {"dataset": source.name, "images": len(shas), "sha256": stable_hash(sorted(shas), 16),
            "quantizer": {**QUANTIZER, "nncf": version}}


def int8_path(model: LoadedBackbone, cache_root: Path, calibration: dict) -> Path:
    """Where the quantized model for ``calibration`` is cached (an OpenVINO ``.xml`` with its ``.bin``)."""
    from featcache.extraction.engines import export_path

    return engine_int8_path(cache_root, model.spec.name,
                            {"export": export_path(model, cache_root).name, "calibration": calibration,
                             "preprocess": model.preprocess.to_dict()})


def _checksum(xml: Path) -> Path:
    return xml.with_name(xml.name + ".sha256")


def _intact(xml: Path) -> bool:
    checksum = _checksum(xml)
    if not (xml.is_file() and xml.with_suffix(".bin").is_file() and checksum.is_file()):
        return False
    return checksum.read_text().split() == [file_sha256(xml), file_sha256(xml.with_suffix(".bin"))]


def ensure_int8(model: LoadedBackbone, cache_root: Path, calibration: dict, source: ImageSource | None,
                reporter: Reporter) -> Path:
    """The quantized model for ``calibration``: the cached one when intact, else quantized now from
    ``source``'s images (which must be the calibration's own dataset)."""
    from featcache.extraction.engines import onnx_path

    xml = int8_path(model, cache_root, calibration)
    if _intact(xml):
        return xml
    if xml.exists():
        reporter.warn(f"the int8 model {xml} does not match its recorded checksum (damaged or changed on disk): "
                      "quantizing it again")
    if source is None or source.name != calibration["dataset"]:
        raise FeatcacheError(
            f"the int8 model of {model.spec.name} calibrated on {calibration['dataset']} is not in {xml.parent}; "
            f"extract {calibration['dataset']} again with --precision int8 into this cache (it quantizes the "
            "model), then rerun")
    shas, images = _calibration_images(source, model)
    if stable_hash(sorted(shas), 16) != calibration["sha256"]:
        raise FeatcacheError(f"the calibration images of {source.location} changed since this entry was named; "
                             "rerun the command (the entry is named anew)")
    quantizer_version()
    reporter.info(f"--precision int8: quantizing {model.spec.name} with NNCF, calibrated on {len(images)} images of "
                  f"{source.name} (once; cached in {xml.parent})")
    onnx = onnx_path(model, cache_root)
    with _quiet_nncf(reporter):
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        graph = ov.Core().read_model(str(onnx))
        first = next((op.get_friendly_name() for op in graph.get_ordered_ops() if op.get_type_name() == "Convolution"),
                     None)
        quantized = nncf.quantize(graph, nncf.Dataset(images, lambda x: x[None]),
                                  preset=nncf.QuantizationPreset.PERFORMANCE,
                                  subset_size=min(QUANTIZER["subset"], len(images)),
                                  ignored_scope=nncf.IgnoredScope(names=[first] if first else []),
                                  advanced_parameters=AdvancedQuantizationParameters(
                                      overflow_fix=OverflowFix.DISABLE))
    tmp = xml.parent / f".{xml.stem}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, str(tmp / xml.name), compress_to_fp16=False)
        write_text_atomic(_checksum(xml), f"{file_sha256(tmp / xml.name)} "
                                          f"{file_sha256((tmp / xml.name).with_suffix('.bin'))}\n")
        os.replace((tmp / xml.name).with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp / xml.name, xml)  # last: the model is there only once both files are
    except OSError as exc:
        raise CacheError(f"writing the int8 model of {model.spec.name} to {xml.parent} failed ({exc}); free space "
                         "or fix the drive and rerun, or use --precision fp32") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml


class _quiet_nncf:
    """NNCF logs at INFO and draws its own rich progress bar (a second live display beside a study's, and
    shown under ``-q``); its calibration loop reports to featcache's reporter instead. PyTorch's
    extension loader, which NNCF imports, warns that this machine has no CUDA: not featcache's business."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter

    def __enter__(self) -> None:
        import logging

        self.levels = {"torch.utils.cpp_extension": logging.getLogger("torch.utils.cpp_extension").level}
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from nncf.common.tensor_statistics import aggregator  # NNCF sets its logger's level on import

        self.levels["nncf"] = logging.getLogger("nncf").level
        logging.getLogger("nncf").setLevel(logging.ERROR)

        self.module, self.track = aggregator, getattr(aggregator, "track", None)
        if self.track is not None:  # the name NNCF 2.x-3.x iterate the calibration set through
            reporter = self.reporter

            def track(sequence, total=None, description="", **_):
                task = reporter.task(f"int8 calibration ({description.lower()})", total=int(total or 0))
                try:
                    for item in sequence:
                        yield item
                        task.advance(1)
                finally:
                    task.close()

            aggregator.track = track

    def __exit__(self, *exc: object) -> None:
        import logging

        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        if self.track is not None:
            self.module.track = self.track
