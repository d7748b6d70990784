"""open_clip wrapper for dense prediction.

Runs the vision tower's blocks 1..L-1 with open_clip's own modules and hands the tokens entering
the last block to a head (``dapseg.heads``); LN_post and proj then map the head's tokens into the
joint embedding space. No open_clip internals are patched.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.pretrained import download_pretrained, get_pretrained_cfg
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from dapseg.config import ClipConfig
from dapseg.weights import (
    WeightsMissingError,
    cached_hf_file,
    hf_cache,
    how_to_fetch,
    is_offline,
    load_state_dict_file,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# A CLIP of the same family small enough for tests: 2 blocks of width 64.
TINY_VISION = dict(image_size=224, patch_size=16, width=64, layers=2, head_width=16, mlp_ratio=2.0)
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
TINY_EMBED_DIM = 32
TEXT_BATCH = 256  # prompts per text-encoder call (sorted by length, so each call is cut short)


class DenseClip(nn.Module):
    """An open_clip CLIP model with a dense (per-patch) image path."""

    def __init__(self, model: nn.Module, tokenizer: object, name: str, tag: str) -> None:
        super().__init__()
        visual = model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ValueError(f"CLIP model {name!r} has no ViT vision tower; dapseg needs an open_clip ViT")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"CLIP model {name!r} pools with attention; dapseg needs a token-pooled ViT")
        self.model = model
        self.tokenizer = tokenizer
        self.name, self.tag = name, tag
        self.mean, self.std = _norm_constants(model)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def last_block(self) -> nn.Module:
        return self.visual.transformer.resblocks[-1]

    @property
    def patch_size(self) -> int:
        ps = self.visual.conv1.kernel_size
        return int(ps[0])

    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    def interpolated_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Positional embedding (1 + h·w, D) for a patch grid, bicubic as the references do it.

        The references (ProxyCLIP, NACLIP, SCLIP) interpolate with a scale factor of
        (h + 0.1) / sqrt(N) rather than a target size; the two differ slightly in bicubic weights,
        and matching their numbers needs theirs.
        """
        pos = self.visual.positional_embedding
        n = pos.shape[0] - 1
        side = int(math.sqrt(n))
        h, w = grid
        if h * w == n and h == w:
            return pos
        patch_pos = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos.float(),
            scale_factor=((h + 0.1) / side, (w + 0.1) / side),
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        ).to(pos.dtype)
        if patch_pos.shape[-2:] != (h, w):  # guards the +0.1 trick; never expected to fire
            raise RuntimeError(f"positional embedding interpolated to {patch_pos.shape[-2:]}, wanted {grid}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, -1)
        return torch.cat([pos[:1], patch_pos], dim=0)

    def tokens_before_last_block(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """CLIP-normalised images (B, 3, H, W) -> tokens entering the last block (B, 1 + N, D), grid."""
        layers, grid = self.tokens_entering_blocks(images, keep_all=False)
        return layers[-1], grid

    @property
    def blocks(self) -> nn.ModuleList:
        """The vision tower's residual blocks (open_clip ``ResidualAttentionBlock``), in order."""
        return self.visual.transformer.resblocks

    def tokens_entering_blocks(self, images: Tensor, keep_all: bool = True) -> tuple[list[Tensor], tuple[int, int]]:
        """CLIP-normalised images (B, 3, H, W) -> the tokens entering each block, batch first, and the grid.

        ``layers[i]`` (B, 1 + N, D) enters block i: ``layers[0]`` is the output of ln_pre and
        ``layers[L - 1]`` enters the last block. With ``keep_all=False`` only that last one is kept
        (the other L - 2 are not held in memory).
        """
        v = self.visual
        ps = self.patch_size
        grid = (images.shape[-2] // ps, images.shape[-1] // ps)
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.interpolated_pos_embed(grid).to(x.dtype)
        x = v.ln_pre(x)
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        layers = [x]
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
            layers = [*layers, x] if keep_all else [x]
        if not batch_first:
            layers = [t.transpose(0, 1) for t in layers]
        return layers, grid

    def head_tokens_to_embeddings(self, tokens: Tensor, branches: tuple[tuple[float, Tensor], ...] = ()) -> Tensor:
        """(B, n, D) head output -> (B, n, E) in the joint space (LN_post, proj).

        ``branches``: (weight, tokens (B, n, D)) fused after LN_post, before proj
        (``HeadOutput.branches``): proj(LN_post(tokens) + Σ weight · LN_post(branch))."""
        x = self.visual.ln_post(tokens)
        for weight, branch in branches:
            x = x + self.visual.ln_post(branch.to(x.device)) * weight
        return x @ self.visual.proj if self.visual.proj is not None else x

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = TEXT_BATCH) -> Tensor:
        """(len(texts), E) text embeddings, not normalised, as open_clip's ``encode_text`` computes them.

        Texts are sorted by token length and encoded ``batch_size`` at a time, each batch's context
        cut to its longest text: CLIP's text transformer is causal and reads one token (end of text),
        so the padding after it changes nothing (up to float rounding). Models where that does not
        hold (no causal mask, another pooling) get the full context.
        """
        if not texts:
            raise ValueError("encode_text needs at least one text")
        device = self.visual.proj.device
        tokens = self.tokenizer(texts)  # (N, context) on the CPU
        lengths = self._token_lengths(tokens)  # (N,) or None: cannot trim
        order = torch.argsort(lengths, stable=True) if lengths is not None else torch.arange(len(texts))
        parts = []  # (≤ batch_size, E) each, in ``order``
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokens[rows]
            if lengths is not None:
                parts.append(self._encode_trimmed(batch[:, : int(lengths[rows].max())].to(device)).float())
            else:
                parts.append(self.model.encode_text(batch.to(device)).float())
        return torch.cat(parts)[torch.argsort(order).to(device)]  # back to the texts' order

    def _token_lengths(self, tokens: Tensor) -> Tensor | None:
        """Tokens up to and including the pooled one, per text (N,); None where trimming is not exact."""
        m = self.model
        pool = getattr(m, "text_pool_type", None)
        if getattr(m, "attn_mask", None) is None or not hasattr(m, "token_embedding") or pool not in ("argmax", "eos"):
            return None
        if pool == "argmax":  # open_clip pools the highest token id (OpenAI's end-of-text)
            return tokens.argmax(dim=-1) + 1
        eos = getattr(m, "text_eos_id", None)
        if eos is None:
            return None
        return (tokens == eos).int().argmax(dim=-1) + 1

    def _encode_trimmed(self, tokens: Tensor) -> Tensor:
        """open_clip's ``CLIP.encode_text`` with the positional embedding and causal mask cut to
        the tokens' length L: (B, L) -> (B, E)."""
        m = self.model
        n = tokens.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)  # (B, L, width)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is None:
            return x
        return m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection


def _norm_constants(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_STD
    return tuple(mean), tuple(std)


def _tiny_model() -> nn.Module:
    return open_clip.model.CLIP(embed_dim=TINY_EMBED_DIM, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT)


def resolve_clip_checkpoint(model_name: str, tag: str, cache: str | os.PathLike[str] | None) -> Path:
    """The local file of open_clip's pretrained weights ``model_name``/``tag``, downloading if allowed."""
    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        valid = [t for m, t in open_clip.list_pretrained() if m == model_name]
        raise ValueError(
            f"open_clip has no pretrained weights {tag!r} for {model_name!r}; valid tags: {', '.join(valid)}"
        )
    what = f"CLIP {model_name} ({tag})"
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # 'org/name/' names the default file
        filename = filename or "open_clip_pytorch_model.bin"
        # open_clip prefers a .safetensors twin of the file where the hub has one.
        names = [filename.replace("pytorch_model.bin", "model.safetensors"), filename]
        hit = cached_hf_file(repo_id, names, cache)
        if hit is not None:
            return hit
    if is_offline():
        raise WeightsMissingError(what, how_to_fetch(None), "no network and nothing in the cache")
    try:
        path = download_pretrained(cfg, cache_dir=str(hf_cache(cache)))
    except Exception as e:  # hub unreachable, file absent: both mean "not available here"
        raise WeightsMissingError(what, how_to_fetch(None), str(e).splitlines()[0]) from e
    if not path:
        raise WeightsMissingError(what, how_to_fetch(None))
    return Path(path)


def build_clip(
    cfg: ClipConfig,
    *,
    random_weights: bool = False,
    tiny: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> DenseClip:
    """Build the CLIP model of ``cfg``: pretrained, from a local file, or random (``random_weights``)."""
    if tiny and not random_weights:
        raise ValueError("a tiny CLIP exists only with random weights (--random-weights)")
    tokenizer = open_clip.get_tokenizer(cfg.model if not tiny else "ViT-B-16")
    if tiny:
        model = _tiny_model()
    else:
        if cfg.model not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {cfg.model!r}; e.g. ViT-B-16, ViT-L-14, ViT-H-14")
        quick_gelu = bool((get_pretrained_cfg(cfg.model, cfg.pretrained) or {}).get("quick_gelu", False))
        # Find the weights before building the model: a missing file should fail in a second.
        path = None if random_weights else cfg.weights or resolve_clip_checkpoint(cfg.model, cfg.pretrained, cache_dir)
        # Read (and so check) the file before building the model too: a corrupt file fails fast.
        state = load_state_dict_file(path) if path is not None else None
        with _quiet_logging():  # open_clip warns "initialized randomly": we load the weights ourselves
            model = open_clip.create_model(cfg.model, pretrained=None, force_quick_gelu=quick_gelu)
        if state is not None:
            _load_clip_weights(model, Path(path), state)
    model.eval().requires_grad_(False).to(device)
    return DenseClip(model, tokenizer, cfg.model if not tiny else "tiny", cfg.pretrained)


@contextmanager
def _quiet_logging() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _load_clip_weights(model: nn.Module, path: Path, state: dict[str, torch.Tensor]) -> None:
    """Load ``state``, the tensors of the OpenAI ``.pt`` (TorchScript) or open_clip ``.bin`` /
    ``.safetensors`` file ``path`` as read by ``load_state_dict_file`` (``path`` names it in errors)."""
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archive metadata
        state.pop(key, None)
    state = open_clip.factory.convert_state_dict(model, state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    open_clip.factory.resize_pos_embed(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not fit the CLIP architecture: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
