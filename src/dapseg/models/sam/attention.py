"""SAM's global attention with decomposed relative positions, for a subset of query rows: written once.

segment-anything's ``add_decomposed_rel_pos`` adds, for query (i_h, i_w) and key (j_h, j_w),
q·R_h[i_h − j_h] + q·R_w[i_w − j_w] to the scaled q·kᵀ of all G × G pairs at once. Here the same terms
are added to the logits of only some query rows (a chunk), so that no (heads, G, G) matrix is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def add_rel_pos_rows(logits: Tensor, q: Tensor, rel_h: Tensor, rel_w: Tensor, rows: Tensor,
                     grid: tuple[int, int]) -> Tensor:
    """Logits of query rows ``rows`` plus their decomposed relative-position terms.

    logits (..., n, G) over all G = gh·gw keys; q (..., n, d) the unscaled queries of the same rows;
    rel_h (gh, gh, d), rel_w (gw, gw, d) the tables from segment-anything's ``get_rel_pos``;
    rows (n,) the rows' indices on the grid (row-major). Returns (..., n, G).
    """
    gh, gw = grid
    lead, n = q.shape[:-2], q.shape[-2]
    q3 = q.reshape(-1, n, q.shape[-1])  # (L, n, d), L = the leading dims (heads, or batch·heads)
    term_h = torch.einsum("hnc,nkc->hnk", q3, rel_h[rows // gw])  # (L, n, gh)
    term_w = torch.einsum("hnc,nkc->hnk", q3, rel_w[rows % gw])  # (L, n, gw)
    out = logits.reshape(-1, n, gh, gw) + term_h[..., None] + term_w[..., None, :]
    return out.reshape(*lead, n, gh * gw)
