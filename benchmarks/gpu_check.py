"""The CUDA path in one go: DINOv2-S/14 and ResNet-50 (random weights) from JPEG files, on the GPU.

For each backbone, on N JPEGs (the packaged demo photographs, 600x450 and larger, repeated to N under
distinct files so that the page cache, not the decoder, is what repeats):

- gpu pipeline: file bytes read by a thread pool, decoded on the GPU (``torchvision.io.decode_jpeg(...,
  device="cuda")``, a batch at a time), resized and cropped on the GPU, normalised, the forward in bf16
  autocast (channels_last for the CNN), features copied into pinned host memory without blocking;
- where the time goes: each stage timed alone with CUDA events over the same batches (read, decode,
  resize, forward, copy), and GPU utilisation sampled by ``nvidia-smi`` during the pipeline;
- featcache extract: the whole command (``--device cuda``, CPU decode in DataLoader workers, pinned
  memory, bf16 autocast) on the same files, for comparison.

Target: >= 2,000 img/s for DINOv2-S/14 from JPEG on a current data-centre GPU. Without a CUDA GPU the
script says so and exits 0 (CI runs only that path). Writes the block ``gpu-check`` of docs/benchmarks.md.

Run: bash benchmarks/gpu_check.sh [--images 4096] [--batch 256]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "featcache" / "data" / "isic_cc0_demo200" / "images"
BACKBONES = ("dinov2_vits14", "resnet50")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing measured, nothing written")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_blocks import replace_block

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device)
    lines = ["## GPU check: DINOv2-S/14 and ResNet-50 from JPEG files", "",
             f"`bash benchmarks/gpu_check.sh {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"on {name}, torch {torch.__version__}, {args.images} JPEGs (the demo photographs repeated), batch "
             f"{args.batch}, random weights, bf16 autocast. GPU pipeline: read (threads) -> `decode_jpeg` on the GPU "
             "-> resize and crop on the GPU -> forward -> pinned host memory. Stage times: each stage alone over "
             "the same batches (ms per image). `featcache extract`: the whole command, CPU decode in workers.", "",
             "| backbone | GPU pipeline img/s | GPU util. (mean) | read | decode | resize | forward | copy | "
             "featcache extract img/s |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        files = _jpegs(Path(tmp) / "data" / "jpegs", args.images)  # a folder of one class, for featcache extract
        for backbone_name in args.backbones.split(","):
            row = _measure(backbone_name, files, args.batch, device, Path(tmp))
            lines.append(f"| {backbone_name} | **{row['ips']:.0f}** | {row['util']} | "
                         + " | ".join(f"{row['stages'][s]:.3f}" for s in ("read", "decode", "resize", "forward",
                                                                            "copy"))
                         + f" | {row['extract_ips']:.0f} |")
            print(lines[-1], flush=True)
    target = next((line for line in lines if line.startswith("| dinov2_vits14")), None)
    if target:
        ips = float(target.split("|")[2].strip(" *"))
        lines += ["", f"DINOv2-S/14 from JPEG: {ips:.0f} img/s against the target of 2,000 "
                      f"({'reached' if ips >= 2000 else 'NOT reached'})."]
    replace_block(args.out, "gpu-check", "\n".join(lines))
    print(f"written: block gpu-check of {args.out}")
    return 0


def _jpegs(folder: Path, count: int) -> list[Path]:
    sources = sorted(DEMO.rglob("*.jpg"))
    folder.mkdir(parents=True)
    files = []
    for i in range(count):
        target = folder / f"{i:05d}.jpg"
        shutil.copyfile(sources[i % len(sources)], target)
        files.append(target)
    return files


def _measure(backbone_name: str, files: list[Path], batch: int, device: torch.device, tmp: Path) -> dict:
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as TF2

    from featcache.backbones.models import load_backbone

    backbone = load_backbone(backbone_name, weights="random", device=device)
    model, prep = backbone.model.eval(), backbone.preprocess
    layout = torch.channels_last if backbone.spec.is_cnn else torch.contiguous_format
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
    pool = backbone.model.pools[0]

    def read(paths: list[Path]) -> list[torch.Tensor]:
        return [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]

    def decode(data: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(data, device=device)

    def resize(images: list[torch.Tensor]) -> torch.Tensor:
        out = [TF2.center_crop(TF2.resize(im, prep.resize_size, antialias=True), [prep.crop_size] * 2)
               for im in images]
        return torch.stack(out)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            x = ((x.float() / 255 - mean) / std).contiguous(memory_format=layout)
            return model(x)[pool]

    batches = [files[i:i + batch] for i in range(0, len(files), batch)]
    host = torch.empty((batch, backbone.dims[pool]), dtype=torch.float16, pin_memory=True)

    def copy(features: torch.Tensor) -> None:
        host[:len(features)].copy_(features.to(torch.float16), non_blocking=True)

    # warm-up: cuDNN picks its algorithms, the caching allocator fills
    for paths in batches[:2]:
        copy(forward(resize(decode(read(paths)))))
    torch.cuda.synchronize()
    util: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_utilisation, args=(util, stop), daemon=True)
    sampler.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as readers:  # the next batch's bytes are read while this one runs
        pending = readers.submit(read, batches[0])
        for k in range(len(batches)):
            data = pending.result()
            if k + 1 < len(batches):
                pending = readers.submit(read, batches[k + 1])
            copy(forward(resize(decode(data))))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    stages = _stage_times(batches, read, decode, resize, forward, copy)
    extract_ips = _featcache_extract(backbone_name, files, tmp / f"cache-{backbone_name}")
    return {"ips": len(files) / seconds, "util": f"{sum(util) / len(util):.0f} %" if util else "n/a",
            "stages": stages, "extract_ips": extract_ips}


def _stage_times(batches, read, decode, resize, forward, copy) -> dict[str, float]:  # noqa: ANN001
    """Milliseconds per image of each stage alone (CUDA events for the GPU stages)."""
    totals = dict.fromkeys(("read", "decode", "resize", "forward", "copy"), 0.0)
    images = 0
    for paths in batches:
        started = time.perf_counter()
        data = read(paths)
        totals["read"] += (time.perf_counter() - started) * 1000
        value = data
        for stage, step in (("decode", decode), ("resize", resize), ("forward", forward), ("copy", copy)):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            value = step(value)
            end.record()
            torch.cuda.synchronize()
            totals[stage] += begin.elapsed_time(end)
        images += len(paths)
    return {stage: total / images for stage, total in totals.items()}


def _sample_utilisation(samples: list[float], stop: threading.Event) -> None:
    if shutil.which("nvidia-smi") is None:
        return
    while not stop.is_set():
        done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i",
                               "0"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip():
            samples.append(float(done.stdout.split()[0]))
        stop.wait(0.2)


def _featcache_extract(backbone_name: str, files: list[Path], cache: Path) -> float:
    """img/s of the whole `featcache extract --device cuda` on the same files (a folder of one class)."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "featcache", "extract", "--data", str(files[0].parent.parent), "--backbone",
               backbone_name, "--weights", "random", "--device", "cuda", "--cache", str(cache), "-q"]
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(f"featcache extract failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        return float("nan")
    return len(files) / seconds


if __name__ == "__main__":
    sys.exit(main())
