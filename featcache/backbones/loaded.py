"""A loaded backbone: the frozen network with its poolings (asked of its family), its own preprocessing and where its
weights came from. Built by :func:`featcache.backbones.models.load_backbone`, or by a family that loads a whole
model folder itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featcache.backbones.registry import BackboneSpec
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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.spec.family.pool(self.spec, self.net, x, self.pools)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final CNN feature map (n, channels, h, w) whose spatial mean is the ``gap`` pooling: what a class
        activation map weighs. A ViT or the scattering transform has none (an error says so)."""
        return self.spec.family.feature_map(self.spec, self.net, x)
