"""DAP: Dense Aggregation via Proxies, the headline head (docs/design.md, "Heads").

1. affinity as the proxy head: A = γ(S − β·mean(S)) on the VFM grid, mean per window (or over
   all windows of the image with mean_scope="image", as Trident);
2. neighbourhoods: keep A_ij ≥ 0 and, if knn > 0, mutual k-nearest neighbours under S; a row
   left empty keeps its largest entries (as the proxy head);
3. W = row softmax of A over the kept entries;
4. region consistency (regions != none): W ← (1−ρ)·W + ρ·P·W, P the region-averaging matrix of a
   region map on the VFM grid (SLIC superpixels, k-means of x̂, or SAM automatic masks);
5. propagation z = W·(W·(…(W·v))), ``steps`` times, never a matrix power;
6. out = out_proj(z).

With knn = 0, regions = none, steps = 1 this is exactly the proxy head.

Regions from SAM need a SAM model, which a head does not own: the pipeline (or the user) sets
``head.region_provider`` (any callable images (B, 3, H, W) in [0, 1] -> labels (B, H, W), -1 =
no region; ``regions.SamRegions`` wraps segment-anything's automatic mask generator) or calls
``head.bind_sam(sam)``. SLIC and SAM regions need the window pixels (HeadContext.images).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dapseg.heads.affinity import (
    MEAN_SCOPE_HELP,
    MeanScope,
    affinity_mean,
    normalized_patches,
    patch_values,
    proxy_attention,
    vfm_grid,
)
from dapseg.heads.base import Attention, Head, HeadContext, attend, merge_heads, register_head
from dapseg.heads.regions import (
    RegionProvider,
    SamRegions,
    consecutive,
    kmeans_labels,
    pool_labels_to_grid,
    region_mean,
    slic_labels,
    slic_skimage,
)
from dapseg.registry import HEADS, Need


@register_head
class DapHead(Head):
    """Dense Aggregation via Proxies."""

    name = "dap"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        beta: float = Field(1.2, ge=0, description="shift β of the proxy affinity")
        gamma: float = Field(3.0, gt=0, description="scale γ of the proxy affinity")
        knn: int = Field(0, ge=0, description="mutual k-NN neighbourhoods under S; 0 = off; > N' clamped")
        regions: Literal["none", "slic", "slic_skimage", "kmeans", "sam"] = Field(
            "slic", description="region source (slic: torch on the models' device; slic_skimage: scikit-image's)"
        )
        rho: float = Field(0.5, ge=0, le=1, description="weight of region averaging: (1−ρ)W + ρPW")
        n_regions: int = Field(16, ge=1, description="k-means clusters per window (> N' clamped)")
        kmeans_iters: int = Field(10, ge=1, description="Lloyd iterations of the k-means")
        n_segments: int = Field(64, ge=1, description="SLIC: approximate superpixels per window")
        compactness: float = Field(10.0, gt=0, description="SLIC: colour vs space trade-off")
        sam_points_per_side: int = Field(16, ge=1, description="SAM regions: point grid per side")
        sam_pred_iou_thresh: float = Field(0.88, ge=0, le=1, description="SAM regions: mask quality cut")
        sam_stability_thresh: float = Field(0.95, ge=0, le=1, description="SAM regions: stability cut")
        steps: int = Field(1, ge=1, description="propagation steps z = W(W(…W v))")
        mean_scope: MeanScope = Field("window", description=MEAN_SCOPE_HELP)

    def __init__(
        self,
        params: Params | None = None,
        region_provider: RegionProvider | None = None,
        *,
        sam_decoder: Any = None,
    ) -> None:
        """``sam_decoder``: a segment-anything ``Sam`` whose automatic masks are the regions of
        ``regions='sam'`` (the pipeline hands it over because the head declares ``Need.SAM_DECODER``)."""
        super().__init__()
        self.params = params or self.Params()
        self.region_provider = region_provider
        if sam_decoder is not None and region_provider is None:
            self.bind_sam(sam_decoder)

    @staticmethod
    def declared_needs(params: Params) -> frozenset[Need]:
        """VFM features; the window pixels for SLIC / SAM regions; SAM with its decoder for SAM regions;
        the image-wide mean similarity with ``mean_scope='image'``."""
        needs = {Need.VFM_FEATURES}
        if params.rho > 0 and params.regions in ("slic", "slic_skimage", "sam"):
            needs.add(Need.WINDOW_PIXELS)
        if params.rho > 0 and params.regions == "sam":
            needs.add(Need.SAM_DECODER)
        if params.mean_scope == "image":
            needs.add(Need.AFFINITY_MEAN)
        return frozenset(needs)

    def bind_sam(self, sam: Any) -> None:
        """Use SAM automatic masks (segment-anything ``Sam``) as the regions of ``regions='sam'``."""
        p = self.params
        self.region_provider = SamRegions(
            sam,
            points_per_side=p.sam_points_per_side,
            pred_iou_thresh=p.sam_pred_iou_thresh,
            stability_score_thresh=p.sam_stability_thresh,
        )

    def region_labels(self, ctx: HeadContext, grid: tuple[int, int]) -> Tensor:
        """Region of every VFM patch, 0..R-1 per window: (B, N') int64."""
        p = self.params
        if p.regions == "kmeans":
            assert ctx.vfm_feats is not None
            labels = kmeans_labels(normalized_patches(ctx.vfm_feats), p.n_regions, p.kmeans_iters)
            return consecutive(labels)
        if ctx.images is None:
            raise ValueError(
                f"dap head with regions={p.regions!r} needs the window pixels (HeadContext.images)"
            )
        if ctx.images.shape[0] != ctx.x.shape[0]:
            raise ValueError(f"dap head: {ctx.images.shape[0]} window images for {ctx.x.shape[0]} windows")
        if p.regions in ("slic", "slic_skimage"):
            slic = slic_labels if p.regions == "slic" else slic_skimage
            pixel_labels = slic(ctx.images, p.n_segments, p.compactness)
        else:
            if self.region_provider is None:
                raise ValueError(
                    "dap head with regions='sam' needs a SAM model: configure a `sam:` section "
                    "(the pipeline calls head.bind_sam) or set head.region_provider"
                )
            pixel_labels = self.region_provider(ctx.images)
        return consecutive(pool_labels_to_grid(pixel_labels, grid).flatten(1))

    def attention(self, ctx: HeadContext) -> Attention:
        p = self.params
        grid = vfm_grid(ctx, self.name)
        mean = affinity_mean(ctx, self.name, p.mean_scope)
        w = proxy_attention(ctx.vfm_feats, beta=p.beta, gamma=p.gamma, knn=p.knn, mean=mean)  # (B, N', N')
        if p.regions != "none" and p.rho > 0:
            pw = region_mean(w, self.region_labels(ctx, grid).to(w.device))  # P·W
            w = w.mul_(1 - p.rho).add_(pw, alpha=p.rho)  # (1−ρ)·W + ρ·P·W, still row-stochastic
        return Attention(attn=w.unsqueeze(1), v=patch_values(ctx, grid), grid=grid, has_cls=False)

    def aggregate(self, a: Attention) -> Tensor:
        """z = W·(W·(…(W·v))) with W applied ``steps`` times: (B, N', D)."""
        attn, z = a.attn.to(a.v.dtype), a.v  # cast once, not per step
        for _ in range(self.params.steps):
            z = attend(attn, z)  # W shared by all heads: no per-head copy of W
        return merge_heads(z)


# the region maps (SLIC, k-means or SAM masks pooled onto the VFM grid), timed by `dapseg bench` as their own stage
HEADS.attach("dap", stages={"regions": ("DapHead.region_labels",)})
