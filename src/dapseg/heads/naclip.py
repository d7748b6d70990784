"""naclip: k-k attention plus a Gaussian neighbourhood prior, reduced block (NACLIP)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from dapseg.heads.base import Attention, Head, HeadContext, qkv, register_head


def gaussian_neighbourhood(grid: tuple[int, int], sigma: float, with_cls: bool = True) -> torch.Tensor:
    """ω: (1 + N, 1 + N) unnormalised Gaussian of patch distance, 0 on the CLS row and column.

    ω_ij = exp(−‖p_i − p_j‖² / (2σ²)) for patch positions p on the (h, w) grid (NACLIP §4).
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()  # (N, 2)
    omega = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * sigma**2))
    if with_cls:
        omega = torch.nn.functional.pad(omega, (1, 0, 1, 0))
    return omega


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
        self._omega: dict[tuple[int, int], torch.Tensor] = {}

    def attention(self, ctx: HeadContext) -> Attention:
        _, k, v = qkv(ctx.block, ctx.x)  # (B, heads, 1 + N, d)
        omega = self._omega.get(ctx.grid)
        if omega is None:
            omega = self._omega[ctx.grid] = gaussian_neighbourhood(ctx.grid, self.params.sigma)
        logits = k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5 + omega.to(k)
        return Attention(attn=torch.softmax(logits, dim=-1), v=v, grid=ctx.grid, has_cls=True)
