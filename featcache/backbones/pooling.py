"""Poolings shared by the CNN families: the global averages of a network's last stages."""

from __future__ import annotations

import torch


def layer_pools(final: torch.Tensor, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """gap of the final map, penult of the stage before it, multi of the last three stages + gap."""
    gap = final.mean(dim=(2, 3))
    averaged = [s.mean(dim=(2, 3)) for s in stages[-3:]]
    return {"gap": gap, "penult": averaged[-1], "multi": torch.cat([*averaged, gap], dim=1)}
