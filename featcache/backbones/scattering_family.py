"""The scattering family: the wavelet scattering transform (Kymatio, 2-D), a backbone without weights, named
``scattering`` (J=3, L=8) or ``scattering_j<J>_l<L>``. Kymatio is imported when the transform is built."""

from __future__ import annotations

import importlib.util
import re
from typing import Any

from featcache.backbones.registry import BackboneFamily, BackboneSpec, register_backbone, register_family
from featcache.errors import WeightsUnavailable

# J scales, L orientations, on a 112 px square by default: padded to 128 px its FFTs run at 24 img/s on 2 cores,
# against 6 img/s at 224 (padded to 240).
SCATTERING = "scattering"
SCATTERING_DEFAULT = (3, 8)
SCATTERING_SIZE = 112
_NAME = re.compile(r"j(\d)_l(\d+)")


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


class ScatteringFamily(BackboneFamily):
    library = "kymatio"
    prefix = f"{SCATTERING}_"
    name_form = "scattering_j<J>_l<L>"

    def spec_for(self, target: str) -> BackboneSpec:
        match = _NAME.fullmatch(target)
        if not match:
            raise WeightsUnavailable(f"--backbone {self.prefix}{target}: write scattering (J=3, L=8) or "
                                     "scattering_j<J>_l<L>, e.g. scattering_j2_l6")
        j, l = int(match[1]), int(match[2])  # noqa: E741
        if not (1 <= j <= 6 and 1 <= l <= 16):
            raise WeightsUnavailable(f"--backbone {self.prefix}{target}: J must be 1..6 and L 1..16 (J={j}, L={l})")
        return scattering_spec(j, l)

    def torch_only(self, spec: BackboneSpec) -> str:
        return "its FFTs do not export to ONNX"

    def is_cnn(self, spec: BackboneSpec) -> bool:
        return False  # FFTs: channels_last gains nothing

    def weights_available(self, spec: BackboneSpec) -> str:
        missing = importlib.util.find_spec("kymatio") is None
        return "none needed (pip install 'featcache[scattering]')" if missing else "none needed"

    def build(self, spec: BackboneSpec) -> Any:
        from featcache.backbones.scattering import ScatteringTrunk

        return ScatteringTrunk(*spec.scattering, spec.crop_size)

    def weights_origin(self, spec: BackboneSpec, weights: str | None) -> str:
        """Where the filters come from: no weights (a weights file is refused)."""
        if weights:
            raise WeightsUnavailable(f"--weights {weights}: {spec.name} has no weights (its filters are fixed)")
        from importlib.metadata import version

        return f"none: Kymatio {version('kymatio')} scattering J={spec.scattering[0]} L={spec.scattering[1]}"

    def preprocess(self, spec: BackboneSpec, net: Any, origin: str) -> Any:
        from featcache.data.images import Preprocess

        # pixels in [0, 1]: the transform is defined on the image itself
        return Preprocess(spec.crop_size, spec.crop_size, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def feature_map(self, spec: BackboneSpec, net: Any, x: Any) -> Any:
        raise WeightsUnavailable(f"{spec.name}: the scattering transform has no feature map to weigh")


register_family(ScatteringFamily())
register_backbone(scattering_spec(*SCATTERING_DEFAULT))
