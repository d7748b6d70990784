"""SAM's global attention with decomposed relative positions, for a subset of query rows: written once.

segment-anything's ``add_decomposed_rel_pos`` adds, for query (i_h, i_w) and key (j_h, j_w),
q·R_h[i_h − j_h] + q·R_w[i_w − j_w] to the scaled q·kᵀ of all G × G pairs at once. Here the same terms
are computed for only some query rows (a chunk), so that no (heads, G, G) matrix is formed; they are
either added to logits in place or handed to a fused attention kernel as its bias.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rel_pos_terms(q: Tensor, rel_h: Tensor, rel_w: Tensor, rows: Tensor, grid: tuple[int, int]
                  ) -> tuple[Tensor, Tensor]:
    """The two decomposed terms of query rows ``rows``.

    q (..., n, d) the unscaled queries of those rows; rel_h (gh, gh, d), rel_w (gw, gw, d) the tables
    from segment-anything's ``get_rel_pos``; rows (n,) the rows' indices on the grid (row-major).
    Returns (q·R_h (..., n, gh), q·R_w (..., n, gw)).
    """
    gh, gw = grid
    lead, n = q.shape[:-2], q.shape[-2]
    q3 = q.reshape(-1, n, q.shape[-1])  # (L, n, d), L = the leading dims (heads, or batch·heads)
    term_h = torch.einsum("hnc,nkc->hnk", q3, rel_h[rows // gw])  # (L, n, gh)
    term_w = torch.einsum("hnc,nkc->hnk", q3, rel_w[rows % gw])  # (L, n, gw)
    return term_h.reshape(*lead, n, gh), term_w.reshape(*lead, n, gw)


def rel_pos_bias(q: Tensor, rel_h: Tensor, rel_w: Tensor, rows: Tensor, grid: tuple[int, int]) -> Tensor:
    """The additive attention bias of query rows ``rows`` over all G = gh·gw keys: (..., n, G)."""
    gh, gw = grid
    term_h, term_w = rel_pos_terms(q, rel_h, rel_w, rows, grid)
    return (term_h[..., None] + term_w[..., None, :]).reshape(*term_h.shape[:-1], gh * gw)


def add_rel_pos_rows_(logits: Tensor, q: Tensor, rel_h: Tensor, rel_w: Tensor, rows: Tensor,
                      grid: tuple[int, int]) -> Tensor:
    """Add the terms to ``logits`` (..., n, G) of the same rows, in place (no (…, n, G) temporaries);
    returns ``logits``."""
    gh, gw = grid
    term_h, term_w = rel_pos_terms(q, rel_h, rel_w, rows, grid)
    logits.view(*logits.shape[:-1], gh, gw).add_(term_h[..., None]).add_(term_w[..., None, :])
    return logits
