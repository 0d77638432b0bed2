"""The backbone registry: families and the models they name, poolings, dimensions and where weights come from,
without importing torch (so `featcache backbones` and option checks are fast).

As timm's ``register_model`` does for its architectures, each library featcache builds backbones from is a
:class:`BackboneFamily` that registers itself (:func:`register_family`) and the models it names
(:func:`register_backbone`) in a module of its own (``timm_family``, ``torchvision_family``,
``scattering_family``, ``hub_family``), imported by :mod:`featcache.backbones.catalog`, where every lookup is
made. A spec carries its own preprocessing overrides, weights source, licence and citation. Nothing outside a
family's module branches on a library's name. Building a backbone is :mod:`featcache.backbones.models`, which
asks the spec's family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featcache.backbones import weights as W
from featcache.errors import WeightsUnavailable
from featcache.store.naming import safe_name

HUB_HOST = "huggingface.co"
# gap: global average of the last feature map (CNN) / of the patch tokens (ViT); penult: global
# average of the stage before it (before EfficientNet's 1x1 head conv, ResNet's layer3, SqueezeNet's
# last-but-one Fire); multi: the global averages of the last three stages and gap, concatenated;
# fc7: VGG/AlexNet's penultimate fully connected layer; cls / mean / cls+mean: a ViT's class token,
# mean patch token, both; last4: the class tokens of a ViT's last four blocks (DINOv2's linear eval).
# embed: a CLIP-like model's image embedding, the vector it compares with text (after its projection).
POOLINGS = ("gap", "penult", "multi", "fc7", "cls", "mean", "cls+mean", "last4", "embed")
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
    def family(self) -> BackboneFamily:
        """The family that builds it and finds its weights."""
        return family_of(self.library)

    @property
    def library_prefix(self) -> str:
        return self.family.prefix

    @property
    def torch_only(self) -> str:
        """Why this backbone runs on PyTorch alone (no ONNX export), or ''."""
        return self.family.torch_only(self)

    @property
    def is_cnn(self) -> bool:
        """Whether channels_last pays: a CNN's convolutions, not FFTs or a transformer's tokens."""
        return self.family.is_cnn(self)

    @property
    def online_host(self) -> str:
        return self.family.host

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
        return None if self.local else self.family.download_url(self)

    def published_sha_prefix(self) -> str | None:
        """The part of the SHA-256 the download's own name publishes, when it does (torchvision's)."""
        return self.family.published_sha_prefix(self)


class BackboneFamily:
    """A library featcache builds backbones from. A family says how a name with its ``prefix`` reads (any model of
    the library: ``timm:convnext_tiny``), where its weights come from and what to say when they cannot be had, and,
    importing its library only then, how a backbone is built, loaded, preprocessed and pooled. Registered once by
    :func:`register_family`; :mod:`featcache.backbones.models` runs every family the same way."""

    library = ""
    prefix = ""  # a name beginning so is any model of the family ("" : only the models it registers)
    name_form = ""  # how such a name is written, for the message of an unknown name ("timm:<model name>")
    host = ""  # where its downloads come from ("": none)
    loads_itself = False  # it loads a whole backbone by :meth:`load` (a model folder), not by build + weights
    reads_folders = False  # a name after its prefix may be a folder (a study file's names are relative to it)

    # --- naming, weights and messages: without torch ---
    def spec_for(self, target: str) -> BackboneSpec:
        """The spec of ``prefix + target``, a model of the library that featcache does not name itself."""
        raise WeightsUnavailable(f"--backbone {self.prefix}{target}: {self.library} takes only its named models")

    def canonical(self, target: str) -> str:
        """The name an entry records for ``prefix + target`` (without loading the library)."""
        return self.prefix + target

    def torch_only(self, spec: BackboneSpec) -> str:
        return ""

    def is_cnn(self, spec: BackboneSpec) -> bool:
        return "cls" not in spec.poolings

    def download_url(self, spec: BackboneSpec) -> str | None:
        return None

    def published_sha_prefix(self, spec: BackboneSpec) -> str | None:
        return None

    def weights_available(self, spec: BackboneSpec) -> str:
        """Where weights would come from on this machine, without loading them."""
        if W.weights_dir() and W.find_in_weights_dir(spec.weight_filenames()):
            return f"file in ${W.WEIGHTS_DIR_ENV}"
        package = W.weights_package(spec.package_weights)
        if package:
            return f"package {package}"
        return "download (needs internet)" if self.host else NOT_LOADABLE

    def how_to_get(self, spec: BackboneSpec) -> str:
        """What to do where the weights cannot be had: the second half of :meth:`offline_message`."""
        url = spec.download_url()
        where = f" (download it from {url})" if url else ""
        return (f"Pass --weights FILE{where}, or put {spec.weight_filenames()[0]} in ${W.WEIGHTS_DIR_ENV}; "
                "--weights random only for timing tests")

    def offline_message(self, spec: BackboneSpec, reason: str) -> str:
        """The one message of weights that cannot be had, with ``reason`` (offline, a download failed)."""
        return f"No weights for {spec.name} here ({reason}). {self.how_to_get(spec)}"

    def weights_origin(self, spec: BackboneSpec, weights: str | None) -> str | None:
        """For a backbone that needs no weights, where its values come from (a weights file refused); None: its
        weights are found and loaded in the one order (``featcache.backbones.models``)."""
        return None

    # --- building and running, with torch (a family imports its library in these) ---
    def build(self, spec: BackboneSpec) -> Any:
        """The network, of random weights."""
        raise NotImplementedError

    def download(self, spec: BackboneSpec, net: Any) -> str:
        """Load the library's own download into ``net``; return where it came from."""
        raise WeightsUnavailable(self.offline_message(spec, "it has no download"))

    def load_state(self, spec: BackboneSpec, net: Any, state: dict, origin: str) -> None:
        """Load a weights file's ``state`` into ``net``, refused when it does not fit."""
        load_strict(net, state, origin)

    def preprocess(self, spec: BackboneSpec, net: Any, origin: str) -> Any:
        """The eval transform of the weights loaded (``origin``), from the library that owns them."""
        raise NotImplementedError

    def pool(self, spec: BackboneSpec, net: Any, x: Any, pools: tuple[str, ...]) -> dict:
        """``{pooling: features}`` of a batch ``x``; a trunk that pools itself is asked directly."""
        out = net(x)
        return {p: out[p] for p in pools}

    def feature_map(self, spec: BackboneSpec, net: Any, x: Any) -> Any:
        """The final CNN feature map whose spatial mean is ``gap`` (what a class activation map weighs)."""
        raise WeightsUnavailable(f"{spec.name}: a {self.library} model has no CNN feature map to weigh")

    def load(self, spec: BackboneSpec, weights: str | None, pools: tuple[str, ...] | None, device: Any) -> Any:
        """With ``loads_itself``: the whole ``LoadedBackbone``."""
        raise NotImplementedError


def load_strict(net: Any, state: dict, origin: str) -> None:
    """``state`` into ``net``, every key and shape; a file that does not fit is said in one line."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsUnavailable(f"{origin}: does not fit this model ({first})") from None


FAMILIES: dict[str, BackboneFamily] = {}
REGISTRY: dict[str, BackboneSpec] = {}


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Make ``family`` known: its specs' library names it, and names with its prefix read through it."""
    if family.library in FAMILIES:
        raise ValueError(f"a backbone family {family.library!r} is registered already")
    FAMILIES[family.library] = family
    return family


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Name a model: ``--backbone spec.name`` builds it (its family must be registered)."""
    if spec.name in REGISTRY:
        raise ValueError(f"a backbone {spec.name!r} is registered already")
    family_of(spec.library)
    REGISTRY[spec.name] = spec
    return spec


def family_of(library: str) -> BackboneFamily:
    if library not in FAMILIES:
        known = ", ".join(FAMILIES) or "none"
        raise WeightsUnavailable(f"no backbone family {library!r} is registered (known: {known}); register it, or "
                                 "look backbones up through featcache.backbones.catalog")
    return FAMILIES[library]


def get_spec(name: str) -> BackboneSpec:
    """The spec a ``--backbone`` name means: a registered model, or any model of a family by its prefix."""
    if name in REGISTRY:
        return REGISTRY[name]
    for family in FAMILIES.values():
        if family.prefix and name.startswith(family.prefix):
            return family.spec_for(name[len(family.prefix):])
    prefixed = ", ".join(f.name_form for f in FAMILIES.values() if f.prefix)
    raise WeightsUnavailable(f"--backbone {name}: unknown; choose one of {', '.join(REGISTRY)}, or {prefixed}")


def canonical_name(name: str) -> str:
    """The name an entry records for a backbone: a model folder by its absolute path (``hf:./monet`` is
    ``hf:/home/me/monet``), every other name as given."""
    for family in FAMILIES.values():
        if family.prefix and name.startswith(family.prefix):
            return family.canonical(name[len(family.prefix):])
    return name


def weight_folders(spec: BackboneSpec) -> tuple[str, ...]:
    """The folder names looked for in $FEATCACHE_WEIGHTS_DIR: a named backbone's name, then the hub id's last
    part, then the hub id with ``--`` for ``/`` (as the Hugging Face cache names its folders)."""
    prefixed = spec.family.prefix and spec.name.startswith(spec.family.prefix)  # any model of a family, not a named one
    names = [] if prefixed and spec.hub else [safe_name(spec.name)]
    if spec.hub and not spec.local:
        names += [spec.hub.rsplit("/", 1)[-1], spec.hub.replace("/", "--")]
    return tuple(dict.fromkeys(names))





def weights_available(spec: BackboneSpec) -> str:
    """Where weights would come from on this machine, without loading them."""
    if spec.unavailable:
        return NOT_LOADABLE
    return spec.family.weights_available(spec)


NOT_LOADABLE = "not loadable here"
