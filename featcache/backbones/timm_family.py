"""The timm family: DINOv2 and EfficientNet-Lite by name, and any timm model as ``timm:<name>``. Preprocessing comes
from timm's ``pretrained_cfg`` (resolved from the built network), never copied by hand. timm is imported when a
backbone is built, not when the family registers."""

from __future__ import annotations

import sys
from typing import Any

from featcache.backbones.registry import (
    CNN_LAYER_POOLS,
    HUB_HOST,
    BackboneFamily,
    BackboneSpec,
    load_strict,
    register_backbone,
    register_family,
)
from featcache.errors import WeightsUnavailable

TIMM_PREFIX = "timm:"


class TimmFamily(BackboneFamily):
    library = "timm"
    prefix = TIMM_PREFIX
    name_form = "timm:<model name>"
    host = HUB_HOST

    def spec_for(self, target: str) -> BackboneSpec:
        import timm

        if not timm.is_model(target):
            raise WeightsUnavailable(f"--backbone {self.prefix}{target}: timm has no model {target!r}; "
                                     "see timm.list_models() for names")
        return BackboneSpec(self.prefix + target, self.library, target, ("gap", "cls", "mean", "cls+mean"), (),
                            description=f"timm model {target}")

    def is_cnn(self, spec: BackboneSpec) -> bool:
        return "cls" not in spec.poolings or spec.name.startswith(self.prefix) and "vit" not in spec.arch

    def download_url(self, spec: BackboneSpec) -> str | None:
        import timm

        try:
            return timm.models.get_pretrained_cfg(spec.arch).url or None
        except Exception:  # noqa: BLE001 - unknown timm names simply have no URL
            return None

    def build(self, spec: BackboneSpec) -> Any:
        import timm

        return timm.create_model(spec.arch, pretrained=False, **spec.timm_kwargs)

    def download(self, spec: BackboneSpec, net: Any) -> str:
        import timm

        loaded = timm.create_model(spec.arch, pretrained=True, **spec.timm_kwargs)
        load_strict(net, loaded.state_dict(), f"timm download of {spec.arch}")
        return f"timm:{spec.arch}"

    def load_state(self, spec: BackboneSpec, net: Any, state: dict, origin: str) -> None:
        # timm's own per-architecture filter converts original checkpoints (e.g. DINOv2 hub files, resizing
        # position embeddings to the chosen input size), as timm does for its downloads
        filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, net)
        own = net.state_dict()
        classifier = net.pretrained_cfg.get("classifier", "head")
        load_strict(net, {k: v for k, v in state.items() if k in own or not k.startswith(classifier)}, origin)

    def preprocess(self, spec: BackboneSpec, net: Any, origin: str) -> Any:
        import timm

        from featcache.data.images import Preprocess

        cfg = timm.data.resolve_model_data_config(net)
        size = spec.crop_size or cfg["input_size"][-1]
        return Preprocess.from_crop_pct(size, spec.crop_pct or cfg["crop_pct"], cfg["interpolation"],
                                        cfg["mean"], cfg["std"])

    def pool(self, spec: BackboneSpec, net: Any, x: Any, pools: tuple[str, ...]) -> dict:
        import torch

        from featcache.backbones.pooling import layer_pools

        wanted = set(pools)
        if wanted & CNN_LAYER_POOLS:  # the last three stages as well as the final map
            final, stages = net.forward_intermediates(x, indices=3)
            if final.ndim != 4:
                raise WeightsUnavailable(f"{spec.name} is a ViT: use --pool cls, mean, cls+mean or last4")
            return layer_pools(final, stages)
        feats = net.forward_features(x)
        out: dict = {}
        if feats.ndim == 4:  # CNN feature map
            if {"cls", "mean", "cls+mean", "last4"} & wanted:
                raise WeightsUnavailable(f"{spec.name} is a CNN: use --pool gap, penult or multi")
            out["gap"] = feats.mean(dim=(2, 3))
            return out
        # Token sequence: CLS first, then register tokens (never averaged), then patches.
        prefix = getattr(net, "num_prefix_tokens", 1)
        cls, mean = feats[:, 0], feats[:, prefix:].mean(dim=1)
        for pool in pools:
            out[pool] = {"cls": cls, "mean": mean, "gap": mean}.get(pool)
            if pool == "cls+mean":
                out[pool] = torch.cat([cls, mean], dim=1)
        if "last4" in wanted:  # class tokens of the last four blocks, each through the final norm
            blocks = net.forward_intermediates(x, indices=4, return_prefix_tokens=True, norm=True,
                                               intermediates_only=True)
            out["last4"] = torch.cat([tokens[:, 0] for _, tokens in blocks], dim=1)
        return out

    def feature_map(self, spec: BackboneSpec, net: Any, x: Any) -> Any:
        feats = net.forward_features(x)
        if feats.ndim != 4:
            raise WeightsUnavailable(f"{spec.name} is a ViT: its tokens are no CNN feature map")
        return feats


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


register_family(TimmFamily())
for _spec in (_dinov2("s", "vit_small_patch14_dinov2", 384), _dinov2("b", "vit_base_patch14_dinov2", 768),
              _dinov2("l", "vit_large_patch14_dinov2", 1024), _dinov2("g", "vit_giant_patch14_dinov2", 1536),
              _lite(0, 1280, (40, 112, 320)), _lite(1, 1280, (40, 112, 320)), _lite(2, 1280, (48, 120, 352))):
    register_backbone(_spec)
