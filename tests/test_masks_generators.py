"""The model-based mask generators (sam, sam2, mask2former, eomt): tiny random builds return region
maps painted / post-processed as the reference does, checked against the steps written out here;
missing weights fail with a clear line. (The folder generator: test_masks_folder.py; every generator
also runs through the registry's contract test.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dapseg.masks.base import MaskBuild, build_mask_generator, region_map_from_masks
from dapseg.weights import WeightsMissingError

TINY = MaskBuild(random_weights=True, tiny=True)
IMAGE = np.random.default_rng(0).integers(0, 256, (37, 52, 3), dtype=np.uint8)
LOOSE = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def require(module: str):
    """``module``, or a skip naming the extra that installs it (a failure under CI, where every extra is installed)."""
    import importlib
    import os

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            raise
        pytest.skip(f"{module} is not installed (pip install -e '.[masks]')")


def test_masks_are_painted_by_ascending_area_larger_over_smaller():
    """CorrCLIP: sorted(anns, key=area), ids 1.. in that order, each painted over the previous ones."""
    small = np.zeros((6, 8), bool)
    small[1:3, 1:3] = True  # area 4, inside big
    big = np.zeros((6, 8), bool)
    big[0:4, 0:5] = True  # area 20
    mid = np.zeros((6, 8), bool)
    mid[3:6, 4:8] = True  # area 12, overlapping big
    got = region_map_from_masks([big, small, mid], [20, 4, 12], (6, 8))
    want = np.zeros((6, 8), np.int64)  # written by hand: small=1, mid=2, big=3 painted last
    want[1:3, 1:3] = 1
    want[3:6, 4:8] = 2
    want[0:4, 0:5] = 3
    np.testing.assert_array_equal(got.numpy(), want)
    assert region_map_from_masks([], [], (2, 3)).eq(0).all()


def _painted(anns, size):
    out = np.zeros(size, dtype=int)
    for k, ann in enumerate(sorted(anns, key=lambda a: a["area"]), start=1):
        out[ann["segmentation"]] = k
    return out


@pytest.mark.parametrize("name", ["sam", "sam2"])
def test_automatic_mask_generators_paint_what_the_library_returns(name):
    require("sam2" if name == "sam2" else "segment_anything")
    torch.manual_seed(0)
    gen = build_mask_generator(name, LOOSE, TINY)
    got = gen(IMAGE)
    with torch.inference_mode():
        anns = gen.generator.generate(IMAGE)  # the library's own masks for the same image
    assert anns, "the loose thresholds keep at least one mask"
    np.testing.assert_array_equal(got.numpy(), _painted(anns, IMAGE.shape[:2]))


def test_sam2_defaults_are_corrclips_deployment_settings():
    from dapseg.masks.sam2 import Sam2Params

    p = Sam2Params()
    assert (p.model, p.points_per_side, p.pred_iou_thresh, p.stability_score_thresh, p.multimask_output) == (
        "sam2_hiera_l", 8, 0.4, 0.4, False)


class _DesignedOutputs(torch.nn.Module):
    """Stands in for the model: three queries with known classes and masks (left / right half of
    the padded input, and the right half again), the others "no object"."""

    def forward(self, pixel_values, **_):
        q, c = 6, 134  # queries; 133 COCO panoptic classes + no-object
        cls = torch.full((1, q, c), -20.0)
        cls[..., -1] = 20.0
        masks = torch.full((1, q, 32, 32), -20.0)
        for k, (label, cols) in enumerate([(5, slice(0, 16)), (100, slice(16, 32)), (100, slice(16, 32))]):
            cls[0, k] = -20.0
            cls[0, k, label] = 20.0 - k  # a thing, then the same stuff class twice
            masks[0, k, :, cols] = 20.0
        return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)


@pytest.mark.parametrize("name", ["mask2former", "eomt"])
def test_panoptic_generators_keep_the_post_processed_segment_ids(name):
    """Segment ids as the reference keeps them: Mask2Former 1.. (0 = none, no stuff fusing by default),
    EoMT 0.. with one id per stuff class (-1 = none); left and right of the image hold different ids."""
    torch.manual_seed(0)
    gen = build_mask_generator(name, {}, TINY)
    got = gen(IMAGE)
    assert got.shape == IMAGE.shape[:2] and got.dtype == torch.int64
    gen.model = _DesignedOutputs()
    got = gen(IMAGE).numpy()
    left, right = got[:, :4], got[:, -4:]
    # q0 (a thing) on the left; q1 and q2 (one stuff class, same mask: q1 wins every pixel) on the right
    want = (0, 1) if name == "eomt" else (1, 2)
    assert (left == want[0]).all() and (right == want[1]).all()
    assert set(np.unique(got)) == set(want)  # every pixel is covered: no "none" value


@pytest.mark.parametrize(("name", "source"), [
    ("sam2", "sam2_hiera_large.pt"),
    ("sam", "sam_vit_h_4b8939.pth"),
    ("mask2former", "facebook/mask2former-swin-large-coco-panoptic"),
    ("eomt", "tue-mps/coco_panoptic_eomt_large_640"),
])
def test_missing_weights_name_the_source_and_the_way_out(name, source):
    if name == "sam2":
        require("sam2")
    with pytest.raises(WeightsMissingError, match=rf"weights missing: .*{source}.*dapseg download"):
        build_mask_generator(name, {}, MaskBuild())
