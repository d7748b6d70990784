"""``ModelBundle.reuse_for``: which models a bundle for another setting takes over, model by model.

The models are stand-ins (small ``nn.Linear``s, sentinels for the decoder, generator and text
embedder): the decision depends only on the configs, the VFM family's traits and the dtype the
weights are held in, which the stand-ins carry like the real models.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from dapseg.bundle import ModelBundle
from dapseg.config import SegmenterConfig, load_preset
from dapseg.models.vfm.base import FamilyTraits
from dapseg.precision import hold_weights

CPU = torch.device("cpu")
MODELS = ("clip", "vfm", "sam", "sam_decoder", "mask_generator", "text")


def stand_in(dtype: torch.dtype | None = None, *, sam_decoder: bool = False) -> nn.Module:
    module = hold_weights(nn.Linear(2, 2), dtype)
    module.traits = FamilyTraits(sam_decoder=sam_decoder)  # as build_vfm sets them
    return module


def bundle_for(config: SegmenterConfig, dtype: torch.dtype | None = None) -> ModelBundle:
    """A bundle as ``ModelBundle.build`` leaves it for ``config`` (a SAM decoder already built where there
    is a SAM), stand-ins inside."""
    sam_vfm = config.vfm is not None and config.vfm.name.startswith("sam")
    return ModelBundle(
        clip=stand_in(dtype), vfm=stand_in(dtype, sam_decoder=sam_vfm) if config.vfm else None,
        sam=stand_in(dtype, sam_decoder=True) if config.sam else None, sam_config=config.sam,
        vfm_config=config.vfm, _sam_decoder=object() if config.sam or sam_vfm else None,
        mask_generator=object() if config.masks else None,
        config=config, device=CPU, text=object(),
    )


def kept(bundle: ModelBundle, overrides: dict[str, Any]) -> set[str]:
    """The models handed over for ``overrides`` (each must be this bundle's own object)."""
    handed = bundle.reuse_for(bundle.config.with_overrides(overrides))
    own = {"clip": bundle.clip, "vfm": bundle.vfm, "sam": bundle.sam, "sam_decoder": bundle.built_sam_decoder,
           "mask_generator": bundle.mask_generator, "text": bundle.text}
    out = set()
    for name in MODELS:
        model = getattr(handed, name)
        if model is not None:
            assert model is own[name], name
            out.add(name)
    return out


# (preset, overrides) -> the models taken over; dap-splice has CLIP, a DINO VFM and a `sam:` SAM
SPLICE_TABLE = [
    ({"postprocess.prob_thd": 0.3}, {"clip", "vfm", "sam", "sam_decoder", "text"}),  # no masks: section
    ({"clip.model": "ViT-L-14"}, set()),  # another CLIP: nothing
    ({"vfm.name": "dino_vits16"}, {"clip", "sam", "sam_decoder", "text"}),
    ({"inference.crop": 448}, {"clip", "vfm", "sam", "sam_decoder", "text"}),  # DINO is fed at any size
    ({"sam.name": "sam_vitl"}, {"clip", "vfm", "text"}),  # the decoder goes with its encoder
    ({"templates": "single"}, {"clip", "vfm", "sam", "sam_decoder"}),
    # float32 models are handed over for bf16 (the new bundle converts copies); the text cache is not
    ({"inference.precision": "bf16"}, {"clip", "vfm", "sam", "sam_decoder"}),
    ({"inference.precision": "fp16"}, {"clip", "vfm", "sam", "sam_decoder"}),
    ({"inference.precision": "auto"}, {"clip", "vfm", "sam", "sam_decoder", "text"}),  # float32 on this CPU
]


@pytest.mark.parametrize(("overrides", "want"), SPLICE_TABLE, ids=[str(o) for o, _ in SPLICE_TABLE])
def test_reuse_table_for_clip_vfm_and_sam(overrides, want):
    assert kept(bundle_for(load_preset("dap-splice")), overrides) == want


def test_models_held_in_half_precision_are_rebuilt_for_another_dtype():
    config = load_preset("dap-splice", {"inference.precision": "bf16"})
    bundle = bundle_for(config, torch.bfloat16)
    assert kept(bundle, {"postprocess.prob_thd": 0.3}) == {"clip", "vfm", "sam", "sam_decoder", "text"}
    assert kept(bundle, {"inference.precision": "fp32"}) == set()  # an up-cast would keep bf16's rounding
    assert kept(bundle, {"inference.precision": "fp16"}) == set()


def test_a_vfm_built_at_the_window_size_is_rebuilt_for_another_crop():
    bundle = bundle_for(load_preset("dap-mae_vitb16"))
    assert kept(bundle, {"inference.crop": 448}) == {"clip", "text"}
    assert kept(bundle, {"inference.stride": 100}) == {"clip", "vfm", "text"}


def test_the_decoder_around_a_sam_vfm_goes_with_the_vfm():
    bundle = bundle_for(load_preset("dap-sam_vitb"))
    assert kept(bundle, {"head.params.beta": 1.0}) == {"clip", "vfm", "sam_decoder", "text"}
    assert kept(bundle, {"vfm.name": "sam_vitl"}) == {"clip", "text"}
    # a `sam:` section now: the decoder would go around that SAM, not the VFM
    assert kept(bundle, {"sam.name": "sam_vitb"}) == {"clip", "vfm", "text"}


def test_the_mask_generator_goes_with_its_section():
    bundle = bundle_for(load_preset("corrclip"))
    assert "mask_generator" in kept(bundle, {"inference.precision": "bf16"})  # it runs outside the precision
    assert "mask_generator" not in kept(bundle, {"masks.params.points_per_side": 4})


def test_a_bundle_put_together_by_hand_cannot_say():
    with pytest.raises(ValueError, match="reuse_for"):
        ModelBundle(clip=stand_in()).reuse_for(load_preset("clip"))
