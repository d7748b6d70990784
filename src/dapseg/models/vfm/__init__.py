"""Vision foundation models (VFMs), one module per family: ``dino``, ``dinov2``, ``dinov3``, ``mae``,
``sam``, ``sd`` (Stable Diffusion). Each holds its specs as data, its weights source (``sources``), its
checkpoint filter, its forward, its ``vfm.params`` model and its traits, and registers itself in
``dapseg.registry.VFM_FAMILIES``; ``loading.build_vfm`` is generic (resolve, fetch, build, filter,
strict load, wrap). ``base`` has the common wrapper (see its docstring for which features each family
gives).
"""

from dapseg.models.vfm.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FamilyTraits,
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
    "IMAGENET_STD",
    "FamilyTraits",
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
