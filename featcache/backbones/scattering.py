"""The wavelet scattering transform as a backbone trunk (Kymatio): fixed Morlet filters, no weights."""

from __future__ import annotations

import torch
from torch import nn

from featcache.errors import WeightsUnavailable


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
