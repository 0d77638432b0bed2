"""The hub families: any model of Hugging Face transformers (``hf:<hub id | folder>``) or open_clip
(``open_clip:<hub id | folder>``), and the field's foundation models by name. A model is read from a folder in the
layout its library saves (a local folder, $FEATCACHE_WEIGHTS_DIR, the Hugging Face cache or a download), each
weights file checked by SHA-256 (:mod:`featcache.backbones.hub`, imported when a model is loaded)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from featcache.backbones import timm_family  # noqa: F401 - PanDerm's specs, named here, are of the timm family
from featcache.backbones import weights as W
from featcache.backbones.registry import (
    HUB_HOST,
    REGISTRY,
    BackboneFamily,
    BackboneSpec,
    register_backbone,
    register_family,
    weight_folders,
)
from featcache.errors import WeightsUnavailable

HUB_POOLINGS = ("embed", "cls", "mean", "cls+mean")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubFamily(BackboneFamily):
    """A library whose models are read whole from a folder (weights, configs, preprocessing, tokenizer)."""

    host = HUB_HOST
    loads_itself = True
    reads_folders = True  # a name may be a folder, relative to where it is written (a study file's folder)
    module = ""  # the Python module the library is

    def spec_for(self, target: str) -> BackboneSpec:
        """A hub id, or a folder (in the layout the library saves), named by its absolute path so that a later
        command finds it from anywhere."""
        if not target:
            raise WeightsUnavailable(f"--backbone {self.prefix}: give a Hugging Face hub id (org/name) or a folder "
                                     f"after {self.prefix}")
        path = Path(target).expanduser()
        if path.is_dir() or target.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(target):
            if not path.is_dir():
                raise WeightsUnavailable(f"--backbone {self.prefix}{target}: no such folder here, and not a hub id "
                                         "(org/name)")
            hub, local = str(path.resolve()), True
        else:
            hub, local = target, False
        described = f"{self.library} model {'in ' if local else ''}{hub}"
        named = next((s for s in REGISTRY.values() if s.hub == hub and s.library == self.library), None)
        known = {"licence": named.licence, "citation": named.citation, "gated": named.gated,
                 "unavailable": named.unavailable, "description": named.description} if named else {}
        return BackboneSpec(f"{self.prefix}{hub}", self.library, hub, HUB_POOLINGS, (),
                            **{"description": described, **known}, hub=hub, local=local)

    def canonical(self, target: str) -> str:
        return self.spec_for(target).name

    def torch_only(self, spec: BackboneSpec) -> str:
        return f"featcache does not export {self.library} models to ONNX"

    def is_cnn(self, spec: BackboneSpec) -> bool:
        return False  # transformers: channels_last gains nothing

    def download_url(self, spec: BackboneSpec) -> str | None:
        return f"https://{HUB_HOST}/{spec.hub}" if spec.hub else None

    def weights_available(self, spec: BackboneSpec) -> str:
        if importlib.util.find_spec(self.module) is None:
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

    def library_files(self, spec: BackboneSpec) -> str:
        """The files a model folder of this library holds."""
        raise NotImplementedError

    def how_to_get(self, spec: BackboneSpec) -> str:
        folder = weight_folders(spec)[0]
        return (f"Where there is internet, `hf download {spec.hub} --local-dir {folder}` ({self.library_files(spec)}), "
                f"then pass --weights {folder}/ or put the folder at ${W.WEIGHTS_DIR_ENV}/{folder}"
                + (f"; {spec.gated}" if spec.gated else ""))

    def load(self, spec: BackboneSpec, weights: str | None, pools: tuple[str, ...] | None, device: Any) -> Any:
        """The model's folder read by its library, with the poolings it offers."""
        from dataclasses import replace

        import torch

        from featcache.backbones.hub import load_trunk, model_folder
        from featcache.backbones.loaded import LoadedBackbone, PooledFeatures

        folder = model_folder(spec, weights)
        trunk, preprocess = load_trunk(spec, folder)
        spec = replace(spec, poolings=trunk.offered, default_pools=(trunk.default,), zero_shot=trunk.has_text)
        weights_sha = W.state_dict_sha256(trunk.state_dict())
        model = PooledFeatures(spec, trunk, tuple(pools) if pools else (trunk.default,)).to(device)
        try:
            with torch.inference_mode():
                probe = model(torch.zeros(1, 3, preprocess.crop_size, preprocess.crop_size, device=device))
        except Exception as exc:  # noqa: BLE001 - e.g. a model that wants patch masks (SigLIP 2 NaFlex), one line
            raise WeightsUnavailable(f"{spec.name}: its forward on a {preprocess.crop_size} px square image failed "
                                     f"({type(exc).__name__}: {str(exc)[:160]}); featcache reads models that take a "
                                     "batch of square images (pixel_values) alone") from None
        return LoadedBackbone(spec, model, preprocess, weights_sha, folder.origin,
                              {p: int(v.shape[1]) for p, v in probe.items()})


class TransformersFamily(HubFamily):
    library = "transformers"
    prefix = "hf:"
    name_form = "hf:<hub id or folder>"
    module = "transformers"

    def library_files(self, spec: BackboneSpec) -> str:
        text = spec.zero_shot or not spec.dims  # a CLIP-like model, or one not known yet
        return "config.json, model.safetensors, preprocessor_config.json" + (
            " and, for zero-shot, the tokenizer files" if text else "")


class OpenClipFamily(HubFamily):
    library = "open_clip"
    prefix = "open_clip:"
    name_form = "open_clip:<hub id or folder>"
    module = "open_clip"

    def library_files(self, spec: BackboneSpec) -> str:
        return "open_clip_config.json and open_clip_model.safetensors (or open_clip_pytorch_model.bin)"


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


register_family(TransformersFamily())
register_family(OpenClipFamily())
for _spec in HUB_MODELS:
    register_backbone(_spec)
