"""Splice-then-segment (Trident): windows -> dense features -> one full-image map -> global affinity.

Unlike ``slide`` (segment each window, then stitch logits), ``splice`` stitches the windows' *features*
(the head's output tokens after out_proj, before LN_post / proj — where the reference splices them),
averages overlaps, moves the whole map with an affinity computed over the whole image by SAM
(``global_affinity``) and only then applies LN_post, proj and the text cosine, once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def splice_features(
    feats: list[Tensor], boxes: list[tuple[int, int, int, int]], image_size: tuple[int, int], cell: float
) -> Tensor:
    """Average window feature maps onto the full-image grid.

    feats[i]: (D, h_i, w_i) features of window i covering pixels boxes[i] = (y1, x1, y2, x2) of an
    image of ``image_size`` (H, W); ``cell`` = pixels per feature cell (e.g. 16 for ViT-B/16 on a
    336 window with a 21 × 21 grid). Output: (D, ceil(H / cell), ceil(W / cell)); a window whose grid
    does not match its box on that grid (padding, odd sizes) is bilinearly resized onto it.
    Cells no window covers (none, for the usual window layouts) stay zero.
    """
    if len(feats) != len(boxes) or not feats:
        raise ValueError(f"need one box per window feature map, got {len(feats)} maps and {len(boxes)} boxes")
    H, W = image_size
    gh, gw = math.ceil(H / cell), math.ceil(W / cell)
    d = feats[0].shape[0]
    total = feats[0].new_zeros((d, gh, gw), dtype=torch.float32)
    count = feats[0].new_zeros((1, gh, gw), dtype=torch.float32)
    for f, (y1, x1, y2, x2) in zip(feats, boxes, strict=True):
        r1, c1 = round(y1 / cell), round(x1 / cell)
        r2, c2 = min(gh, max(r1 + 1, round(y2 / cell))), min(gw, max(c1 + 1, round(x2 / cell)))
        f = f.float()
        if f.shape[-2:] != (r2 - r1, c2 - c1):
            f = F.interpolate(f[None], size=(r2 - r1, c2 - c1), mode="bilinear", align_corners=False)[0]
        total[:, r1:r2, c1:c2] += f
        count[:, r1:r2, c1:c2] += 1
    return total / count.clamp(min=1)
