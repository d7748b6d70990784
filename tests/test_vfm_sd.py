"""The Stable Diffusion VFM family: the 22×22×1280 map at 672² (full size, on the meta device), the
tiny build, its release folder read back, its params and its refusals. No weights, no network."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from dapseg.config import VfmConfig
from dapseg.models.vfm import build_vfm, vfm_spec
from dapseg.models.vfm.sd import SdModules, SdParams, SdVfm, _config


def expected_grid(size: int, down_blocks: int = 4) -> int:
    """Naive shape arithmetic: the VAE divides by 8, each UNet down-sampler takes ⌈n/2⌉, the first up
    block doubles."""
    side = size // 8
    for _ in range(down_blocks - 1):
        side = math.ceil(side / 2)
    return 2 * side


def tiny_sd(**params: object) -> SdVfm:
    torch.manual_seed(0)
    return build_vfm(VfmConfig(name="sd15", params=params), random_weights=True, tiny=True, device="cpu")


def test_full_size_map_is_22x22x1280_at_672():
    """The full SD 1.5 architecture, shapes only (meta tensors: no memory, no compute)."""
    spec = vfm_spec("sd15")
    with torch.device("meta"):
        model = SdVfm(spec, SdModules(_config(spec, tiny=False)), SdParams())
        out = model(torch.zeros(2, 3, 336, 336))
    assert expected_grid(672) == 22
    assert tuple(out.feats.shape) == (2, 1280, 22, 22) and out.attn is None
    assert model.grid(336, 336) == (22, 22) and model.embed_dim == 1280
    assert tuple(model.condition.shape) == (1, 77, 768)  # the empty prompt through SD's text encoder


@pytest.mark.parametrize("size", [672, 336])
def test_tiny_map_has_the_same_down_sampling(size):
    model = tiny_sd(size=size)
    images = torch.rand(2, 3, 200, 260, generator=torch.Generator().manual_seed(3))
    out = model(images)
    g = expected_grid(size)
    assert tuple(out.feats.shape) == (2, model.embed_dim, g, g) and model.grid(200, 260) == (g, g)
    assert torch.isfinite(out.feats).all()
    # each window on its own gives its own map (no mixing across the batch)
    torch.testing.assert_close(model(images[1:]).feats, out.feats[1:], atol=1e-5, rtol=1e-4)


def test_input_normalisation_is_the_vae_range():
    model = tiny_sd()
    assert model.mean.flatten().tolist() == [0.5] * 3 and model.std.flatten().tolist() == [0.5] * 3


def test_params_are_validated():
    assert VfmConfig(name="sd15").params == {"size": 672, "timestep": 0}
    with pytest.raises(ValueError, match="size"):
        VfmConfig(name="sd15", params={"size": 100})  # not a multiple of 8
    with pytest.raises(ValueError, match="sizes"):
        VfmConfig(name="sd15", params={"sizes": 672})
    with pytest.raises(ValueError, match=r"size\s+Extra inputs are not permitted"):
        VfmConfig(name="dino_vitb8", params={"size": 672})  # DINO's params (features) have no size
    with pytest.raises(ValueError, match=r"unknown VFM 'sd14'.*sd15"):
        VfmConfig(name="sd14")


def test_timestep_conditions_the_map():
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(tiny_sd(timestep=0)(images).feats, tiny_sd(timestep=500)(images).feats)


def test_no_attention_map():
    with pytest.raises(ValueError, match="no attention map"):
        tiny_sd()(torch.rand(1, 3, 64, 64), return_attn=True)


def _release_folder(model: SdVfm, root, text_state: dict[str, torch.Tensor]) -> None:
    """The tiny model's weights written in the diffusers release layout, with the parts the family
    drops (VAE decoder, later up blocks, output conv) and the nested text_model keys of the files."""
    state = model.sd.state_dict()
    files = {
        "unet/diffusion_pytorch_model.safetensors": {k[5:]: v for k, v in state.items() if k.startswith("unet.")},
        "vae/diffusion_pytorch_model.safetensors": {k[4:]: v for k, v in state.items() if k.startswith("vae.")},
        "text_encoder/model.safetensors": {f"text_model.{k}": v for k, v in text_state.items()},
    }
    files["unet/diffusion_pytorch_model.safetensors"]["up_blocks.1.resnets.0.conv1.weight"] = torch.zeros(1)
    files["unet/diffusion_pytorch_model.safetensors"]["conv_out.weight"] = torch.zeros(1)
    files["vae/diffusion_pytorch_model.safetensors"]["decoder.conv_in.weight"] = torch.zeros(1)
    for name, tensors in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / name))


def test_release_folder_loads_strictly(tmp_path, monkeypatch):
    from dapseg.models.vfm import sd as sd_module

    kept: dict[str, torch.Tensor] = {}
    real = sd_module.empty_prompt_condition

    def keep_text_state(text_encoder):  # the text encoder is dropped after this call: keep its weights
        kept.update({k: v.clone() for k, v in sd_module._text_model(text_encoder).state_dict().items()
                     if not k.endswith("position_ids")})
        return real(text_encoder)

    monkeypatch.setattr(sd_module, "empty_prompt_condition", keep_text_state)
    model = tiny_sd()
    _release_folder(model, tmp_path, kept)
    torch.manual_seed(123)  # a different random init: only the folder can make the outputs agree
    loaded = build_vfm(VfmConfig(name="sd15", weights=tmp_path), tiny=True, device="cpu")
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loaded(images).feats, model(images).feats)
    torch.testing.assert_close(loaded.condition, model.condition)
    # a folder without the text encoder names the folder and the missing file
    (tmp_path / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"text_encoder/model\.safetensors"):
        build_vfm(VfmConfig(name="sd15", weights=tmp_path), tiny=True, device="cpu")
    with pytest.raises(FileNotFoundError, match="folder not found"):
        build_vfm(VfmConfig(name="sd15", weights=tmp_path / "nope"), tiny=True, device="cpu")


@pytest.mark.parametrize("preset", ["proxyclip-sd15", "dap-sd15"])
def test_sd_presets_segment_a_photo(preset):
    from skimage import data

    from dapseg.api import Segmenter

    seg = Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu")
    assert seg.config.vfm is not None and seg.config.vfm.name == "sd15" and seg.config.inference.crop == 336
    image = data.astronaut()[::2, ::2]  # 256², resized to 336²: one window
    res = seg.predict(image, ["person", "sky", "rocket"])
    assert res.labels.shape == (256, 256) and torch.isfinite(res.logits).all()
    # the proxy attention really comes from SD's 22×22 map: other SD weights, other logits
    other = Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu",
                                  overrides={"vfm.params.timestep": 999})
    assert not torch.allclose(other.predict(image, ["person", "sky", "rocket"]).logits, res.logits)


def test_vfm_attention_affinity_is_refused_with_sd():
    from dapseg.api import Segmenter

    seg = Segmenter.from_preset("proxyclip-sd15", random_weights=True, tiny=True, device="cpu",
                                overrides={"head.params.affinity": "vfm_attention"})
    with pytest.raises(ValueError, match=r"sd15.*no attention map"):
        seg.predict(torch.rand(64, 64, 3).mul(255).byte().numpy(), ["a", "b"])
