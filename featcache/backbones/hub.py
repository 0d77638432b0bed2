"""Backbones from the field's own libraries: Hugging Face ``transformers`` (``hf:``) and ``open_clip``
(``open_clip:``), by hub id or from a local folder in the layout each library saves.

Everything a model needs comes from its own files, as timm's ``pretrained_cfg`` does for timm models:

- **preprocessing** from the model's image processor (``preprocessor_config.json``) or open_clip's
  ``preprocess_cfg``: size, centre crop or squash, interpolation, mean and std, and how the library resizes
  (transformers' default processors resize tensors with torchvision, which featcache's ``torch`` resampler
  reproduces; their centre crop truncates the corner where torchvision rounds it: ``crop_corner="floor"``);
- **poolings** from what the model offers: ``embed`` (the image embedding a CLIP-like model compares with
  text), ``cls`` (the class token, after the final norm) and ``mean`` (the mean patch token; register tokens
  never averaged), ``cls+mean`` where there are both;
- **provenance**: the SHA-256 of every weights file of the folder the model was read from (a hub download is
  such a folder in the Hugging Face cache, whose blobs are named by their SHA-256); a ``SHA256SUMS`` file in a
  local folder is checked before anything is loaded.

Weights are looked for, in order: ``--weights DIR``; a local folder named by the backbone itself
(``hf:/path/to/folder``); ``$FEATCACHE_WEIGHTS_DIR/<name>``; the Hugging Face cache; the hub (online). Offline
with none of them, the error is one line naming the files and where to put them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featcache.backbones import weights as W
from featcache.backbones.registry import HUB_HOST, BackboneSpec, weight_folders
from featcache.data.images import Preprocess
from featcache.errors import WeightsUnavailable

# the files a model folder is read from (weights, configs, tokenizers): a download takes only these, never the
# TensorFlow, Flax, ONNX or Core ML copies many repositories also hold
_WANTED = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
SHA_FILE = "SHA256SUMS"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")


@dataclass(frozen=True)
class ModelFolder:
    """Where a hub backbone's files are, and what to record about them."""

    path: Path
    origin: str  # for the provenance: dir:<path> or hub:<id>@<commit>, with the weights files' SHA-256
    files_sha256: dict[str, str]


# ---------------------------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------------------------

def _is_weights(path: Path) -> bool:
    return path.suffix in _WEIGHT_SUFFIXES


def folder_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every weights file of ``folder`` (relative name -> hex). A file in the Hugging Face cache is a
    link to a blob named by its SHA-256 (checked by huggingface_hub when it was downloaded): that name is taken."""
    hashes = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and _is_weights(p)):
        target = file.resolve()
        blob = target.name if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name) else None
        hashes[str(file.relative_to(folder))] = blob or W.file_sha256(file)
    return hashes


def _checked_sums(folder: Path, hashes: dict[str, str]) -> None:
    """A ``SHA256SUMS`` file (``sha256sum``'s format) beside the weights is checked: a file that differs, or
    one it names that is missing, is refused by name."""
    listing = folder / SHA_FILE
    if not listing.is_file():
        return
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        expected, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if not (folder / name).is_file():
            raise WeightsUnavailable(f"{folder}: {SHA_FILE} lists {name}, which is not in the folder")
        actual = hashes.get(name) or W.file_sha256(folder / name)
        if actual != expected.lower():
            raise WeightsUnavailable(f"{folder / name}: SHA-256 {actual[:12]}… does not match {SHA_FILE}'s "
                                     f"{expected[:12]}…; the file is damaged or another model's: download it again")


def _combined(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}={sha}\n" for name, sha in sorted(hashes.items())).encode()).hexdigest()


def _local_folder(spec: BackboneSpec, path: Path, how: str) -> ModelFolder:
    if not path.is_dir():
        raise WeightsUnavailable(f"{how} {path}: no such folder; {spec.name} reads a folder in the layout "
                                 f"{'open_clip' if spec.library == 'open_clip' else 'save_pretrained'} writes "
                                 f"({spec.family.library_files(spec)})")
    needed = "open_clip_config.json" if spec.library == "open_clip" else "config.json"
    if not (path / needed).is_file():
        raise WeightsUnavailable(f"{how} {path}: no {needed} in it; {spec.name} reads a folder with "
                                 f"{spec.family.library_files(spec)}")
    hashes = folder_hashes(path)
    if not hashes:
        raise WeightsUnavailable(f"{how} {path}: no weights file in it (*.safetensors or *.bin)")
    _checked_sums(path, hashes)
    return ModelFolder(path.resolve(), f"dir:{path.resolve()} sha256:{_combined(hashes)}", hashes)


def _hub_folder(spec: BackboneSpec) -> ModelFolder:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = spec.hub
    try:  # the Hugging Face cache first: no network needed where the model was downloaded before
        path = Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        path = None
    if path is None:
        if not W.host_resolves(HUB_HOST):
            raise WeightsUnavailable(spec.family.offline_message(spec, f"offline: cannot reach {HUB_HOST}"))
        try:
            files = HfApi().list_repo_files(repo)
            patterns = list(_WANTED)
            if not any(f.endswith(".safetensors") for f in files):  # an older repository: PyTorch's own files
                patterns += ["*.bin", "*.pt", "*.pth"]
            path = Path(snapshot_download(repo, allow_patterns=patterns))
        except GatedRepoError:
            raise WeightsUnavailable(f"{repo} is gated on {HUB_HOST}: {spec.gated or 'accept its licence there'}, "
                                     "then log in (`hf auth login` or $HF_TOKEN) and run again") from None
        except RepositoryNotFoundError:
            raise WeightsUnavailable(f"--backbone {spec.name}: {HUB_HOST} has no model {repo!r} (or it is private: "
                                     "log in with `hf auth login`)") from None
        except Exception as exc:  # noqa: BLE001 - network errors of many kinds, one message
            raise WeightsUnavailable(spec.family.offline_message(spec, f"download failed: {type(exc).__name__}")) \
                from None
    hashes = folder_hashes(path)
    if not hashes:
        raise WeightsUnavailable(f"{path}: the cached {repo} has no weights file; delete it and download again")
    return ModelFolder(path, f"hub:{repo}@{path.name} sha256:{_combined(hashes)}", hashes)


def model_folder(spec: BackboneSpec, weights: str | None) -> ModelFolder:
    """The folder ``spec``'s model is read from (see the module's docstring for the order)."""
    if spec.unavailable:
        raise WeightsUnavailable(f"--backbone {spec.name}: {spec.unavailable}")
    if weights == W.RANDOM:
        raise WeightsUnavailable(f"--weights random: {spec.name} is read with its own weights; for a model of random "
                                 "weights save one with its library and pass its folder")
    if weights:
        return _local_folder(spec, Path(weights).expanduser(), "--weights")
    if spec.local:
        return _local_folder(spec, Path(spec.hub), f"--backbone {spec.library_prefix}")
    folder = W.weights_dir()
    if folder is not None:
        for name in weight_folders(spec):
            if (folder / name).is_dir():
                return _local_folder(spec, folder / name, f"${W.WEIGHTS_DIR_ENV}/")
    return _hub_folder(spec)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """The libraries' progress bars and notes (transformers' weight-loading bar, open_clip's log lines) are
    not featcache's output: silenced while a model is loaded."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # open_clip alone: only its log lines to quiet
        hf_logging = None
    root, level = logging.getLogger(), logging.getLogger().level
    previous = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) if hf_logging else None
    if hf_logging:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if hf_logging:  # the libraries as they were: a notebook user's own transformers calls keep their bars
            hf_logging.set_verbosity(previous[0])
            if previous[1]:
                hf_logging.enable_progress_bar()
        root.setLevel(level)


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise WeightsUnavailable(f"{'open_clip' if module == 'open_clip' else 'transformers'} is not installed: "
                                 "pip install 'featcache[foundation]'")


# ---------------------------------------------------------------------------------------------------------
# The models, as featcache trunks
# ---------------------------------------------------------------------------------------------------------

class HubTrunk(nn.Module):
    """A model of one of these libraries returning ``{pooling: features}`` for a normalised batch; the
    ``PoolingTrunk`` contract of :class:`featcache.backbones.models.PooledFeatures`."""

    pools_itself = True
    offered: tuple[str, ...] = ()
    default: str = "embed"

    def text_embeddings(self, prompts: list[str]) -> np.ndarray:
        """Unit-length text embeddings of ``prompts`` (a zero-shot head's classes)."""
        raise WeightsUnavailable("this backbone has no text tower: zero-shot needs a CLIP-like model")

    @property
    def has_text(self) -> bool:
        return False

    @property
    def logit_scale(self) -> float:
        return 100.0


class TransformersTrunk(HubTrunk):
    """A transformers model: a CLIP-like pair of towers (CLIP, SigLIP, SigLIP 2, MedSigLIP, MONET…) or a vision
    encoder (DINOv2, DINOv3, ViT…)."""

    def __init__(self, model: nn.Module, folder: Path):
        super().__init__()
        self.model, self.folder = model, folder
        config = model.config
        self.dual = hasattr(model, "vision_model") and hasattr(model, "text_model")
        vision = config.vision_config if self.dual else config
        self.model_type = config.model_type
        # SigLIP's towers pool by attention (no class token); CLIP's vision tower has one class token
        self.class_token = not self.dual or self.model_type == "clip"
        self.prefix = (1 if self.class_token else 0) + int(getattr(vision, "num_register_tokens", 0) or 0)
        self.offered = (("embed", "mean") + (("cls", "cls+mean") if self.class_token else ())) if self.dual \
            else ("cls", "mean", "cls+mean")
        self.default = "embed" if self.dual else "cls"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.dual:
            vision = self.model.vision_model(pixel_values=x)
            pooled = vision.pooler_output
            projection = getattr(self.model, "visual_projection", None)
            out = {"embed": projection(pooled) if projection is not None else pooled}
            tokens = vision.last_hidden_state
            if self.class_token:
                out["cls"] = pooled  # CLIP: the class token after the vision tower's final norm
        else:
            tokens = self.model(pixel_values=x).last_hidden_state  # after the final norm
            out = {"cls": tokens[:, 0]}
        out["mean"] = tokens[:, self.prefix:].mean(dim=1)
        if "cls" in out:
            out["cls+mean"] = torch.cat([out["cls"], out["mean"]], dim=1)
        return out

    @property
    def has_text(self) -> bool:
        return self.dual

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.exp()) if scale is not None else 100.0

    def text_embeddings(self, prompts: list[str]) -> np.ndarray:
        if not self.dual:
            return super().text_embeddings(prompts)
        from transformers import AutoTokenizer

        # without its vocabulary transformers builds an empty tokenizer that turns every word into one unknown
        # token: zero-shot scores from it would look like any others and mean nothing
        if not any((self.folder / name).is_file() for name in TOKENIZER_FILES):
            raise WeightsUnavailable(f"{self.folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); zero-shot "
                                     "needs the model's own tokenizer: save it beside the model (save_pretrained)")
        try:
            with quiet_libraries():
                tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a missing file or a tokenizer package, said as one line
            raise WeightsUnavailable(f"{self.folder}: its tokenizer cannot be loaded ({type(exc).__name__}: "
                                     f"{str(exc)[:160]}); zero-shot needs the model's tokenizer files") from None
        # SigLIP's text tower was trained on prompts padded to its full length (its model card says so)
        padding = "max_length" if self.model_type.startswith("siglip") else True
        tokens = tokenizer(prompts, padding=padding, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            found = self.model.get_text_features(**{k: v for k, v in tokens.items()
                                                    if k in ("input_ids", "attention_mask")})
        found = getattr(found, "pooler_output", found)  # transformers 5 returns the output object
        return torch.nn.functional.normalize(found.float(), dim=-1).numpy()


class OpenClipTrunk(HubTrunk):
    """An open_clip model: ``embed`` is ``encode_image``; ``mean`` (and ``cls``) from its vision tower's tokens."""

    def __init__(self, model: nn.Module, tokenizer, folder: Path):  # noqa: ANN001 - open_clip's tokenizer
        super().__init__()
        self.model, self.tokenizer, self.folder = model, tokenizer, folder
        visual = model.visual
        self.kind = type(visual).__name__
        self.offered = {"VisionTransformer": ("embed", "mean"), "TimmModel": ("embed", "cls", "mean", "cls+mean")
                        }.get(self.kind, ("embed",))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        visual = self.model.visual
        if self.kind == "VisionTransformer":
            visual.output_tokens = True
            try:
                pooled, tokens = visual(x)
            finally:
                visual.output_tokens = False
            return {"embed": pooled, "mean": tokens.mean(dim=1)}
        out = {"embed": self.model.encode_image(x)}
        if self.kind == "TimmModel":
            trunk = visual.trunk
            tokens = trunk.forward_features(x)
            prefix = getattr(trunk, "num_prefix_tokens", 1)
            out |= {"cls": tokens[:, 0], "mean": tokens[:, prefix:].mean(dim=1)}
            out["cls+mean"] = torch.cat([out["cls"], out["mean"]], dim=1)
        return out

    @property
    def has_text(self) -> bool:
        return hasattr(self.model, "encode_text")

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def text_embeddings(self, prompts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            found = self.model.encode_text(self.tokenizer(prompts))
        return torch.nn.functional.normalize(found.float(), dim=-1).numpy()


def _square(size, what: str) -> int:  # noqa: ANN001 - an int, a pair, or a size dict's value
    sizes = {int(v) for v in (size if isinstance(size, (tuple, list)) else (size,))}
    if len(sizes) != 1:
        raise WeightsUnavailable(f"{what}: its images are resized to {size}, not a square; featcache's inputs are "
                                 "square crops")
    return sizes.pop()


def _sizes(value) -> dict:  # noqa: ANN001 - a dict (transformers 4) or a SizeDict (5), or None
    """A processor's size setting as a dict of its set keys (``shortest_edge``, ``height``, ``width``…)."""
    return {k: v for k, v in dict(value or {}).items() if v is not None}


def transformers_preprocess(processor) -> Preprocess:  # noqa: ANN001 - a transformers image processor
    """The image processor's own resize, crop and normalisation as a :class:`Preprocess`."""
    name = type(processor).__name__
    if getattr(processor, "do_rescale", True) and abs(float(getattr(processor, "rescale_factor", 1 / 255)) * 255 - 1) \
            > 1e-6:
        raise WeightsUnavailable(f"{name}: rescales pixels by {processor.rescale_factor}, not 1/255")
    size, crop = _sizes(processor.size), _sizes(getattr(processor, "crop_size", None))
    if "shortest_edge" in size:
        if not getattr(processor, "do_center_crop", False):
            raise WeightsUnavailable(f"{name}: resizes the short side to {size['shortest_edge']} without a centre "
                                     "crop, so its inputs are not square")
        side = _square((crop["height"], crop["width"]), name)
        geometry = {"crop_size": side, "resize_size": int(size["shortest_edge"]), "resize_mode": "crop"}
    elif "height" in size and "width" in size:
        side = _square((size["height"], size["width"]), name)
        if getattr(processor, "do_center_crop", False) and crop and _square((crop["height"], crop["width"]), name) \
                != side:
            raise WeightsUnavailable(f"{name}: squashes to {side} px and then crops: featcache does one or the other")
        geometry = {"crop_size": side, "resize_size": side, "resize_mode": "full"}
    else:
        raise WeightsUnavailable(f"{name}: resizes by {size}; featcache reproduces a short side with a centre crop, "
                                 "or a square")
    mean, std = ((tuple(float(m) for m in processor.image_mean), tuple(float(s) for s in processor.image_std))
                 if getattr(processor, "do_normalize", True) else ((0.0,) * 3, (1.0,) * 3))
    resample = getattr(processor, "resample", 2)
    interpolation = _PIL_RESAMPLE.get(int(getattr(resample, "value", resample)), None)
    if interpolation is None:
        raise WeightsUnavailable(f"{name}: resamples with {resample!r}, which featcache does not reproduce")
    # transformers' default processors resize tensors with torchvision (as featcache's torch resampler does);
    # the PIL ones resize PIL images (its pil resampler)
    torchvision_backend = any(c.__name__ in ("TorchvisionBackend", "BaseImageProcessorFast")
                              for c in type(processor).__mro__)
    return Preprocess(interpolation=interpolation, mean=mean, std=std,  # type: ignore[arg-type]
                      resampler="torch" if torchvision_backend else "pil", crop_corner="floor", **geometry)


def open_clip_preprocess(model: nn.Module, name: str) -> Preprocess:
    """open_clip's eval transform (its model's ``preprocess_cfg``) as a :class:`Preprocess`: a resize of the
    short side and a centre crop (``shortest``), or the whole image squashed (``squash``), with PIL."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    side = _square(cfg.get("size", getattr(model.visual, "image_size", 224)), name)
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise WeightsUnavailable(f"{name}: open_clip resizes it by its longest side ({mode}), which featcache does "
                                 "not reproduce")
    return Preprocess(side, side, str(cfg.get("interpolation", "bicubic")),
                      tuple(float(m) for m in cfg.get("mean", model.visual.image_mean)),  # type: ignore[arg-type]
                      tuple(float(s) for s in cfg.get("std", model.visual.image_std)),  # type: ignore[arg-type]
                      resize_mode="crop" if mode == "shortest" else "full")


def load_trunk(spec: BackboneSpec, folder: ModelFolder) -> tuple[HubTrunk, Preprocess]:
    """The model in ``folder`` as a trunk, with its own preprocessing."""
    _require("open_clip" if spec.library == "open_clip" else "transformers")
    try:
        with quiet_libraries():
            if spec.library == "open_clip":
                import open_clip

                where = f"local-dir:{folder.path}"
                model = open_clip.create_model(where)
                trunk = OpenClipTrunk(model, open_clip.get_tokenizer(where), folder.path)
                preprocess = open_clip_preprocess(model, spec.name)
            else:
                from transformers import AutoImageProcessor, AutoModel

                model = AutoModel.from_pretrained(folder.path, local_files_only=True, dtype=torch.float32)
                trunk = TransformersTrunk(model, folder.path)
                preprocess = transformers_preprocess(AutoImageProcessor.from_pretrained(folder.path,
                                                                                        local_files_only=True))
    except WeightsUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - the libraries raise many kinds; say which model and what failed
        raise WeightsUnavailable(f"{spec.name}: {spec.library} could not load {folder.path} ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    return trunk.eval().requires_grad_(False), preprocess
