"""Stage 2, the backbones: the registry (names, poolings, dimensions; no torch import), building a frozen
network with its own preprocessing (models), and its weights (weights)."""

# Each family registers itself and the models it names when its module is imported (no torch at import): the order
# is the order `featcache backbones` lists them in.
from featcache.backbones import timm_family, torchvision_family, scattering_family, hub_family  # noqa: E402, F401, I001
