"""SAM prompt refinement (Trident §3.4): coarse class masks -> point / box / mask prompts -> SAM.

Usable after any strategy. Facts from the public reference (YuHengsss/Trident, ``sam_refinement``):

- work on the coarse map down-sampled by 2 (labels nearest, probabilities bilinear);
- pixels whose top class probability is below ``coarse_thresh`` belong to no class; a class whose
  probability never reaches ``coarse_thresh`` is skipped;
- each 8-connected region of a class with at least ``minimal_area`` pixels (at the down-sampled
  resolution) gives one prompt set: the point of highest class probability in the region
  (foreground label), the region's bounding box, and the class-wide mask prompt
  α · p_c · [p_c > coarse_thresh] (α = 0.005) on SAM's low-resolution mask frame;
- one decoder call per class (its regions batched), single-mask output;
- a region's SAM mask counts when SAM's predicted IoU exceeds ``iou_thresh`` (0.8 in the reference
  configs); per class the refined score is max over its regions of sigmoid(SAM logit) · p_c, inside
  the union of its masks (logit > 0);
- labels: argmax of the refined scores where any is positive, the coarse label elsewhere; the
  refined probabilities also take p_c back inside regions whose SAM mask failed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import measure
from torch import Tensor

from dapseg.models.sam.encoder import SamEncoding, encode_image, reference_sam_image
from dapseg.refine import Refined, RefineInput, Refiner
from dapseg.registry import REFINERS, Backbone, Need


class SamRefineParams(BaseModel):
    """``refine.params`` of ``refine.name: sam`` (reference defaults; coarse_thresh varies per dataset)."""

    model_config = ConfigDict(extra="forbid")

    coarse_thresh: float = Field(default=0.2, ge=0.0, le=1.0)  # VOC 0.2, Context 0.15, ADE/Stuff 0.05, ...
    minimal_area: int = Field(default=225, ge=0)  # pixels, at the down-sampled resolution
    alpha: float = 0.005  # weight of the mask prompt α·p_c
    iou_thresh: float = 0.8  # SAM's predicted IoU a mask must exceed to be used
    down_ratio: int = Field(default=2, ge=1)  # region extraction on the map down-sampled by this
    points: bool = True  # which prompts to give SAM (at least one)
    boxes: bool = True
    masks: bool = True
    chunk: int = Field(default=512, ge=1)  # SAM encoder attention rows per chunk (memory)


@dataclass
class ClassPrompts:
    """The prompts of one class, in (x, y) pixel coordinates of the map they were taken from."""

    cls: int
    regions: Tensor  # (R, h, w) bool, one connected region each
    points: Tensor  # (R, 2) float (x, y): the region's most confident pixel
    boxes: Tensor  # (R, 4) float (x1, y1, x2, y2), inclusive pixel extents, as torchvision masks_to_boxes
    mask: Tensor  # (h, w) float α · p_c where p_c > coarse_thresh, else 0


def extract_prompts(
    labels: Tensor, probs: Tensor, *, coarse_thresh: float, minimal_area: int, alpha: float
) -> list[ClassPrompts]:
    """Prompts per class from a coarse segmentation.

    labels (h, w) int64 class indices; probs (C, h, w) class probabilities. Returns one entry per
    class that has at least one region, in class order. Pure function (no SAM involved).
    """
    if labels.shape != probs.shape[1:]:
        raise ValueError(f"labels {tuple(labels.shape)} and probs {tuple(probs.shape)} disagree")
    num_classes = probs.shape[0]
    labels = labels.clone()
    if coarse_thresh > 0:
        labels[probs.max(0).values < coarse_thresh] = num_classes  # no class
    lab_np = labels.cpu().numpy()
    out: list[ClassPrompts] = []
    for c in range(num_classes):
        p = probs[c]
        if float(p.max()) < coarse_thresh:
            continue
        components = measure.label(lab_np == c, connectivity=2)  # 8-connectivity
        areas = np.bincount(components.ravel())
        regions, points, boxes = [], [], []
        for r in range(1, len(areas)):
            if areas[r] < minimal_area:
                continue
            region = torch.from_numpy(components == r).to(p.device)
            ys, xs = torch.nonzero(region, as_tuple=True)
            best = torch.argmax(p[ys, xs])  # first maximum in raster order
            regions.append(region)
            points.append(torch.stack([xs[best], ys[best]]).float())
            boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
        if regions:
            mask = torch.where(p > coarse_thresh, alpha * p, torch.zeros_like(p))
            out.append(ClassPrompts(c, torch.stack(regions), torch.stack(points), torch.stack(boxes), mask))
    return out


def _mask_prompt(mask: Tensor, frame: int, transform: ResizeLongestSide) -> Tensor:
    """(h, w) map -> SAM's (1, frame, frame) low-resolution mask input (resized long side, padded)."""
    h, w = mask.shape
    nh, nw = transform.get_preprocess_shape(h, w, frame)
    m = F.interpolate(mask[None, None].float(), (nh, nw), mode="bilinear", align_corners=False)
    return F.pad(m, (0, frame - nw, 0, frame - nh))[0]


def set_encoding(predictor: SamPredictor, enc: SamEncoding) -> None:
    """Give ``predictor`` an image already encoded by ``encode_image`` (the encoder runs once)."""
    predictor.reset_image()
    predictor.features = enc.features.to(next(predictor.model.mask_decoder.parameters()).dtype)
    predictor.input_size = enc.input_size
    predictor.original_size = enc.original_size
    predictor.is_image_set = True


class SamPromptRefiner:
    """Refine a coarse segmentation with SAM prompts; SAM's image encoding may be shared (splice)."""

    name = "sam"

    def __init__(self, sam: Sam, params: SamRefineParams | dict | None = None, multiple: int = 16):
        self.params = params if isinstance(params, SamRefineParams) else SamRefineParams(**(params or {}))
        if not (self.params.points or self.params.boxes or self.params.masks):
            raise ValueError("SAM refinement needs at least one of points, boxes, masks")
        self.sam = sam
        self.predictor = SamPredictor(sam)
        self.multiple = multiple  # a uint8 image's sides are rounded up to this (the CLIP patch) for SAM

    @torch.no_grad()
    def __call__(
        self, image: Tensor | np.ndarray, labels: Tensor, probs: Tensor, encoding: SamEncoding | None = None
    ) -> tuple[Tensor, Tensor]:
        """labels (H, W); probs (C, H, W) -> refined (labels, probs).

        image: (H, W, 3) uint8 RGB, the original as loaded — SAM then sees it as in the Trident
        reference (sides rounded up to multiples of ``multiple`` with cv2, segment-anything's own
        resize and normalisation) and its masks are resized back to (H, W) bilinearly; or (3, H, W)
        in [0, 1], encoded as is (torch resize). ``encoding``: a SAM encoding of that image to reuse.
        """
        p = self.params
        H, W = labels.shape
        size = image.shape[:2] if isinstance(image, np.ndarray) else image.shape[-2:]
        if tuple(size) != (H, W):
            raise ValueError(f"image {tuple(size)} and labels {(H, W)} differ in size")
        if encoding is None:
            sam_input = reference_sam_image(image, self.multiple) if isinstance(image, np.ndarray) else image
            encoding = encode_image(self.sam, sam_input, chunk=p.chunk)
        set_encoding(self.predictor, encoding)
        dev = self.predictor.device

        dh, dw = max(1, H // p.down_ratio), max(1, W // p.down_ratio)
        labels_d = F.interpolate(labels[None, None].float(), (dh, dw), mode="nearest")[0, 0].long()
        probs_d = F.interpolate(probs[None].float(), (dh, dw), mode="bilinear", align_corners=False)[0]
        prompts = extract_prompts(labels_d, probs_d, coarse_thresh=p.coarse_thresh,
                                  minimal_area=p.minimal_area, alpha=p.alpha)

        probs = probs.float()
        refined = torch.zeros_like(probs)  # (C, H, W)
        failed = torch.zeros((dh, dw), dtype=torch.bool, device=probs.device)
        transform = self.predictor.transform
        frame = self.sam.prompt_encoder.mask_input_size[0]
        for cp in prompts:
            r = cp.points.shape[0]
            coords = transform.apply_coords_torch(cp.points.to(dev), (dh, dw))[:, None] if p.points else None
            plabels = torch.ones((r, 1), device=dev) if p.points else None
            boxes = transform.apply_boxes_torch(cp.boxes.to(dev), (dh, dw)) if p.boxes else None
            mask_in = None
            if p.masks:
                mask_in = _mask_prompt(cp.mask, frame, transform).to(dev).expand(r, 1, frame, frame)
            logits, iou, _ = self.predictor.predict_torch(
                coords, plabels, boxes=boxes, mask_input=mask_in, multimask_output=False, return_logits=True
            )  # logits (R, 1, H, W), iou (R, 1)
            ok = (iou[:, 0] > p.iou_thresh).to(probs.device)
            if not bool(ok.all()):
                failed |= cp.regions[~ok].any(0).to(failed.device)
            if not bool(ok.any()):
                continue
            lg = logits[ok.to(logits.device), 0].float().to(probs.device)  # (R', H_sam, W_sam)
            if lg.shape[-2:] != (H, W):  # SAM saw the image rounded up to the patch multiple
                lg = F.interpolate(lg[None], (H, W), mode="bilinear", align_corners=False)[0]
            score = (torch.sigmoid(lg) * probs[cp.cls]).amax(0)
            union = (lg > self.sam.mask_threshold).any(0)
            refined[cp.cls] = score * union

        any_refined = refined.sum(0) > 0
        new_labels = torch.where(any_refined, refined.argmax(0), labels)
        if bool(failed.any()):
            failed_full = F.interpolate(failed[None, None].float(), (H, W), mode="nearest")[0, 0].bool()
            refined = torch.maximum(refined, probs * failed_full)
        new_probs = torch.where((refined.sum(0) > 0)[None], refined, probs)
        return new_labels, new_probs


@REFINERS.register("sam", params=SamRefineParams, needs={Need.SAM_DECODER, Need.BACKBONE},
                   description="SAM prompted by the coarse class regions (Trident)")
def build_sam_refiner(
    p: SamRefineParams, *, sam_decoder: Sam | None = None, backbone: Backbone | None = None
) -> Refiner:
    """The ``refine.name: sam`` refiner around ``sam_decoder`` (a full ``Sam``, decoder included);
    ``backbone`` gives the CLIP patch size the image's sides are rounded up to for SAM.

    Returns the refined class probabilities and the labels SAM decided.
    """
    from dapseg.models.sam.memory import check_encode_memory

    if sam_decoder is None:
        raise ValueError("refine.name=sam needs a SAM model: add `sam: {name: sam_vitb}` to the config")
    check_encode_memory(sam_decoder, chunk=p.chunk)  # before the first image, not halfway through a dataset
    multiple = backbone.clip_patch_size if backbone is not None else 16
    refiner = SamPromptRefiner(sam_decoder, p, multiple)

    def refine(inp: RefineInput) -> Refined:
        new_labels, new_probs = refiner(np.ascontiguousarray(inp.image, dtype=np.uint8), inp.labels, inp.probs)
        # SAM's scores σ(logit)·p_c are not a distribution: renormalise per pixel (C, H, W).
        return Refined(probs=new_probs / new_probs.sum(0, keepdim=True).clamp_min(1e-30), labels=new_labels)

    return refine
