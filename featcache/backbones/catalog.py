# ruff: noqa: I001 - the families are imported in the order they are listed
"""The backbones on offer: every family featcache ships, registered, and the lookups that read them.

Each family module registers itself and the models it names when it is imported (:mod:`featcache.backbones.registry`
holds the mechanism, and imports no family); this module imports them all, in the order `featcache backbones`
lists them, so that whoever looks a backbone up here finds every one. No torch is imported.
"""

from __future__ import annotations

# in the order `featcache backbones` lists them (they register when imported)
from featcache.backbones import timm_family, torchvision_family, scattering_family, hub_family  # noqa: F401
from featcache.backbones.registry import (  # noqa: F401 - the lookups, with every family registered
    FAMILIES,
    NOT_LOADABLE,
    REGISTRY,
    canonical_name,
    get_spec,
    weights_available,
)
