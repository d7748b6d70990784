"""The proxyclip / dap presets end to end on a real photo, tiny random-weight models."""

from __future__ import annotations

import torch
from skimage import data

from dapseg.api import Segmenter
from dapseg.config import list_presets

CLASSES = ["person", "sky", "rocket; spaceship"]
SMALL = {"inference.short_side": 224, "inference.crop": 224, "inference.stride": 112}


def test_proxyclip_and_dap_presets_segment_a_photo():
    image = data.astronaut()[::4, ::4]  # 128 x 128, resized to 224
    proxy = Segmenter.from_preset("proxyclip", random_weights=True, tiny=True, device="cpu", overrides=SMALL)
    res = proxy.predict(image, CLASSES)
    assert res.labels.shape == (128, 128) and res.probs.shape == (3, 128, 128)
    assert torch.isfinite(res.logits).all() and res.labels.max() < 3
    # DAP reduced to the proxy head gives the proxy head's logits, through the whole pipeline
    same = proxy.derive({"head.name": "dap", "head.params": {"knn": 0, "regions": "none", "steps": 1}})
    torch.testing.assert_close(same.predict(image, CLASSES).logits, res.logits)
    dap = Segmenter.from_preset("dap", random_weights=True, tiny=True, device="cpu", overrides=SMALL)
    assert dap.config.head.params["regions"] == "slic"
    for regions in ("slic", "kmeans"):
        out = dap.derive({"regions": regions, "knn": 16, "steps": 2}).predict(image, CLASSES)
        assert out.labels.shape == (128, 128) and torch.isfinite(out.logits).all()
        assert not torch.allclose(out.logits, res.logits)


def test_every_vfm_has_proxyclip_and_dap_presets():
    from dapseg.models.vfm import list_vfms

    presets = set(list_presets())
    for vfm in list_vfms():
        assert {f"proxyclip-{vfm}", f"dap-{vfm}", f"dap-{vfm}-fsa"} <= presets


def test_dap_with_sam_regions_through_the_segmenter():
    """regions=sam binds SAM's automatic mask generator around the configured SAM encoder."""
    import pytest

    from dapseg.heads.regions import SamRegions

    with pytest.raises(ValueError, match="head 'dap' needs a SAM model"):
        Segmenter.from_preset("dap", random_weights=True, tiny=True, overrides={"head.params.regions": "sam"})
    seg = Segmenter.from_preset(
        "dap", random_weights=True, tiny=True,
        overrides={"head.params.regions": "sam", "head.params.sam_points_per_side": 2,
                   "sam": {"name": "sam_vitb"}, "inference.short_side": 64, "inference.crop": 64,
                   "inference.stride": 32},
    )
    assert isinstance(seg.head.region_provider, SamRegions)
    out = seg.predict(data.coffee()[::6, ::6], ["cup", "table"])
    assert out.labels.shape == (67, 100)
    assert torch.isfinite(out.probs).all()


def test_prebuilt_models_are_used_as_given():
    """``Segmenter(config, models=PrebuiltModels(...))``: the models handed in are the ones used (same
    objects, same logits); a SAM may be handed in without a `sam:` section."""
    from dapseg.api import PrebuiltModels
    from dapseg.models.sam.build import tiny_sam

    image = data.astronaut()[::4, ::4]
    first = Segmenter.from_preset("proxyclip", random_weights=True, tiny=True, device="cpu", overrides=SMALL)
    second = Segmenter(first.config, random_weights=True, tiny=True, device="cpu",
                       models=PrebuiltModels(clip=first.clip, vfm=first.vfm))
    assert second.clip is first.clip and second.vfm is first.vfm
    torch.testing.assert_close(second.predict(image, CLASSES).logits, first.predict(image, CLASSES).logits)
    sam = tiny_sam(img_size=64)
    with_sam = Segmenter(first.config.with_overrides({"refine.name": "sam"}), random_weights=True, tiny=True,
                         device="cpu", models=PrebuiltModels(clip=first.clip, vfm=first.vfm, sam=sam.image_encoder,
                                                             sam_decoder=sam))
    assert with_sam.sam is sam.image_encoder and with_sam.models.sam_decoder() is sam
