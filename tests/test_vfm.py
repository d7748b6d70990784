"""VFM registry: grids, attention, official position interpolation, official checkpoints, errors.

Everything runs on tiny random-init models; nothing touches the network.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dapseg import weights as W
from dapseg.config import VfmConfig
from dapseg.models.vfm import IMAGENET_MEAN, IMAGENET_STD, build_vfm, list_vfms
from dapseg.models.vfm.dinov3 import eva_attn_logits
from dapseg.models.vfm.sam import sam_attn_logits
from dapseg.models.vfm.vit import vit_attn_logits

EXPECTED = {
    "dino_vits8",
    "dino_vits16",
    "dino_vitb8",
    "dino_vitb16",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "mae_vitb16",
    "sam_vitb",
    "sam_vitl",
    "sam_vith",
    "dinov3_vits16",
    "dinov3_vitb16",
    "dinov3_vitl16",
    "sd15",
}
# The ViTs (SAM and Stable Diffusion have their own tests: tests/test_vfm_sd.py for SD)
NON_SAM = sorted(n for n in EXPECTED if not n.startswith(("sam", "sd")))


def tiny(name: str, window: int = 224):
    torch.manual_seed(0)
    return build_vfm(
        VfmConfig(name=name), random_weights=True, tiny=True, cache_dir=None, window_size=window, device="cpu"
    )


def imagenet_norm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 224, 336)


@pytest.fixture(scope="module")
def sam_tiny():
    return tiny("sam_vitb")


def test_registry_names():
    assert set(list_vfms()) == EXPECTED


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="dino_vitb8") as err:
        build_vfm(
            VfmConfig(name="dino_vitz99"),
            random_weights=True,
            tiny=True,
            cache_dir=None,
            window_size=224,
            device="cpu",
        )
    assert "dino_vitz99" in str(err.value) and "sam_vitb" in str(err.value)


GRIDS = {
    "dino_vits8": (28, 42),
    "dino_vitb8": (28, 42),
    "dino_vits16": (14, 21),
    "dino_vitb16": (14, 21),
    "dinov2_vitb14": (16, 24),
    "dinov2_vitb14_reg": (16, 24),
    "mae_vitb16": (14, 14),
    "dinov3_vits16": (14, 21),
    "dinov3_vitb16": (14, 21),
    "dinov3_vitl16": (14, 21),
}


@pytest.mark.parametrize("name", NON_SAM)
def test_grid_attention_and_prefix_drop(name, images):
    m = tiny(name, window=224)
    out = m(images, return_attn=True)
    h, w = GRIDS[name]
    assert out.feats.shape == (2, m.embed_dim, h, w)
    assert m.grid(224, 336) == (h, w)
    n = h * w
    assert out.attn.shape == (2, m.num_heads, n, n)
    assert torch.allclose(out.attn.sum(-1), torch.ones(2, m.num_heads, n), atol=1e-5)
    assert torch.isfinite(out.feats).all() and (out.attn >= 0).all()
    assert torch.equal(m(images).feats, out.feats) and m(images).attn is None
    # batching does not mix images
    assert torch.allclose(m(images[1:]).feats, out.feats[1:], atol=1e-5)

    # the last-block logits are the ones the block applies: softmax(all tokens)·v -> proj == attn module
    enc = m.eva if name.startswith("dinov3") else m.vit
    x = (
        imagenet_norm(images)
        if name != "mae_vitb16"
        else F.interpolate(imagenet_norm(images), size=(224, 224), mode="bilinear", align_corners=False)
    )
    if name.startswith("dinov3"):
        t, rope, _ = m.tokens(x)
        for blk in enc.blocks[:-1]:
            t = blk(t, rope=rope)
        logits, v = eva_attn_logits(enc.blocks[-1], t, rope)
        ref = enc.blocks[-1].attn(enc.blocks[-1].norm1(t), rope=rope)
    else:
        t, _ = m.tokens(x)
        for blk in enc.blocks[:-1]:
            t = blk(t)
        logits, v = vit_attn_logits(enc.blocks[-1], t)
        ref = enc.blocks[-1].attn(enc.blocks[-1].norm1(t))
    mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(t.shape)
    assert torch.allclose(enc.blocks[-1].attn.proj(mixed), ref, atol=1e-5)
    # patch attention = logits restricted to patches, then softmax (prefix removed on both axes)
    p = enc.num_prefix_tokens
    assert torch.allclose(out.attn[:, :, 3], torch.softmax(logits[:, :, p + 3, p:], -1), atol=1e-6)
    # features: the final norm of the last block output, prefix tokens dropped
    final = enc.norm(enc.blocks[-1](t, rope=rope) if name.startswith("dinov3") else enc.blocks[-1](t))
    assert torch.allclose(out.feats.flatten(2).transpose(1, 2), final[:, p:], atol=1e-5)
    assert enc.num_prefix_tokens == (5 if name.startswith("dinov3") or name.endswith("_reg") else 1)


def test_sam_grid_attention_and_official_forward(sam_tiny):
    m = sam_tiny
    img = torch.rand(1, 3, 224, 336)
    out = m(img, return_attn=True)
    assert out.feats.shape == (1, 32, 64, 64) and m.grid(224, 336) == (64, 64)
    assert out.attn.shape == (1, 2, 4096, 4096)
    assert torch.allclose(out.attn.sum(-1), torch.ones(1, 2, 4096), atol=1e-5)
    # features are exactly segment-anything's image_encoder on the 1024x1024 bilinear resize
    x = F.interpolate(imagenet_norm(img), size=(1024, 1024), mode="bilinear", align_corners=False)
    assert torch.allclose(m.encoder(x), out.feats, atol=1e-5)
    # attention = the global last block's own map (relative-position terms included)
    enc = m.encoder
    assert enc.blocks[-1].window_size == 0
    t = enc.patch_embed(x) + enc.pos_embed
    for blk in enc.blocks[:-1]:
        t = blk(t)
    logits, v = sam_attn_logits(enc.blocks[-1], t)
    assert torch.allclose(logits.softmax(-1), out.attn, atol=1e-6)
    mixed = (out.attn @ v).permute(0, 2, 1, 3).reshape(t.shape)
    ref = enc.blocks[-1].attn(enc.blocks[-1].norm1(t))
    assert torch.allclose(enc.blocks[-1].attn.proj(mixed), ref, atol=1e-5)
    # the relative-position terms matter: without them the map differs
    b = enc.blocks[-1]
    h = b.norm1(t)
    qkv = b.attn.qkv(h).reshape(1, 4096, 3, 2, -1).permute(2, 0, 3, 1, 4)
    plain = ((qkv[0] * b.attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)
    assert not torch.allclose(plain, out.attn, atol=1e-4)


# ------------------------------------------------------------------ position-embedding interpolation


def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _weights_plain(n_in: int, n_out: int, ratio: float) -> np.ndarray:
    """Bicubic (a = -0.75, align_corners=False, edge-clamped) with src = (dst + 0.5)·ratio - 0.5."""
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * ratio - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k in range(-1, 3):
            mat[i, min(max(i0 + k, 0), n_in - 1)] += _cubic(k - t, -0.75)
    return mat


def _weights_aa(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bicubic (PIL style, a = -0.5, support truncated at the edges and renormalised)."""
    ratio = n_in / n_out
    support = 2.0 * max(ratio, 1.0)
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * ratio
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        ws = [_cubic((j - center + 0.5) / max(ratio, 1.0), -0.5) for j in range(lo, hi)]
        mat[i, lo:hi] = np.array(ws) / sum(ws)
    return mat


def _naive_resample(pos: torch.Tensor, wh: np.ndarray, ww: np.ndarray) -> torch.Tensor:
    """(1, M·M, C) -> (1, h·w, C) with separable weight matrices (h, M), (w, M)."""
    m = math.isqrt(pos.shape[1])
    g = pos[0].double().numpy().reshape(m, m, -1)
    out = np.einsum("hi,wj,ijc->hwc", wh, ww, g)
    return torch.from_numpy(out.reshape(1, -1, g.shape[-1])).float()


@pytest.mark.parametrize("name", ["dino_vitb8", "dinov2_vitb14", "dinov2_vitb14_reg"])
def test_pos_interpolation_is_the_official_one(name, images):
    m = tiny(name)
    vit = m.vit
    x = imagenet_norm(images)
    tokens, (h, w) = m.tokens(x)
    pos = vit.pos_embed.detach()
    p_pos = 0 if vit.no_embed_class else 1
    patch_pos = pos[:, p_pos:]
    mm = math.isqrt(patch_pos.shape[1])
    if name == "dinov2_vitb14_reg":  # official with registers: to size, antialiased
        want_pos = _naive_resample(patch_pos, _weights_aa(mm, h), _weights_aa(mm, w))
    else:  # official DINO / DINOv2: scale_factor (h + 0.1) / M, so src ratio is M / (h + 0.1)
        want_pos = _naive_resample(
            patch_pos, _weights_plain(mm, h, mm / (h + 0.1)), _weights_plain(mm, w, mm / (w + 0.1))
        )
    patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    got = tokens[:, vit.num_prefix_tokens :] - patches
    assert torch.allclose(got, want_pos.expand_as(got), atol=1e-5)
    # and the 0.1 offset really changes the result (it is not a size-based resize)
    if name != "dinov2_vitb14_reg":
        size_based = _naive_resample(patch_pos, _weights_plain(mm, h, mm / h), _weights_plain(mm, w, mm / w))
        assert not torch.allclose(size_based, want_pos, atol=1e-4)
    # CLS keeps its own position entry
    cls_pos = pos[:, :1] if p_pos else 0.0
    assert torch.allclose(tokens[:, 0:1], vit.cls_token + cls_pos)
    # square input with the native grid: the official early exit, positions used as stored
    native = imagenet_norm(torch.rand(1, 3, mm * m.patch_size, mm * m.patch_size))
    t2, _ = m.tokens(native)
    p2 = vit.patch_embed.proj(native).flatten(2).transpose(1, 2)
    assert torch.allclose(t2[:, vit.num_prefix_tokens :] - p2, patch_pos, atol=1e-6)


def test_mae_built_at_window_size(images):
    m = tiny("mae_vitb16", window=336)
    assert m(images).feats.shape == (2, 32, 21, 21) and m.grid(100, 500) == (21, 21)
    assert m.vit.pos_embed.shape[1] == 1 + 21 * 21


# ------------------------------------------------------------------ official checkpoints


def _dino_official(vit) -> dict:
    """DINO's module names equal timm's (cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm)."""
    names = [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    ]
    for i in range(len(vit.blocks)):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    ours = vit.state_dict()
    return {k: ours[k].clone() for k in names}


def _dinov2_official(vit, registers: bool) -> dict:
    """DINOv2's layout: pos_embed always has a CLS entry, registers are ``register_tokens`` with no
    position, LayerScale ``ls1.gamma`` / ``ls2.gamma``, and a ``mask_token``."""
    ours = vit.state_dict()
    sd = _dino_official(vit)
    for i in range(len(vit.blocks)):
        sd[f"blocks.{i}.ls1.gamma"] = ours[f"blocks.{i}.ls1.gamma"].clone()
        sd[f"blocks.{i}.ls2.gamma"] = ours[f"blocks.{i}.ls2.gamma"].clone()
    sd["mask_token"] = torch.zeros(1, vit.embed_dim)
    if registers:
        cls_pos = torch.randn(1, 1, vit.embed_dim)
        sd["pos_embed"] = torch.cat([cls_pos, ours["pos_embed"]], dim=1)
        sd["cls_token"] = ours["cls_token"] - cls_pos  # official adds pos_embed[:, 0] to CLS
        sd["register_tokens"] = ours["reg_token"].clone()
    return sd


def _features_equal(a, b, images):
    fa, fb = a(images, return_attn=True), b(images, return_attn=True)
    assert torch.allclose(fa.feats, fb.feats, atol=1e-5)
    assert torch.allclose(fa.attn, fb.attn, atol=1e-6)


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vitb14", "dinov2_vitb14_reg"])
def test_official_dino_checkpoints(name, images, tmp_path):
    m = tiny(name)
    sd = _dino_official(m.vit) if name.startswith("dino_") else _dinov2_official(m.vit, name.endswith("reg"))
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    loaded = build_vfm(
        VfmConfig(name=name, weights=path),
        random_weights=False,
        tiny=True,
        cache_dir=tmp_path,
        window_size=224,
        device="cpu",
    )
    _features_equal(m, loaded, images[:1])


def test_official_mae_checkpoint(images, tmp_path):
    m = tiny("mae_vitb16", window=224)
    sd = {"model": _dino_official(m.vit)}  # MAE's models_vit keys equal timm's, wrapped in "model"
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save(sd, path)
    loaded = build_vfm(
        VfmConfig(name="mae_vitb16", weights=path),
        tiny=True,
        cache_dir=tmp_path,
        window_size=224,
        device="cpu",
    )
    _features_equal(m, loaded, images[:1])
    # at another window the checkpoint's 14x14 grid is resized MAE-style (bicubic to size)
    big = build_vfm(
        VfmConfig(name="mae_vitb16", weights=path),
        tiny=True,
        cache_dir=tmp_path,
        window_size=336,
        device="cpu",
    )
    pos = sd["model"]["pos_embed"]
    want = _naive_resample(pos[:, 1:], _weights_plain(14, 21, 14 / 21), _weights_plain(14, 21, 14 / 21))
    assert torch.allclose(big.vit.pos_embed[:, 1:], want, atol=1e-5)
    assert torch.equal(big.vit.pos_embed[:, :1], pos[:, :1])


def test_official_dinov3_checkpoint(images, tmp_path):
    m = tiny("dinov3_vitb16")
    ours = m.eva.state_dict()
    sd = {}
    for k, v in ours.items():  # official names: storage_tokens, blocks.i.ls{1,2}.gamma, rope periods
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        sd[k] = v.clone()
    sd["mask_token"] = torch.zeros(1, m.embed_dim)
    sd["rope_embed.periods"] = torch.ones(8)
    path = tmp_path / "dinov3.pth"
    torch.save(sd, path)
    loaded = build_vfm(
        VfmConfig(name="dinov3_vitb16", weights=path), tiny=True, window_size=224, device="cpu"
    )
    _features_equal(m, loaded, images[:1])


def test_official_sam_checkpoint(sam_tiny, tmp_path):
    ours = sam_tiny.encoder.state_dict()
    sd = {f"image_encoder.{k}": v.clone() for k, v in ours.items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sd, path)
    loaded = build_vfm(VfmConfig(name="sam_vitb", weights=path), tiny=True, window_size=224, device="cpu")
    got = loaded.encoder.state_dict()
    assert got.keys() == ours.keys()
    assert all(torch.equal(got[k], ours[k]) for k in ours)


def test_bad_checkpoint_names_file_and_keys(tmp_path):
    m = tiny("dino_vits16")
    sd = _dino_official(m.vit)
    sd.pop("norm.weight")
    sd["blocks.0.bogus"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"broken\.pth") as err:
        build_vfm(VfmConfig(name="dino_vits16", weights=path), tiny=True, window_size=224, device="cpu")
    assert "norm.weight" in str(err.value) and "blocks.0.bogus" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_vfm(VfmConfig(name="dino_vits16", weights=tmp_path / "nope.pth"), window_size=224)


# ------------------------------------------------------------------ weights / errors / full size


@pytest.mark.parametrize("name", ["dino_vitb8", "sam_vitb", "sd15"])
def test_missing_weights_offline(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DAPSEG_CACHE", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr("socket.create_connection", no_network)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    monkeypatch.setattr("torch.hub.download_url_to_file", no_network)
    with pytest.raises(W.WeightsMissingError) as err:
        build_vfm(VfmConfig(name=name), random_weights=False, tiny=False, cache_dir=None, window_size=224)
    msg = str(err.value)
    assert name in msg and "dapseg download" in msg
    assert isinstance(err.value, RuntimeError)


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPSEG_CACHE", str(tmp_path / "c"))
    assert W.cache_dir() == tmp_path / "c"
    assert W.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("DAPSEG_CACHE")
    assert W.cache_dir().name == "dapseg"


def test_full_size_dino_vitb8_param_count():
    m = build_vfm(
        VfmConfig(name="dino_vitb8"),
        random_weights=True,
        tiny=False,
        cache_dir=None,
        window_size=224,
        device="cpu",
    )
    n = sum(p.numel() for p in m.parameters())
    # ViT-B/8 backbone: 12 blocks x 7.09M + patch embed 3·64·768 + 785 positions x 768 ≈ 85.8M
    per_block = 4 * 768 * 768 + 2 * 768 * 3072 + 3 * 768 + 768 + 3072 + 768 + 4 * 768
    expected = 12 * per_block + (3 * 64 * 768 + 768) + 785 * 768 + 768 + 2 * 768
    assert n == expected
    assert m.embed_dim == 768 and m.num_heads == 12 and m.patch_size == 8
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_bad_images_rejected():
    m = tiny("dino_vits16")
    with pytest.raises(ValueError, match="dino_vits16"):
        m(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="smaller than one"):
        m(torch.rand(1, 3, 8, 64))


def test_sam_release_file_is_read_once_for_encoder_and_decoder(sam_tiny, tmp_path, monkeypatch):
    from dapseg import weights as W
    from dapseg.bundle import ModelBundle
    from dapseg.models.sam.build import sam_with_decoder

    torch.manual_seed(3)
    full = sam_with_decoder(sam_tiny.encoder)  # the tiny encoder with a random decoder: a "release file"
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({k: v.clone() for k, v in full.state_dict().items()}, path)
    reads = []
    real = W.load_state_dict_file
    monkeypatch.setattr(W, "load_state_dict_file", lambda p: reads.append(p) or real(p))
    cfg = VfmConfig(name="sam_vitb", weights=path)
    loaded = build_vfm(cfg, tiny=True, window_size=224, device="cpu")
    bundle = ModelBundle(clip=None, sam=loaded, sam_config=cfg)
    sam = bundle.sam_decoder()
    assert bundle.sam_decoder() is sam and len(reads) == 1  # one read, one decoder
    want = full.state_dict()
    for key, value in sam.state_dict().items():
        assert torch.equal(value, want[key]), key
