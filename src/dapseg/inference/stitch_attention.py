"""The last CLIP block over stitched tokens: one attention over the whole image, in chunks of rows.

The ``stitch`` strategy (``stitch.py``) runs blocks 1..L-1 per window and averages the windows'
tokens onto one token grid of the whole image. This module runs the *head's* last-block attention
over those stitched tokens. Each supported head has one function here, with the head's own formula
but rows computed ``chunk`` at a time, so memory grows as heads · chunk · N, never N²; it is attached
to the head's registry entry as its ``stitched`` extra (a head registered elsewhere may declare its
own: ``HEADS.register(name, ..., extras={"stitched": fn})``):

- ``naclip``: Attn = softmax(k kᵀ/√d + ω) over CLS + all N patches, ω the Gaussian of patch distance
  on the *image* grid (σ from the head), reduced block out_proj(Attn · v);
- ``proxy``: A = γ(S − β·mean S) from the stitched VFM features, mean over the *image* (the image is
  now the one "window"), −∞ where A < 0, empty rows keep their maxima, softmax, applied to CLIP's
  values resized to the VFM grid, out_proj;
- ``dap``: the proxy affinity (+ mutual k-NN), region consistency W ← (1−ρ)W + ρPW and ``steps``
  propagation steps, as the dap head — regions from the whole image.

Shapes: N = gh·gw stitched CLIP patches, D CLIP width, N' = gh'·gw' stitched VFM patches, C' VFM width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dapseg.heads.affinity import (
    adaptive_normalize,
    normalized_patches,
    proxy_softmax,
    tied_with,
    values_on_grid,
)
from dapseg.heads.base import Head, HeadContext, merge_heads, qkv
from dapseg.heads.regions import region_mean
from dapseg.registry import HEADS, Need


@dataclass
class StitchedTokens:
    """The whole image's tokens after the windows were stitched."""

    x: Tensor  # (1 + N, D) tokens entering the last CLIP block, CLS first (the windows' CLS averaged)
    grid: tuple[int, int]  # (gh, gw) CLIP patch grid of the image
    vfm_feats: Tensor | None = None  # (C', gh', gw') VFM features of the image (stitched the same way)
    image: Tensor | None = None  # (3, H, W) the processed image in [0, 1] (DAP's SLIC / SAM regions)
    window_area: int = 0  # pixels of one window (DAP scales its per-window region counts with it)


# (head, last CLIP block, stitched tokens, rows per chunk) -> (patch tokens (n, D) before LN_post, their grid)
StitchedHead = Callable[[Head, nn.Module, StitchedTokens, int], tuple[Tensor, tuple[int, int]]]


def register_stitched(name: str) -> Callable[[StitchedHead], StitchedHead]:
    """Attach ``fn`` to head ``name``'s registry entry as its ``stitched`` extra."""

    def deco(fn: StitchedHead) -> StitchedHead:
        HEADS.attach(name, stitched=fn)
        return fn

    return deco


def stitched_head(head: Head) -> tuple[StitchedHead, bool]:
    """How head ``head`` runs over stitched tokens (its entry's ``stitched`` extra) and whether the
    windows must go through the VFM too (it declared a VFM need); a clear error for heads that cannot."""
    entry = HEADS.get(head.name)
    fn = entry.extras.get("stitched")
    if fn is None:
        supported = sorted(n for n in HEADS.names() if "stitched" in HEADS.get(n).extras)
        raise ValueError(
            f"inference.mode=stitch does not support head {head.name!r}; supported heads: "
            f"{', '.join(supported)} (use inference.mode=slide for the others)"
        )
    needs = entry.needs_for(getattr(head, "params", None))
    return fn, bool(needs & {Need.VFM_FEATURES, Need.VFM_ATTENTION})


# ----------------------------------------------------------------------------- naclip

def gaussian_rows(pos: Tensor, rows: Tensor, sigma: float) -> Tensor:
    """ω rows for patches ``rows`` (n,) against every patch: exp(−‖p_i − p_j‖²/(2σ²)), (n, N)."""
    d2 = torch.cdist(pos[rows], pos).pow(2)
    return torch.exp(-d2 / (2 * sigma**2))


@register_stitched("naclip")
def naclip_stitched(head: Head, block: nn.Module, st: StitchedTokens, chunk: int) -> tuple[Tensor, tuple[int, int]]:
    """NACLIP's k-k + neighbourhood attention over CLS + all stitched patches: (N, D) on (gh, gw)."""
    _, k, v = qkv(block, st.x[None])  # (1, heads, 1 + N, d)
    k, v = k[0], v[0]
    gh, gw = st.grid
    n = gh * gw
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float().to(k.device)  # (N, 2)
    scale = k.shape[-1] ** -0.5
    out = torch.empty(k.shape[0], n, v.shape[-1], dtype=v.dtype, device=v.device)  # (heads, N, d)
    for s in range(0, n, chunk):  # patch rows only: the CLS row is dropped from the output anyway
        e = min(s + chunk, n)
        logits = k[:, 1 + s : 1 + e] @ k.transpose(-1, -2) * scale  # (heads, n_rows, 1 + N)
        omega = gaussian_rows(pos, torch.arange(s, e, device=k.device), head.params.sigma)  # (n_rows, N)
        omega = nn.functional.pad(omega, (1, 0))  # 0 in the CLS column
        attn = torch.softmax(logits + omega.to(logits), dim=-1)
        out[:, s:e] = attn @ v
    tokens = block.attn.out_proj(merge_heads(out[None]))[0]  # (N, D)
    return tokens, st.grid


# ----------------------------------------------------------------------------- proxy / dap

class ProxyRows:
    """Rows of the proxy attention over all stitched VFM patches, computed on demand.

    feats (C', gh', gw'). mean(S) over the N'² entries is (Σx̂)·(Σx̂)/N'² — exact, without S.
    Mutual k-NN: j ∈ kNN(i) ∧ i ∈ kNN(j)  ⇔  S_ij ≥ kth_i ∧ S_ji ≥ kth_j, with kth_i the k-th largest
    entry of row i, found in a first pass over the rows; S_ji is read as S_ij (S is symmetric up to
    float rounding, hence a tolerance on the column test).
    """

    def __init__(self, feats: Tensor, *, beta: float, gamma: float, normalize: bool = True, mask: bool = True,
                 knn: int = 0, chunk: int = 1024) -> None:
        self.x = normalized_patches(feats[None])[0]  # (N', C') float32
        self.n = self.x.shape[0]
        total = self.x.sum(0)
        self.mean = (total @ total) / self.n**2
        self.beta, self.gamma, self.normalize, self.mask = beta, gamma, normalize, mask
        self.chunk = chunk
        self.kth: Tensor | None = None
        if mask and knn > 0:
            k = min(knn, self.n)
            self.kth = torch.cat([self.similarity(s, min(s + chunk, self.n)).topk(k, dim=-1).values[:, -1]
                                  for s in range(0, self.n, chunk)])  # (N',)

    def similarity(self, start: int, end: int) -> Tensor:
        # float32 even under autocast: the sign of A near 0 decides the mask
        with torch.autocast(self.x.device.type, enabled=False):
            return self.x[start:end] @ self.x.T  # (n_rows, N')

    def rows(self, start: int, end: int) -> Tensor:
        """Attention rows start..end: (n_rows, N'), each summing to 1."""
        s = self.similarity(start, end)
        a = adaptive_normalize(s[None], self.beta, self.gamma, self.mean)[0] if self.normalize else s
        neighbours = None
        if self.kth is not None:
            # The tie rule of ``mutual_knn``, for rows and columns alike: column j's k-th value was
            # computed in row j, whose S_ji may differ from S_ij in the last bits.
            neighbours = tied_with(s, self.kth[start:end, None]) & tied_with(s, self.kth[None, :])
        return proxy_softmax(a, mask=self.mask, neighbours=neighbours)

    def apply(self, y: Tensor) -> Tensor:
        """Attn · y for y (heads, N', d), in chunks of rows: (heads, N', d)."""
        out = torch.empty_like(y)
        for s in range(0, self.n, self.chunk):
            e = min(s + self.chunk, self.n)
            out[:, s:e] = self.rows(s, e).to(y.dtype) @ y
        return out


def _vfm_values(head: Head, block: nn.Module, st: StitchedTokens) -> tuple[Tensor, tuple[int, int]]:
    """CLIP's patch values on the stitched VFM grid: (heads, N', d), (gh', gw')."""
    if st.vfm_feats is None:
        raise ValueError(f"head {head.name!r} in inference.mode=stitch needs VFM features; configure a `vfm:` section")
    out_grid = (int(st.vfm_feats.shape[-2]), int(st.vfm_feats.shape[-1]))
    _, _, v = qkv(block, st.x[None])  # (1, heads, 1 + N, d)
    return values_on_grid(v[:, :, 1:], st.grid, out_grid)[0], out_grid


@register_stitched("proxy")
def proxy_stitched(head: Head, block: nn.Module, st: StitchedTokens, chunk: int) -> tuple[Tensor, tuple[int, int]]:
    """ProxyCLIP's proxy attention over all stitched VFM patches: (N', D) on (gh', gw')."""
    p = head.params
    if p.affinity != "features":
        raise ValueError("inference.mode=stitch needs head.params.affinity=features: the VFM's own attention "
                         "exists per window only")
    v, out_grid = _vfm_values(head, block, st)
    rows = ProxyRows(st.vfm_feats, beta=p.beta, gamma=p.gamma, normalize=p.normalize, mask=p.mask, chunk=chunk)
    z = rows.apply(v)  # (heads, N', d)
    return block.attn.out_proj(merge_heads(z[None]))[0], out_grid


def _image_regions(head: Head, block: nn.Module, st: StitchedTokens, grid: tuple[int, int]) -> Tensor:
    """DAP's region of every stitched VFM patch (N',), from the whole image.

    ``n_segments`` (SLIC) and ``n_regions`` (k-means) are counts *per window*: scaled by
    image area / window area so regions keep the size they have in slide mode.
    """
    from dapseg.heads.dap import DapHead

    p = head.params
    assert st.image is not None and st.vfm_feats is not None
    ratio = st.image.shape[-2] * st.image.shape[-1] / max(st.window_area, 1)
    params = p.model_copy(update={"n_segments": max(1, round(p.n_segments * ratio)),
                                  "n_regions": max(1, round(p.n_regions * ratio))})
    image_head = DapHead(params, region_provider=head.region_provider)
    ctx = HeadContext(x=st.x[None], grid=st.grid, block=block, vfm_feats=st.vfm_feats[None], images=st.image[None])
    return image_head.region_labels(ctx, grid)[0]


@register_stitched("dap")
def dap_stitched(head: Head, block: nn.Module, st: StitchedTokens, chunk: int) -> tuple[Tensor, tuple[int, int]]:
    """DAP over all stitched VFM patches: y ← (1−ρ)·W·y + ρ·P·(W·y), ``steps`` times: (N', D)."""
    p = head.params
    v, out_grid = _vfm_values(head, block, st)
    rows = ProxyRows(st.vfm_feats, beta=p.beta, gamma=p.gamma, knn=p.knn, chunk=chunk)
    labels = None
    if p.regions != "none" and p.rho > 0:
        labels = _image_regions(head, block, st, out_grid).to(v.device)  # (N',)
    heads, n, d = v.shape
    y = v
    for _ in range(p.steps):
        y = rows.apply(y)
        if labels is not None:  # P·(W·y): region means of the rows, all heads at once
            flat = y.transpose(0, 1).reshape(1, n, heads * d)
            py = region_mean(flat, labels[None]).reshape(n, heads, d).transpose(0, 1)
            y = (1 - p.rho) * y + p.rho * py
    return block.attn.out_proj(merge_heads(y[None]))[0], out_grid
