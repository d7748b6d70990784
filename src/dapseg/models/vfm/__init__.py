"""Vision foundation models (VFMs), one module per family: ``dino``, ``dinov2``, ``dinov3``, ``mae``,
``sam``, ``sd`` (Stable Diffusion). Each holds its specs as data, its checkpoint filter and its forward, and registers itself in
``dapseg.registry.VFM_FAMILIES``; ``loading.build_vfm`` is generic (resolve, build, filter, strict
load). ``base`` has the common wrapper (see its docstring for which features each family gives).
"""

from dapseg.models.vfm.base import (
    IMAGENET_MEAN,
    FamilyTraits,
    IMAGENET_STD,
    VfmFamily,
    VfmOutput,
    VfmSpec,
    VisionFoundationModel,
)
from dapseg.models.vfm.loading import (
    build_vfm,
    cached_weights,
    fetch_weights,
    list_vfms,
    vfm_spec,
    vfm_traits,
)

__all__ = [
    "IMAGENET_MEAN",
    "FamilyTraits",
    "IMAGENET_STD",
    "VfmFamily",
    "VfmOutput",
    "VfmSpec",
    "VisionFoundationModel",
    "build_vfm",
    "cached_weights",
    "fetch_weights",
    "list_vfms",
    "vfm_spec",
    "vfm_traits",
]
