"""Stable Diffusion 1.5 as a proxy VFM (ProxyCLIP Table 2 and appendix A), on ``diffusers``.

The paper's recipe: timestep t = 0, the feature map of "the 9th block" of the UNet, each 336×336
window resized to 672×672, giving a 22×22×1280 map (stride ≈ 15.3 px of the window). The public
reference code (mc-lan/ProxyCLIP) has no Stable Diffusion path, so the block is pinned by that shape:

* 672² pixels -> VAE latents 84² (three stride-2 stages) -> UNet down blocks 84 -> 42 -> 21 -> 11
  (stride-2 convolutions with padding 1: ⌈n/2⌉). 1280 channels exist only at 21 (third down block,
  second up block), at 11 (fourth down block, middle block, first up block) and at **22**: the output of
  the first up block, whose upsampler doubles the 11×11 bottom map (nearest ×2, then a 3×3 conv).
* So the map is ``unet.up_blocks[0]``'s output with its plain ×2 upsampling. (A full diffusers
  forward would resize it to the next skip's 21×21 — ``upsample_size`` — before the second up block
  concatenates it; the original LDM code cannot run an 84² latent past that point at all, 22 ≠ 21.)
  In the original LDM numbering this is ``output_blocks[2]``. How "9th" counts to it is not stated;
  the shape is the fact we match, and nothing after this block is computed (the remaining up blocks
  are not even built).

The rest of the recipe: the window in [0, 1] is mapped to [-1, 1] (mean = std = 0.5, the VAE's input
range), resized bilinearly to ``vfm.params.size`` (672), encoded by the VAE encoder (the posterior's
*mean*, times the scaling factor 0.18215: deterministic), and run through the UNet at t =
``vfm.params.timestep`` (0) without adding noise, conditioned on the empty prompt: SD's CLIP text
encoder on the token ids of "" as SD's tokenizer gives them (start token 49406, then the end token
49407 padded to 77 tokens), computed once when the model is built; the text encoder is then dropped.

Weights: the ``stable-diffusion-v1-5/stable-diffusion-v1-5`` hub repository, as a folder in the
diffusers layout (``unet/``, ``vae/``, ``text_encoder/`` safetensors); ``vfm.weights`` may name such a
local folder. Only the VAE encoder, the UNet up to its first up block and the text encoder are kept.
There is no attention map (``affinity: vfm_attention`` is refused).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dapseg import weights as W
from dapseg.models.vfm.base import (
    VfmFamily,
    VfmOutput,
    VfmSpec,
    VisionFoundationModel,
    register_family,
    specs_from,
)
from dapseg.models.vfm.sources import HubFolder

# The CLIP BPE vocabulary's start- and end-of-text tokens; SD's tokenizer pads with the end token.
# (SD 1.5's text_encoder/config.json carries bos/eos ids 0/2, which are not the tokenizer's.)
START_TOKEN, END_TOKEN = 49406, 49407
VAE_SCALING = 0.18215  # SD 1.x latents: scaling_factor of the VAE config
KEPT_UP_BLOCKS = 1  # the feature map is the output of unet.up_blocks[0]

_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
         "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
# Same down-sampling structure (three VAE stages, four UNet down blocks, the same first up block), a
# few channels, and no attention over the 84² latent grid (the first down block and the VAE's middle
# block attend over 7056 positions: most of the time of a small model): 672² -> 22×22 maps quickly.
_TINY = {
    "unet": {"block_out_channels": (8, 16, 32, 32), "layers_per_block": 1, "cross_attention_dim": 16,
             "attention_head_dim": 2, "norm_num_groups": 4,
             "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",)},
    "vae": {"block_out_channels": (4, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
            "mid_block_add_attention": False},
    "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
}

# The files of the release folder, and the per-model file names accepted in a local folder.
_FILES = {"unet": "unet/diffusion_pytorch_model", "vae": "vae/diffusion_pytorch_model",
          "text_encoder": "text_encoder/model"}
SPECS = specs_from("sd", [
    {"name": "sd15", "arch": "stable-diffusion-v1-5", "patch_size": 8,
     "official_file": "stable-diffusion-v1-5 in the diffusers layout (unet/, vae/, text_encoder/)",
     "hub": "stable-diffusion-v1-5/stable-diffusion-v1-5",
     "description": "Stable Diffusion 1.5 UNet features at t = 0 (window resized to 672x672)",
     "arch_config": {"unet": _UNET, "vae": _VAE, "text": _TEXT}, "tiny": _TINY},
], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class SdParams(BaseModel):
    """``vfm.params`` of the Stable Diffusion family."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(672, ge=64, multiple_of=8, description="side the window is resized to (px)")
    timestep: int = Field(0, ge=0, le=999, description="UNet timestep (no noise is added)")


class SdModules(nn.Module):
    """The parts of SD that are run: ``vae`` (encoder, quant_conv), ``unet`` (up to its first up
    block), ``text_encoder`` (until the empty-prompt conditioning is computed). Key names are those of
    the diffusers files, prefixed by the sub-folder (``unet.``, ``vae.``, ``text_encoder.``)."""

    def __init__(self, config: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        try:
            from diffusers import UNet2DConditionModel
            from diffusers.models.autoencoders.vae import Encoder
            from transformers import CLIPTextConfig, CLIPTextModel
        except ImportError as e:
            raise ImportError(f"the Stable Diffusion VFM needs diffusers and transformers: pip install "
                              f"'dapseg[sd]' ({e})") from e

        vae = config["vae"]
        self.vae = nn.Module()
        self.vae.encoder = Encoder(in_channels=3, out_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                   double_z=True, **vae)
        self.vae.quant_conv = nn.Conv2d(8, 8, 1)  # (mean, log-variance) of 4 latent channels
        self.unet = UNet2DConditionModel(**config["unet"])
        del self.unet.up_blocks[KEPT_UP_BLOCKS:]
        self.unet.conv_norm_out = self.unet.conv_act = self.unet.conv_out = None
        self.text_encoder: nn.Module | None = CLIPTextModel(CLIPTextConfig(**config["text"]))


def _config(spec: VfmSpec, tiny: bool) -> dict[str, dict[str, Any]]:
    return {k: {**v, **(spec.tiny.get(k, {}) if tiny else {})} for k, v in spec.arch_config.items()}


def make_sd(spec: VfmSpec, tiny: bool) -> nn.Module:
    """The kept SD parts with random weights. Built on the meta device first, so the unused up blocks
    never take memory and the full size builds in seconds, then given PyTorch's default init."""
    with torch.device("meta"):
        module = SdModules(_config(spec, tiny))
    module.to_empty(device="cpu")
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        emb = _text_model(module.text_encoder).embeddings
        for table in (emb.token_embedding, emb.position_embedding):
            table.weight.normal_(0.0, 0.02)  # CLIP's init of its embedding tables
        if getattr(emb, "position_ids", None) is not None:  # a buffer: to_empty left it uninitialised
            emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1]).expand_as(emb.position_ids))
    return module


def read_sd_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers folder -> one state dict with ``unet.`` / ``vae.`` / ``text_encoder.`` prefixes;
    each model's file is ``<name>.safetensors``, ``<name>.fp16.safetensors`` or ``<name>.bin``
    (read with ``torch.load(weights_only=True)``)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, stem in _FILES.items():
        candidates = [folder / f"{stem}{ext}" for ext in (".safetensors", ".fp16.safetensors", ".bin")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ValueError(f"Stable Diffusion weights folder {folder} has no {stem}.safetensors (expected the "
                             "diffusers layout: unet/, vae/, text_encoder/)")
        out.update({f"{prefix}.{k}": v for k, v in W.load_state_dict_file(path).items()})
    return out


# diffusers' VAE files from before its attention rename (the renames diffusers applies on load)
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_UNUSED = ("vae.decoder.", "vae.post_quant_conv.", "unet.conv_norm_out.", "unet.conv_out.",
           "text_encoder.text_model.embeddings.position_ids", "text_encoder.embeddings.position_ids")


def _text_model(text_encoder: nn.Module) -> nn.Module:
    """The CLIP text transformer: transformers < 5 nests it as ``text_model``; 5 does not."""
    return getattr(text_encoder, "text_model", text_encoder)


def sd_checkpoint_filter(sd: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The folder's state dict -> the kept modules' keys: the VAE decoder, the UNet after its first up
    block and the output convolution dropped, old VAE attention names renamed, the text encoder's
    ``text_model.`` level removed where the installed transformers has none."""
    flat_text = _text_model(module.text_encoder) is module.text_encoder
    out = {}
    for key, value in sd.items():
        if key.startswith(_UNUSED) or (key.startswith("unet.up_blocks.")
                                       and int(key.split(".")[2]) >= KEPT_UP_BLOCKS):
            continue
        if key.startswith("vae."):
            for old, new in _OLD_ATTENTION.items():
                key = key.replace(old, new)
            if key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")) and value.ndim == 4:
                value = value[:, :, 0, 0]  # 1×1 convolutions in the oldest files, linear layers now
        if flat_text and key.startswith("text_encoder.text_model."):
            key = "text_encoder." + key[len("text_encoder.text_model."):]
        out[key] = value
    return out


class SdVfm(VisionFoundationModel):
    """Stable Diffusion UNet features of the window resized to ``size``² (see the module docstring)."""

    def __init__(self, spec: VfmSpec, modules: SdModules, params: SdParams) -> None:
        unet = modules.unet
        super().__init__(spec, embed_dim=unet.up_blocks[-1].resnets[-1].out_channels, num_heads=0)
        self.size = params.size
        self.timestep = params.timestep
        with torch.no_grad():
            self.register_buffer("condition", empty_prompt_condition(modules.text_encoder), persistent=False)
        modules.text_encoder = None  # only its output on "" is needed: (1, 77, E)
        self.sd = modules

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size, self.size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        side = self.size // 8  # three VAE stages (pad right/bottom by 1, 3×3 stride-2 conv): n -> n // 2
        for _ in range(len(self.sd.unet.down_blocks) - 1):  # stride-2 convs with padding 1: n -> ⌈n/2⌉
            side = math.ceil(side / 2)
        return 2 * side, 2 * side  # the first up block's ×2 upsampler

    def encode(self, x: torch.Tensor, return_attn: bool) -> VfmOutput:
        if return_attn:
            raise ValueError(f"{self.name}: Stable Diffusion gives no attention map; use the proxy head with "
                             "head.params.affinity: features")
        vae, unet = self.sd.vae, self.sd.unet
        moments = vae.quant_conv(vae.encoder(x))  # (B, 8, s/8, s/8): mean, log-variance
        latents = moments[:, :4] * VAE_SCALING  # the posterior's mean
        t = torch.full((x.shape[0],), self.timestep, device=x.device)
        temb = unet.time_embedding(unet.time_proj(t).to(latents.dtype))  # (B, 4·C0)
        cond = self.condition.expand(x.shape[0], -1, -1).to(latents.dtype)  # (B, 77, E)
        h = unet.conv_in(latents)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=temb, encoder_hidden_states=cond)
            else:
                h, res = block(hidden_states=h, temb=temb)
            skips += res
        h = unet.mid_block(h, temb, encoder_hidden_states=cond)
        up = unet.up_blocks[0]
        # No upsample_size: the plain ×2 of the bottom map (22×22 at 672², see the module docstring)
        feats = up(hidden_states=h, res_hidden_states_tuple=skips[-len(up.resnets):], temb=temb)
        return VfmOutput(feats, None)  # (B, 1280, 22, 22) at 672²


def empty_prompt_condition(text_encoder: nn.Module) -> torch.Tensor:
    """SD's conditioning on the empty prompt: the text encoder's last hidden state (1, 77, E) of the
    token ids SD's tokenizer gives "" (start token, then end tokens up to 77)."""
    n = text_encoder.config.max_position_embeddings
    ids = torch.tensor([[START_TOKEN] + [END_TOKEN] * (n - 1)])
    return text_encoder(input_ids=ids).last_hidden_state


FAMILY = register_family(
    VfmFamily(
        "sd", SPECS, make_sd, sd_checkpoint_filter,
        lambda spec, module, params, window_size: SdVfm(spec, module, params),
        weights=HubFolder(tuple(f"{stem}.safetensors" for stem in _FILES.values())),
        read_weights=read_sd_folder, params=SdParams,
    ),
    "Stable Diffusion 1.5 UNet features (diffusers; pip install dapseg[sd])",
)
