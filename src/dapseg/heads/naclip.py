"""naclip: k-k attention plus a Gaussian neighbourhood prior, reduced block (NACLIP).

Attn = softmax(k kᵀ/√d + ω) over CLS + N patches, ω the Gaussian of patch distance (σ in patches,
0 in the CLS row and column); out = out_proj(Attn · v). Per window (``attention``) all rows at once;
over the stitched tokens of a whole image (``stitched``) the same rows, ``chunk`` at a time.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor, nn

from dapseg.heads.base import Attention, Head, HeadContext, merge_heads, qkv, register_head
from dapseg.heads.stitched import StitchedTokens, rows_times


def gaussian_neighbourhood(grid: tuple[int, int], sigma: float, start: int = 0, end: int | None = None,
                           device: torch.device | None = None) -> Tensor:
    """Rows start..end of ω over CLS + N tokens (token 0 = CLS; default all 1 + N): (end − start, 1 + N).

    ω_ij = exp(−‖p_i − p_j‖² / (2σ²)) for patch positions p on the (h, w) grid (NACLIP §4); 0 in the
    CLS row and column.
    """
    h, w = grid
    n = h * w
    end = 1 + n if end is None else end
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()  # (N, 2)
    first = max(start, 1)  # the first patch row among start..end
    omega = torch.exp(-torch.cdist(pos[first - 1 : end - 1], pos).pow(2) / (2 * sigma**2))  # (rows, N)
    return nn.functional.pad(omega, (1, 0, 1 if start == 0 else 0, 0))


def neighbourhood_attention(k: Tensor, omega: Tensor, start: int = 0, end: int | None = None) -> Tensor:
    """Attention rows start..end: softmax(k_i kᵀ/√d + ω_i) over all M tokens.

    k (..., heads, M, d), omega (end − start, M) -> (..., heads, end − start, M).
    """
    logits = k[..., start:end, :] @ k.transpose(-1, -2) * k.shape[-1] ** -0.5 + omega.to(k)
    return torch.softmax(logits, dim=-1)


@register_head
class NaclipHead(Head):
    name = "naclip"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sigma: float = 5.0  # Gaussian std in patches (NACLIP: 5)

        @field_validator("sigma")
        @classmethod
        def _positive(cls, v: float) -> float:
            if v <= 0:
                raise ValueError("sigma must be > 0")
            return v

    def __init__(self, params: Params | None = None) -> None:
        super().__init__()
        self.params = params or self.Params()
        self._omega: dict[tuple[int, int], Tensor] = {}

    def attention(self, ctx: HeadContext) -> Attention:
        _, k, v = qkv(ctx.block, ctx.x)  # (B, heads, 1 + N, d)
        omega = self._omega.get(ctx.grid)
        if omega is None:
            omega = self._omega[ctx.grid] = gaussian_neighbourhood(ctx.grid, self.params.sigma)
        return Attention(attn=neighbourhood_attention(k, omega), v=v, grid=ctx.grid, has_cls=True)

    def stitched(self, block: nn.Module, st: StitchedTokens, chunk: int) -> tuple[Tensor, tuple[int, int]]:
        """Over CLS + all stitched patches: (N, D) on (gh, gw). Patch rows only: the CLS row is
        dropped from the output anyway."""
        ctx = st.context(block)
        _, k, v = qkv(ctx.block, ctx.x)
        k, v = k[0], v[0]  # (heads, 1 + N, d)
        sigma = self.params.sigma

        def rows(s: int, e: int) -> Tensor:  # (heads, e − s, 1 + N)
            return neighbourhood_attention(k, gaussian_neighbourhood(st.grid, sigma, s, e, k.device), s, e)

        z = rows_times(rows, v, chunk, start=1)  # (heads, N, d)
        return block.attn.out_proj(merge_heads(z[None]))[0], st.grid
