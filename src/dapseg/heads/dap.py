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

Per window (``attention``) W is a matrix (plug-ins may rework it); over the stitched tokens of a
whole image (``stitched``) the same steps run on W's rows ``chunk`` at a time and apply
step 4 to W·y instead of W: ((1−ρ)W + ρPW)·y = (1−ρ)·W·y + ρ·P·(W·y).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from dapseg.heads.affinity import (
    MEAN_SCOPE_HELP,
    MeanScope,
    ProxyAffinity,
    affinity_mean,
    normalized_patches,
    patch_values,
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
from dapseg.heads.stitched import StitchedTokens, rows_times
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

    def affinity(self, ctx: HeadContext, mean: Tensor | None, chunk: int | None = None) -> ProxyAffinity:
        """Steps 1–3: W, the proxy attention (+ mutual k-NN) of the VFM features of ``ctx``, rows on demand."""
        p = self.params
        return ProxyAffinity(ctx.vfm_feats, beta=p.beta, gamma=p.gamma, knn=p.knn, mean=mean, chunk=chunk)

    def region_consistency(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Step 4 on x (B, N', K): (1−ρ)·x + ρ·P·x, in place; x unchanged without regions (labels None).

        With x = W this is W ← (1−ρ)W + ρPW, still row-stochastic; with x = W·y it is that W applied
        to y, without W."""
        if labels is None:
            return x
        px = region_mean(x, labels)  # P·x, before x is scaled in place
        return x.mul_(1 - self.params.rho).add_(px, alpha=self.params.rho)

    def propagate(self, step: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        """Step 5: z = W·(W·(…(W·v))), ``step`` (y ↦ W·y) applied ``steps`` times, never a matrix power."""
        z = v
        for _ in range(self.params.steps):
            z = step(z)
        return z

    def _uses_regions(self) -> bool:
        return self.params.regions != "none" and self.params.rho > 0

    def attention(self, ctx: HeadContext) -> Attention:
        p = self.params
        grid = vfm_grid(ctx, self.name)
        w = self.affinity(ctx, affinity_mean(ctx, self.name, p.mean_scope)).matrix()  # (B, N', N')
        labels = self.region_labels(ctx, grid).to(w.device) if self._uses_regions() else None
        w = self.region_consistency(w, labels)
        return Attention(attn=w.unsqueeze(1), v=patch_values(ctx, grid), grid=grid, has_cls=False)

    def aggregate(self, a: Attention) -> Tensor:
        """z = W·(W·(…(W·v))) with W applied ``steps`` times: (B, N', D)."""
        attn = a.attn.to(a.v.dtype)  # cast once, not per step
        return merge_heads(self.propagate(lambda z: attend(attn, z), a.v))  # W shared by all heads

    def stitched(self, block: nn.Module, st: StitchedTokens, chunk: int) -> tuple[Tensor, tuple[int, int]]:
        """Over all stitched VFM patches, mean(S) over the image (now the one window), regions from the
        whole image: y ← (1−ρ)·W·y + ρ·P·(W·y), ``steps`` times: (N', D) on (gh', gw')."""
        ctx = st.context(block)
        grid = vfm_grid(ctx, self.name)
        rows = self.affinity(ctx, None, chunk).rows  # (1, n, N')
        v = patch_values(ctx, grid)[0]  # (heads, N', d)
        heads, n, d = v.shape
        labels = self.image_regions(ctx, grid, st.window_area).to(v.device) if self._uses_regions() else None

        def step(y: Tensor) -> Tensor:  # (heads, N', d) -> (1−ρ)·W·y + ρ·P·(W·y), P on all heads at once
            wy = rows_times(rows, y, chunk).transpose(0, 1).reshape(1, n, heads * d)
            return self.region_consistency(wy, labels).reshape(n, heads, d).transpose(0, 1)

        return block.attn.out_proj(merge_heads(self.propagate(step, v)[None]))[0], grid

    def image_regions(self, ctx: HeadContext, grid: tuple[int, int], window_area: int) -> Tensor:
        """Regions of the whole image ``ctx`` (one window) on ``grid``: (1, N').

        ``n_segments`` (SLIC) and ``n_regions`` (k-means) are counts *per window*: scaled by
        image area / window area so regions keep the size they have in slide mode.
        """
        p = self.params
        if ctx.images is None:
            raise ValueError("dap head with regions in inference.mode=stitch needs the image (StitchedTokens.image)")
        ratio = ctx.images.shape[-2] * ctx.images.shape[-1] / max(window_area, 1)
        params = p.model_copy(update={"n_segments": max(1, round(p.n_segments * ratio)),
                                      "n_regions": max(1, round(p.n_regions * ratio))})
        return DapHead(params, region_provider=self.region_provider).region_labels(ctx, grid)


# the region maps (SLIC, k-means or SAM masks pooled onto the VFM grid), timed by `dapseg bench` as their own stage
HEADS.attach("dap", stages={"regions": ("DapHead.region_labels",)})
