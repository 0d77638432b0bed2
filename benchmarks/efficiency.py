"""Measuring featcache against the hardware: bare forward vs whole extraction, GEMM peak, FLOPs.

Shared by ``benchmarks/*.py`` and the CI smoke test, so the figure in the docs and the check that
guards it are the same code.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from featcache.backbones.models import LoadedBackbone
from featcache.data.sources import ImageSource
from featcache.extraction.engines import make_forward, run_pipelined
from featcache.extraction.extract import extract
from featcache.extraction.loader import _collate, _ImageDataset, _worker_init
from featcache.recipes import ExecutionPlan, FeatureRecipe


def gemm_peak_gflops(size: int = 2048, seconds: float = 2.0) -> float:
    """fp32 matrix-multiply throughput with torch's current thread count (the practical peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - started) / 1e9


def gflop_per_image(backbone: LoadedBackbone) -> float:
    """Forward FLOPs for one image at the backbone's crop size (2 per multiply-add)."""
    size = backbone.preprocess.crop_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        backbone.model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def decode_ips(backbone: LoadedBackbone, source: ImageSource, resampler: str = "pil", workers: int = 1,
               batch: int = 8) -> float:
    """Images/s of extraction's loader alone (read, SHA-256, decode, resize) with ``workers`` processes."""
    preprocess = dataclasses.replace(backbone.preprocess, resampler=resampler)
    loader = DataLoader(_ImageDataset(source.records, preprocess), batch_size=batch, num_workers=workers,
                        collate_fn=_collate, worker_init_fn=_worker_init, prefetch_factor=4)
    started = time.perf_counter()
    count = sum(len(b["items"]) for b in loader)
    return count / (time.perf_counter() - started)


def inprocess_decode_ips(backbone: LoadedBackbone, source: ImageSource, batch: int = 8) -> float:
    """Images/s of the same read, hash, decode, resize and collate done in this process on one thread:
    what one loader worker costs without the hand-over to the main process (the reference of the
    decode guard, measured on the same machine at the same time, so the guard is a ratio)."""
    dataset = _ImageDataset(source.records, backbone.preprocess)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker (_worker_init)
    try:
        started = time.perf_counter()
        count = 0
        for start in range(0, len(dataset), batch):
            count += len(_collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])["items"])
        return count / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def ceiling(bare: float, decode: float, cores: int | None = None) -> float:
    """The best extract / bare-forward ratio possible when decode and forward share the cores perfectly:
    per image the forward takes cores/bare core-seconds (it uses all of them), the decode 1/decode."""
    cores = cores or torch.get_num_threads()
    return (cores / (cores / bare + 1 / decode)) / bare


def _memory_format(backbone: LoadedBackbone) -> torch.memory_format:
    return torch.channels_last if backbone.spec.is_cnn else torch.contiguous_format


def bare_forward_ips(backbone: LoadedBackbone, batch_size: int, n_images: int, engine: str = "torch",
                     cache_root: str | Path | None = None, export: Path | None = None) -> float:
    """Images/s of the backbone alone on pre-made uint8 batches: no decode, no hashing, no I/O.

    Exactly the forward ``extract`` runs on the CPU (same engine, layout, batch size and threads, the
    normalisation included); another engine than torch runs the ONNX export made once under ``cache_root``,
    or ``export`` (the int8 model).
    """
    size = backbone.preprocess.crop_size
    if engine == "torch":
        backbone.model.to(memory_format=_memory_format(backbone))
    forward = make_forward(engine, backbone, Path(cache_root or tempfile.gettempdir()), export=export)
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)  # what the loader hands over

    def run(_: int) -> None:
        with torch.inference_mode():
            forward(x)

    for _ in run_pipelined(forward, range(4), run):  # warm-up: allocator, kernel selection, every stream
        pass
    batches = max(1, n_images // batch_size)
    started = time.perf_counter()
    for _ in run_pipelined(forward, range(batches), run):  # as extraction runs it: every stream busy
        pass
    return batches * batch_size / (time.perf_counter() - started)


def extraction_ips(backbone: LoadedBackbone, source: ImageSource, n_images: int, batch_size: int | None,
                   workers: int | None = None, engine: str = "torch", cache_root: str | Path | None = None,
                   resampler: str = "pil") -> float:
    """Images/s of a whole ``extract`` (decode, hash, forward, shard writes) into a fresh cache (the ONNX
    export, for another engine, taken from ``cache_root``)."""
    subset = dataclasses.replace(source, records=source.records[:n_images], notes=[])
    with tempfile.TemporaryDirectory() as tmp:
        if engine != "torch":
            (Path(tmp) / ".engines").symlink_to(Path(cache_root) / ".engines", target_is_directory=True)
        result = extract(subset, backbone, cache_root=tmp,
                         recipe=FeatureRecipe(dtype="float16", engine=engine, resampler=resampler),
                         plan=ExecutionPlan(batch_size=batch_size, workers=workers))
    if result.failed:
        raise RuntimeError(f"{len(result.failed)} images failed during the benchmark: {result.failed}")
    return result.images_per_second


@dataclasses.dataclass
class EfficiencyResult:
    backbone: str
    batch_size: int
    n_images: int
    bare_ips: float
    extract_ips: float
    gflop_per_image: float
    gemm_peak_gflops: float

    @property
    def ratio(self) -> float:
        return self.extract_ips / self.bare_ips

    @property
    def achieved_gflops(self) -> float:
        return self.bare_ips * self.gflop_per_image


def extraction_efficiency(backbone: LoadedBackbone, source: ImageSource, n_images: int,
                          batch_size: int = 8, repeats: int = 2, peak: float | None = None,
                          engine: str = "torch") -> EfficiencyResult:
    """Bare forward and whole extraction on ``engine``, alternated ``repeats`` times; the best of each is
    kept, because on a shared machine noise only ever makes a run slower."""
    bare, whole = [], []
    with tempfile.TemporaryDirectory() as engines_root:
        for _ in range(repeats):
            bare.append(bare_forward_ips(backbone, batch_size, n_images, engine, engines_root))
            whole.append(extraction_ips(backbone, source, n_images, batch_size, engine=engine,
                                        cache_root=engines_root))
    return EfficiencyResult(backbone.spec.name, batch_size, n_images, max(bare), max(whole),
                            gflop_per_image(backbone), peak if peak is not None else gemm_peak_gflops())
