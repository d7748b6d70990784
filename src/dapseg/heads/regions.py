"""Region maps on the VFM grid and region averaging, for DAP's region-consistency step.

A region map gives every VFM patch of a window a region id: ``labels`` (B, h', w') int64. The
region-averaging matrix P (P_ij = 1/|r(i)| when r(i) = r(j), else 0) is never built: P·X is the
mean of X's rows over each region, scattered back to the region's patches (``region_mean``).

Sources of regions:
- SLIC superpixels of the window pixels, majority-pooled onto the VFM grid: in torch on the
  windows' device (``slic_labels``, the default), or scikit-image's on the CPU (``slic_skimage``);
- k-means of the ℓ2-normalised VFM features (torch, deterministic);
- SAM automatic masks (segment-anything's SamAutomaticMaskGenerator), via ``SamRegions``.

A pixel-level map may mark pixels that belong to no region with -1 (SAM covers only part of an
image); a patch whose majority is -1 becomes a region of its own, so region averaging leaves it
alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dapseg.heads.slic import slic_labels, slic_skimage

__all__ = [
    "RegionProvider", "SamRegions", "consecutive", "kmeans_labels", "pool_labels_to_grid", "region_mean",
    "slic_labels", "slic_skimage",
]

# images (B, 3, H, W) in [0, 1] -> pixel region labels (B, H, W) int64, -1 = no region
RegionProvider = Callable[[Tensor], Tensor]


def pool_labels_to_grid(labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """Majority-pool pixel labels (B, H, W) onto the patch grid: -> (B, h', w') int64.

    Pixel (y, x) falls in cell (⌊y·h'/H⌋, ⌊x·w'/W⌋), so the grid tiles the whole window even when
    H is not a multiple of h'. Ties go to the smallest label. Cells whose majority is -1 get a
    fresh label each (they are regions of one patch).
    """
    b, height, width = labels.shape
    gh, gw = grid
    if height < gh or width < gw:
        raise ValueError(f"a {height}x{width} label map cannot be pooled onto a finer {gh}x{gw} grid")
    rows = torch.arange(height, device=labels.device) * gh // height  # (H,)
    cols = torch.arange(width, device=labels.device) * gw // width  # (W,)
    cell = (rows[:, None] * gw + cols[None, :]).flatten()  # (H·W,) cell of each pixel
    n = gh * gw
    out = torch.empty(b, n, dtype=torch.int64, device=labels.device)
    for i in range(b):
        lab = labels[i].flatten().long() + 1  # 0 = "no region"
        n_lab = int(lab.max()) + 1
        votes = torch.bincount(cell * n_lab + lab, minlength=n * n_lab).view(n, n_lab)
        best = votes.argmax(dim=1) - 1  # first maximum: the smallest label wins ties
        alone = best < 0
        best[alone] = n_lab + torch.arange(int(alone.sum()), device=labels.device)
        out[i] = best
    return out.view(b, gh, gw)


def consecutive(labels: Tensor) -> Tensor:
    """Relabel each window's regions 0..R-1 (R <= N'): (B, N') -> (B, N') int64."""
    return torch.stack([torch.unique(row, return_inverse=True)[1] for row in labels]).long()


def region_mean(x: Tensor, labels: Tensor) -> Tensor:
    """P·X without P: each row of X replaced by the mean of X's rows over its region.

    x: (B, N', K), labels: (B, N') int64 with values in [0, N'). Returns (B, N', K), O(B·N'·K).
    """
    b, n, k = x.shape
    ids = (labels + torch.arange(b, device=x.device)[:, None] * n).flatten()  # (B·N',) global region
    sums = torch.zeros(b * n, k, dtype=x.dtype, device=x.device).index_add_(0, ids, x.reshape(b * n, k))
    counts = torch.bincount(ids, minlength=b * n).clamp_min(1).to(x.dtype)
    return (sums / counts[:, None])[ids].view(b, n, k)


def kmeans_labels(x: Tensor, k: int, iters: int) -> Tensor:
    """k-means of patch features x (B, N', C) -> cluster per patch (B, N') int64.

    Deterministic: the initial centres are the patches at evenly spaced raster positions (so they
    are spread over the window), then ``iters`` Lloyd steps on squared Euclidean distance; ties go
    to the lowest cluster; an empty cluster keeps its centre. ``k`` larger than N' is clamped.
    """
    k = max(1, min(k, x.shape[1]))
    x = x.float()
    with torch.autocast(x.device.type, enabled=False):  # float32 distances under autocast too
        return _lloyd(x, k, iters)


def _lloyd(x: Tensor, k: int, iters: int) -> Tensor:
    """``iters`` Lloyd steps from evenly spaced raster centres: x (B, N', C) float32 -> (B, N')."""
    b, n, _ = x.shape
    start = (torch.arange(k, device=x.device) * n) // k  # (k,) evenly spaced patch indices
    centres = x[:, start].clone()  # (B, k, C)
    x2 = (x * x).sum(-1, keepdim=True)  # (B, N', 1)
    labels = torch.zeros(b, n, dtype=torch.int64, device=x.device)
    for step in range(iters + 1):
        dist = x2 - 2 * torch.bmm(x, centres.transpose(1, 2)) + (centres * centres).sum(-1)[:, None, :]
        labels = dist.argmin(dim=-1)  # (B, N')
        if step == iters:
            break
        # cluster sums as a (k x N') one-hot product: faster on CPU than index_add_ with few targets
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype).transpose(1, 2)  # (B, k, N')
        counts = onehot.sum(-1)  # (B, k)
        means = torch.bmm(onehot, x) / counts.clamp_min(1)[..., None]
        centres = torch.where(counts[..., None] > 0, means, centres)
    return labels


class _EncoderAtItsDtype(torch.nn.Module):
    """SAM's image encoder under autocast at the dtype its weights are held in, giving float32
    embeddings (the prompt decoder after it runs in float32); as it is for float32 weights."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.img_size = encoder.img_size  # what SamPredictor reads

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.encoder.patch_embed.proj.weight.dtype
        if dtype == torch.float32:
            return self.encoder(x)
        with torch.autocast(x.device.type, dtype=dtype):
            return self.encoder(x).float()  # (B, 256, 64, 64)


def automatic_mask_generator(sam: Any, **generator_kwargs: Any) -> Any:
    """segment-anything's ``SamAutomaticMaskGenerator`` around the full ``Sam`` ``sam``, for
    ``generate_masks``: the image encoder at the dtype its weights are held in, the prompt decoder
    (shared with ``sam``) in float32."""
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import Sam

    if not isinstance(sam, Sam):
        raise TypeError(f"SAM automatic masks need a segment_anything Sam model (encoder + decoder), got "
                        f"{type(sam).__name__}")
    model = Sam(image_encoder=_EncoderAtItsDtype(sam.image_encoder), prompt_encoder=sam.prompt_encoder,
                mask_decoder=sam.mask_decoder, pixel_mean=sam.pixel_mean.flatten().tolist(),
                pixel_std=sam.pixel_std.flatten().tolist()).eval().to(sam.pixel_mean.device)
    return SamAutomaticMaskGenerator(model, **generator_kwargs)


@torch.no_grad()
def generate_masks(generator: Any, image: np.ndarray) -> list[dict[str, Any]]:
    """The generator's mask records for an (H, W, 3) uint8 image, its prompt decoder in float32 under any
    autocast: the IoU and stability cut-offs compare values near them, and the library converts its
    outputs to numpy, which has no bf16."""
    with torch.autocast(generator.predictor.device.type, enabled=False):
        return generator.generate(image)


class SamRegions:
    """Region provider from SAM's automatic masks (segment-anything), as CorrCLIP uses them.

    ``sam``: a ``segment_anything.modeling.Sam`` (image encoder + prompt encoder + mask decoder).
    Masks are painted largest first, so a smaller mask inside a larger one wins; pixels no mask
    covers are -1. The prompt decoder runs in float32 whatever the precision (``generate_masks``).
    Keyword arguments go to ``SamAutomaticMaskGenerator`` (points_per_side, pred_iou_thresh, ...).
    """

    def __init__(self, sam: Any, **generator_kwargs: Any) -> None:
        self.generator = automatic_mask_generator(sam, **generator_kwargs)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        maps = []
        for img in pixels:
            label = np.full(img.shape[:2], -1, dtype=np.int64)
            masks = sorted(generate_masks(self.generator, img), key=lambda m: m["area"], reverse=True)
            for idx, m in enumerate(masks):
                label[m["segmentation"]] = idx
            maps.append(label)
        return torch.from_numpy(np.stack(maps)).to(images.device)
