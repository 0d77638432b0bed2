"""The exported engines themselves, without PyTorch: ONNX Runtime or OpenVINO running a backbone's ONNX
export on NumPy batches, and the streams that run several batches at once.

:mod:`featcache.extraction.engines` exports the backbone (that needs PyTorch) and wraps these for
tensors; the lean extraction (:mod:`featcache.extraction.lean`) calls them directly.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from featcache.errors import FeatcacheError
from featcache.store.hashing import file_sha256

T = TypeVar("T")
R = TypeVar("R")
ArrayForward = Callable[[np.ndarray], dict[str, np.ndarray]]


class StreamedForward:
    """A forward that ``streams`` batches may run through at once, each on one thread (the exported
    engines' throughput mode). Measured on 2 cores with the decode worker beside it: a thread preempted by
    the decode then holds up only its own batch, not the other thread at every parallel step (Lite0 on
    OpenVINO +18 % on 200x150 JPEGs, SqueezeNet on ONNX Runtime +20 % on 600x450)."""

    def __init__(self, run: Callable[[Any], dict[str, Any]], streams: int):
        self.run, self.streams = run, streams

    def __call__(self, images: Any) -> dict[str, Any]:
        return self.run(images)


def run_pipelined(forward: Callable, batches: Iterable[T], work: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """``(batch, work(batch))`` in order, with as many batches in flight as ``forward`` has streams."""
    streams = getattr(forward, "streams", 1)
    if streams < 2:
        for batch in batches:
            yield batch, work(batch)
        return
    with ThreadPoolExecutor(streams, thread_name_prefix="featcache-stream") as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(work, batch)))
            if len(pending) > streams:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def export_intact(path: Path) -> str | None:
    """Why the ONNX export at ``path`` may not be used (no checksum recorded at export, or a different
    one: damaged or changed on disk), or None when its SHA-256 matches."""
    checksum = path.with_name(path.name + ".sha256")
    recorded = checksum.read_text().strip() if checksum.is_file() else None
    if recorded is None:
        return "has no recorded checksum"
    return None if recorded == file_sha256(path) else "does not match the checksum recorded at export"


def exported_forward(engine: str, path: Path, pools: tuple[str, ...], threads: int) -> StreamedForward:
    """The ONNX export at ``path`` on ``engine`` (``onnxruntime`` or ``openvino``, the CPU): uint8 N x 3 x H x W
    arrays in, ``{pooling: float32 features}`` out, one single-threaded stream per thread."""
    streams = threads if threads > 1 else 1
    if engine == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            raise FeatcacheError("--engine onnxruntime needs ONNX Runtime: pip install onnx onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads // streams, 1  # run() is thread-safe
        # Idle ONNX Runtime threads spin by default, taking the cores the decode worker needs between
        # batches: without spinning SqueezeNet's extraction ran ~25 % faster here, its bare forward no slower.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ort.OrtValue.ortvalue_from_numpy(np.zeros(1, dtype=np.float32)).numpy()  # NumPy's C API set up here, once

        def run_ort(x: np.ndarray) -> dict[str, np.ndarray]:
            outputs = session.run(list(pools), {"x": np.ascontiguousarray(x)})
            return dict(zip(pools, outputs, strict=True))

        return StreamedForward(run_ort, streams)
    try:
        import openvino as ov
    except ImportError:
        raise FeatcacheError("--engine openvino needs OpenVINO: pip install onnx openvino") from None
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": streams}
    if streams > 1:
        config["PERFORMANCE_HINT"] = "THROUGHPUT"
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    # pybind11 sets up NumPy's C API on first use, once per process; two stream threads racing to do it
    # deadlocked (seen in a shared-decode extraction), so it is done here, on this thread, first
    np.asarray(ov.Tensor(np.zeros(1, dtype=np.float32)).data)
    ports = [compiled.output(p) for p in pools]
    requests = threading.local()  # an infer request per stream thread (one request is not thread-safe)

    def run_openvino(x: np.ndarray) -> dict[str, np.ndarray]:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        result = requests.request.infer(np.ascontiguousarray(x))
        # copies: the request reuses its output buffers for the next batch
        return {p: np.array(result[port]) for p, port in zip(pools, ports, strict=True)}

    return StreamedForward(run_openvino, streams)
