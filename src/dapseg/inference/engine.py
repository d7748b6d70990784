"""Windows in, dense embeddings or patch logits out: CLIP blocks 1..L-1, a head, LN_post and proj."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dapseg.heads.base import Head, HeadContext, HeadOutput
from dapseg.inference.preprocess import normalize
from dapseg.models.clip import DenseClip
from dapseg.precision import autocast_context, inference_dtype
from dapseg.registry import Need

if TYPE_CHECKING:
    from dapseg.models.vfm import VfmOutput

# (head, ctx, text embeddings (Q, E), tokens -> embeddings) -> HeadOutput; e.g. the FSA plug-in.
HeadPlugin = Callable[[Head, HeadContext, Tensor, Callable[[Tensor], Tensor]], HeadOutput]


class DenseEngine(nn.Module):
    """Runs a batch of equally sized windows through CLIP with a given last-block head."""

    def __init__(
        self,
        clip: DenseClip,
        head: Head,
        vfm: nn.Module | None = None,
        plugin: HeadPlugin | None = None,
        needs: Iterable[Need] = (),
        precision: str = "auto",
    ) -> None:
        """``needs``: what the head (and plug-in) declared; the VFM's attention is computed only
        when ``Need.VFM_ATTENTION`` is among them. ``precision``: ``inference.precision``."""
        super().__init__()
        self.clip = clip
        self.head = head
        self.vfm = vfm
        self.plugin = plugin
        self.needs = frozenset(needs)
        self.precision = precision
        inference_dtype(self.device, precision)  # an impossible setting fails here, not on the first image

    @property
    def device(self) -> torch.device:
        return self.clip.visual.proj.device

    def autocast(self) -> AbstractContextManager[object]:
        """Autocast at this engine's precision on its device (``precision.inference_dtype``): the models
        hold their weights in that dtype already; autocast glues float32 islands to them."""
        return autocast_context(self.device, self.precision)

    @property
    def needs_region_masks(self) -> bool:
        """Whether the head (or plug-in) wants the region map of each window (Need.REGION_MASKS)."""
        return Need.REGION_MASKS in self.needs

    @property
    def needs_image_mean(self) -> bool:
        """Whether the head wants mean(S) over all windows of the image (mean_scope="image")."""
        return Need.AFFINITY_MEAN in self.needs

    @torch.no_grad()
    def vfm_output(self, windows01: Tensor) -> VfmOutput | None:
        """The VFM on (B, 3, H, W) window pixels in [0, 1], as ``head_output`` runs it (same autocast):
        feats (B, C', h', w') and attn; None without a VFM."""
        if self.vfm is None:
            return None
        with self.autocast():
            return self.vfm(
                windows01.to(self.device), return_attn=Need.VFM_ATTENTION in self.needs
            )

    @torch.no_grad()
    def head_output(
        self, windows01: Tensor, text: Tensor, *, vfm_out: VfmOutput | None = None, affinity_mean: Tensor | None = None,
        region_masks: Tensor | None = None,
    ) -> HeadOutput:
        """(B, 3, H, W) window pixels in [0, 1] -> the head's tokens (B, n, D), before LN_post / proj.

        ``text`` (Q, E) is only used by plug-ins that need the classes (FSA). ``vfm_out``: the VFM's
        output for these windows when already computed (``vfm_output``); ``affinity_mean``: mean(S)
        over all windows of the image, for heads with mean_scope="image"; ``region_masks``: (B, H, W)
        int64 region map of each window (``HeadContext.region_masks``), for heads that need it.
        """
        windows01 = windows01.to(self.device)
        if vfm_out is None:
            vfm_out = self.vfm_output(windows01)
        with self.autocast():
            keep_all = Need.CLIP_LAYERS in self.needs
            layers, grid = self.clip.tokens_entering_blocks(
                normalize(windows01, self.clip.mean, self.clip.std), keep_all=keep_all
            )
            x = layers[-1]
            vfm_feats = vfm_attn = None
            if vfm_out is not None:
                vfm_feats, vfm_attn = vfm_out.feats, vfm_out.attn
            ctx = HeadContext(
                x=x, grid=grid, block=self.clip.last_block, vfm_feats=vfm_feats, vfm_attn=vfm_attn, images=windows01,
                affinity_mean=affinity_mean, layers=tuple(layers) if keep_all else None,
                blocks=self.clip.blocks if keep_all else None,
                region_masks=region_masks.to(self.device) if region_masks is not None else None,
            )
            to_embed = self.clip.head_tokens_to_embeddings
            return self.plugin(self.head, ctx, text, to_embed) if self.plugin is not None else self.head(ctx)

    @torch.no_grad()
    def embeddings(
        self, tokens: Tensor, grid: tuple[int, int], branches: tuple[tuple[float, Tensor], ...] = ()
    ) -> Tensor:
        """Head tokens (B, n, D) on an (h, w) grid -> ℓ2-normalised embeddings (B, E, h, w) (LN_post, proj;
        ``branches``: ``HeadOutput.branches``, fused after LN_post)."""
        with self.autocast():
            emb = self.clip.head_tokens_to_embeddings(tokens.to(self.device), branches).float()  # (B, n, E)
        return F.normalize(emb, dim=-1).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    @torch.no_grad()
    def patch_logits(
        self, tokens: Tensor, grid: tuple[int, int], text: Tensor, branches: tuple[tuple[float, Tensor], ...] = ()
    ) -> Tensor:
        """Head tokens (B, n, D) -> cosine logits (B, Q, h, w) against ``text`` (Q, E): the one place
        tokens become class scores (slide, whole and splice all end here)."""
        emb = self.embeddings(tokens, grid, branches)
        return torch.einsum("behw,qe->bqhw", emb, text.to(emb))

    @torch.no_grad()
    def embed(self, windows01: Tensor, text: Tensor) -> Tensor:
        """(B, 3, H, W) window pixels in [0, 1] -> (B, E, h, w) ℓ2-normalised patch embeddings."""
        out = self.head_output(windows01, text)
        return self.embeddings(out.tokens, out.grid, out.branches)

    @torch.no_grad()
    def window_logits(
        self, windows01: Tensor, text: Tensor, *, vfm_out: VfmOutput | None = None, affinity_mean: Tensor | None = None,
        region_masks: Tensor | None = None,
    ) -> Tensor:
        """(B, 3, H, W) -> (B, Q, H, W) cosine logits, bilinearly upsampled to the window size.

        ``vfm_out``, ``affinity_mean`` and ``region_masks`` as in ``head_output``."""
        out = self.head_output(windows01, text, vfm_out=vfm_out, affinity_mean=affinity_mean,
                               region_masks=region_masks)
        logits = self.patch_logits(out.tokens, out.grid, text, out.branches)
        return F.interpolate(logits, size=windows01.shape[-2:], mode="bilinear", align_corners=False)
