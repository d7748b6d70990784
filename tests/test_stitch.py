"""inference.mode=stitch against naive formulas on tiny random-weight models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from skimage import data

from dapseg.api import Segmenter
from dapseg.config import list_presets, load_preset
from dapseg.heads.base import Attention, Head, HeadContext, merge_heads, qkv
from dapseg.heads.dap import DapHead
from dapseg.heads.stitched import StitchedTokens, rows_times
from dapseg.inference.preprocess import normalize
from dapseg.inference.stitch import stitch
from dapseg.inference.strategies import whole
from dapseg.text import ClassSet

CLASSES = ClassSet.from_list(["cup", "table; wood", "saucer"])


def tiny(preset: str, **overrides: object) -> Segmenter:
    over = {"inference.mode": "stitch", "inference.short_side": None, "inference.pad_multiple": None,
            "inference.crop": 64, "inference.stride": 32, **overrides}
    return Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu", overrides=over)


def image96() -> torch.Tensor:
    """A real photo crop, (3, 96, 96) in [0, 1]: with crop 64 / stride 32 a 2 × 2 window grid."""
    return torch.from_numpy(data.astronaut()[100:292:2, 150:342:2].copy()).permute(2, 0, 1).float() / 255


# The 2 × 2 grid of a 96 × 96 image, written out: (y1, x1) of each 64-px window.
WINDOWS = [(0, 0), (0, 32), (32, 0), (32, 32)]


def naive_stitch(maps: list[torch.Tensor], cell: int, side: int) -> torch.Tensor:
    """Average window maps (C, h, w) at WINDOWS onto a (C, side/cell, side/cell) grid, one cell at a time."""
    c = maps[0].shape[0]
    n = side // cell
    total = torch.zeros(c, n, n, dtype=torch.float64)
    count = torch.zeros(n, n)
    for (y1, x1), m in zip(WINDOWS, maps, strict=True):
        for r in range(m.shape[1]):
            for col in range(m.shape[2]):
                total[:, y1 // cell + r, x1 // cell + col] += m[:, r, col].double()
                count[y1 // cell + r, x1 // cell + col] += 1
    assert count.min() >= 1
    return total / count


def clip_window_tokens(seg: Segmenter, img: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per window: patch tokens entering the last block (D, 4, 4); and the mean CLS token (D,)."""
    maps, cls = [], []
    for y1, x1 in WINDOWS:
        crop = img[None, :, y1 : y1 + 64, x1 : x1 + 64]
        x, grid = seg.clip.tokens_before_last_block(normalize(crop, seg.clip.mean, seg.clip.std))
        maps.append(x[0, 1:].T.reshape(-1, *grid))
        cls.append(x[0, 0].double())
    return maps, torch.stack(cls).mean(0)


def naive_logits(seg: Segmenter, z: torch.Tensor, grid: tuple[int, int], text: torch.Tensor) -> torch.Tensor:
    """Reduced-block output z (N, D) (before out_proj) -> cosine logits (Q, 96, 96)."""
    block, visual = seg.clip.last_block, seg.clip.visual
    out = z @ block.attn.out_proj.weight.double().T + block.attn.out_proj.bias.double()
    emb = F.layer_norm(out, out.shape[-1:], visual.ln_post.weight.double(), visual.ln_post.bias.double(),
                       visual.ln_post.eps) @ visual.proj.double()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    logits = (emb @ text.double().T).T.reshape(-1, *grid)
    return F.interpolate(logits[None], (96, 96), mode="bilinear", align_corners=False)[0]


def qkv_naive(seg: Segmenter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (heads, M, d) of the last block for tokens x (M, D), float64."""
    block = seg.clip.last_block
    h = F.layer_norm(x, x.shape[-1:], block.ln_1.weight.double(), block.ln_1.bias.double(), block.ln_1.eps)
    qkv = h @ block.attn.in_proj_weight.double().T + block.attn.in_proj_bias.double()
    heads = block.attn.num_heads
    return tuple(t.reshape(t.shape[0], heads, -1).transpose(0, 1) for t in qkv.chunk(3, dim=-1))


def test_naclip_stitch_equals_naive_formula_on_a_2x2_window_grid() -> None:
    seg = tiny("naclip", **{"inference.params": {"chunk": 7}})  # 7 rows: chunks cut across grid rows
    img = image96()
    text = seg.text_embeddings(CLASSES)
    got = stitch(seg.engine, img, text, seg.config.inference)

    maps, cls = clip_window_tokens(seg, img)
    stitched = naive_stitch(maps, 16, 96)  # (D, 6, 6)
    x = torch.cat([cls[None], stitched.flatten(1).T])  # (1 + 36, D)
    _, k, v = qkv_naive(seg, x)
    sigma = seg.config.head.params["sigma"]
    n = 36
    omega = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            dy, dx = i // 6 - j // 6, i % 6 - j % 6
            omega[1 + i, 1 + j] = math.exp(-(dy * dy + dx * dx) / (2 * sigma**2))
    attn = torch.softmax(k @ k.transpose(1, 2) / math.sqrt(k.shape[-1]) + omega, dim=-1)
    z = (attn @ v).transpose(0, 1).reshape(n + 1, -1)[1:]
    want = naive_logits(seg, z, (6, 6), text)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_proxy_stitch_equals_naive_formula_on_a_2x2_window_grid() -> None:
    seg = tiny("proxyclip", **{"inference.params": {"chunk": 13}})
    img = image96()
    text = seg.text_embeddings(CLASSES)
    got = stitch(seg.engine, img, text, seg.config.inference)

    maps, cls = clip_window_tokens(seg, img)
    x = torch.cat([cls[None], naive_stitch(maps, 16, 96).flatten(1).T])
    vfm_maps = [seg.vfm(img[None, :, y1 : y1 + 64, x1 : x1 + 64]).feats[0] for y1, x1 in WINDOWS]  # (C', 8, 8)
    feats = naive_stitch(vfm_maps, 8, 96).flatten(1).T  # (144, C') on the 12 × 12 VFM grid
    xh = feats / feats.norm(dim=-1, keepdim=True)
    s = xh @ xh.T
    p = seg.config.head.params
    a = p["gamma"] * (s - p["beta"] * s.mean())
    assert (a >= 0).any(dim=-1).all()  # no empty row here: the plain masked softmax applies
    attn = torch.softmax(a.masked_fill(a < 0, float("-inf")), dim=-1)
    _, _, v = qkv_naive(seg, x)  # (heads, 37, d)
    v_img = v[:, 1:].transpose(1, 2).reshape(v.shape[0] * v.shape[2], 1, 6, 6)  # CLIP values as images
    v_vfm = F.interpolate(v_img, (12, 12), mode="bilinear", align_corners=False)
    v_vfm = v_vfm.reshape(v.shape[0], v.shape[2], 144).transpose(1, 2)  # (heads, 144, d)
    z = (attn @ v_vfm).transpose(0, 1).reshape(144, -1)
    want = naive_logits(seg, z, (12, 12), text)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_dap_stitched_attention_equals_naive_formula() -> None:
    """knn, hand-made regions and two propagation steps over stitched tokens, against dense matrices."""
    seg = tiny("dap")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1 + 20, seg.clip.last_block.attn.embed_dim, generator=gen)  # CLIP grid 4 × 5
    feats = torch.randn(16, 8, 10, generator=gen)  # VFM grid 8 × 10
    image = torch.rand(3, 64, 80, generator=gen)
    region_map = torch.zeros(1, 64, 80, dtype=torch.int64)  # regions aligned with 8-px VFM cells
    region_map[:, :32, 40:] = 1
    region_map[:, 32:, :16] = 2
    head = DapHead(DapHead.Params(knn=5, regions="sam", rho=0.4, steps=2),
                   region_provider=lambda imgs: region_map.expand(imgs.shape[0], -1, -1))
    st = StitchedTokens(x=x, grid=(4, 5), vfm_feats=feats, image=image, window_area=64 * 80)
    got, grid = head.stitched(seg.clip.last_block, st, chunk=11)
    assert grid == (8, 10)

    xh = feats.double().flatten(1).T
    xh = xh / xh.norm(dim=-1, keepdim=True)
    s = xh @ xh.T
    a = 3.0 * (s - 1.2 * s.mean())
    kth = s.topk(5, dim=-1).values[:, -1:]
    near = s >= kth
    keep = (a >= 0) & near & near.T
    empty = ~keep.any(-1, keepdim=True)
    keep |= empty & (a == a.max(-1, keepdim=True).values)
    w = torch.softmax(a.masked_fill(~keep, float("-inf")), dim=-1)
    labels = region_map[0, ::8, ::8].flatten()
    same = (labels[:, None] == labels[None, :]).double()
    pmat = same / same.sum(-1, keepdim=True)
    w = 0.6 * w + 0.4 * pmat @ w
    _, _, v = qkv_naive(seg, x.double())
    v_img = v[:, 1:].transpose(1, 2).reshape(-1, 1, 4, 5)
    v_vfm = F.interpolate(v_img, (8, 10), mode="bilinear", align_corners=False).reshape(v.shape[0], -1, 80)
    z = w @ (w @ v_vfm.transpose(1, 2))  # two steps, (heads, 80, d)
    z = z.transpose(0, 1).reshape(80, -1)
    out_proj = seg.clip.last_block.attn.out_proj
    want = z @ out_proj.weight.double().T + out_proj.bias.double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["naclip", "proxyclip", "dap"])
def test_stitch_with_a_single_window_equals_whole(preset: str) -> None:
    seg = tiny(preset, **{"inference.crop": 128})
    img = image96()[:, :64, :80]  # one window of its own size (64 × 80 < crop)
    text = seg.text_embeddings(CLASSES)
    got = stitch(seg.engine, img, text, seg.config.inference)
    want = whole(seg.engine, img, text, seg.config.inference)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["naclip", "proxyclip"])
def test_stitch_is_independent_of_max_batch(preset: str) -> None:
    image = data.coffee()[:100, :150]  # aligned to 96 × 144: 2 × 4 windows of 64 px
    batched = tiny(preset, **{"inference.max_batch": 16})
    single = batched.derive({"inference.max_batch": 1})
    assert single.clip is batched.clip
    torch.testing.assert_close(batched.coarse_logits(image, CLASSES), single.coarse_logits(image, CLASSES),
                               atol=1e-5, rtol=1e-5)


def test_stitch_refuses_unsupported_heads_and_fsa() -> None:
    img = image96()
    seg = tiny("clip")
    with pytest.raises(ValueError, match=r"does not support head 'vanilla'.*naclip"):
        seg.coarse_logits((img.permute(1, 2, 0) * 255).byte().numpy(), CLASSES)
    with pytest.raises(ValueError, match=r"inference\.mode 'stitch' takes no plug-in"):  # when the config loads
        tiny("naclip", **{"fsa.enabled": True})
    with pytest.raises(ValueError, match="chunk"):
        load_preset("naclip", {"inference.mode": "stitch", "inference.params": {"chunk": 0}})


def test_stitch_presets_segment_a_photo() -> None:
    presets = set(list_presets())
    assert {"naclip-stitch", "proxyclip-stitch", "dap-stitch"} <= presets
    assert not any(p.endswith("-stitch-fsa") for p in presets)  # FSA does not combine with stitch
    for name in ("naclip-stitch", "proxyclip-stitch", "dap-stitch"):
        seg = Segmenter.from_preset(name, random_weights=True, tiny=True, device="cpu",
                                    overrides={"inference.short_side": 128})
        assert seg.config.inference.mode == "stitch"
        out = seg.predict(data.coffee(), ["cup", "table", "saucer"])
        assert out.labels.shape == data.coffee().shape[:2]
        assert torch.isfinite(out.probs).all()


def test_sweep_over_stitch_and_sam_vote(tmp_path, capsys) -> None:
    """`dapseg sweep` takes both as grid axes; every combination runs end to end on synthetic data."""
    import pandas as pd

    from dapseg.cli import main
    from eval_synth import make_dataset

    make_dataset(tmp_path / "data", "voc21", n=1, seed=2)
    work = tmp_path / "w"
    args = ["sweep", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(tmp_path / "data"),
            "--work-dir", str(work), "--grid", "inference.mode=slide,stitch refine.name=none,sam_vote",
            "--random-weights", "--tiny", "--workers", "0", "--no-progress", "--set", "inference.short_side=32",
            "--set", "inference.crop=32", "--set", "inference.stride=16", "--set", "templates=simple_imagenet",
            "--set", "sam.name=sam_vitb", "--set", "refine.params.points_per_side=2"]
    assert main(args) == 0
    table = pd.read_csv(work / "sweep.csv")
    assert set(map(tuple, table[["inference.mode", "refine.name"]].values)) == {
        ("slide", "none"), ("slide", "sam_vote"), ("stitch", "none"), ("stitch", "sam_vote")}
    assert table["mIoU"].between(0, 100).all()


def test_aligned_size_rounds_each_side_to_the_nearest_patch_multiple() -> None:
    from dapseg.inference.stitch import aligned_size

    assert aligned_size(336, 504, 16) == (336, 512)
    assert aligned_size(100, 150, 16) == (96, 144)
    assert aligned_size(5, 7, 16) == (16, 16)


def test_a_head_declares_its_stitched_form_as_its_own_method() -> None:
    """The stitch strategy calls the head's ``stitched`` method: a subclass registered from outside
    inherits NACLIP's and runs as naclip does; a head without one is refused."""
    from dapseg.heads.naclip import NaclipHead
    from dapseg.registry import HEADS

    assert all(HEADS.get(n).builder.stitched is not None for n in ("naclip", "proxy", "dap"))
    assert HEADS.get("vanilla").builder.stitched is None

    class Twin(NaclipHead):
        name = "naclip_twin"

    HEADS.register("naclip_twin", params=NaclipHead.Params)(Twin)
    try:
        img = (image96().permute(1, 2, 0) * 255).byte().numpy()
        want = tiny("naclip").coarse_logits(img, CLASSES)
        torch.testing.assert_close(tiny("naclip", **{"head.name": "naclip_twin"}).coarse_logits(img, CLASSES), want)
    finally:
        HEADS.unregister("naclip_twin")


class ToyMixParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = 0.5  # share of the uniform attention


class ToyMixHead(Head):
    """Attn = w·uniform + (1 − w)·I over the CLIP patches (CLS dropped), per window and stitched."""

    name = "toy_mix_stitch"

    def __init__(self, params: ToyMixParams) -> None:
        super().__init__()
        self.params = params

    def mix_rows(self, n: int, start: int, end: int) -> torch.Tensor:
        """Rows start..end of the attention over n patches: (1, end − start, n)."""
        w = self.params.weight
        return (torch.full((end - start, n), w / n) + (1 - w) * torch.eye(n)[start:end])[None]

    def attention(self, ctx: HeadContext) -> Attention:
        v = qkv(ctx.block, ctx.x)[2][:, :, 1:]  # (B, heads, N, d)
        n = v.shape[2]
        return Attention(attn=self.mix_rows(n, 0, n)[None].expand(v.shape[0], -1, -1, -1), v=v,
                         grid=ctx.grid, has_cls=False)

    def stitched(self, block, st, chunk):
        v = qkv(block, st.x[None])[2][0, :, 1:]  # (heads, N, d)
        z = rows_times(lambda s, e: self.mix_rows(v.shape[1], s, e), v, chunk)
        return block.attn.out_proj(merge_heads(z[None]))[0], st.grid


def test_a_head_registered_from_outside_declares_its_own_stitched_form() -> None:
    """An outside head's ``stitched`` method runs in stitch mode: z = w·mean(v) + (1 − w)·v over the
    stitched tokens of a 2 × 2 window grid, against the naive formula."""
    from dapseg.registry import HEADS

    HEADS.register("toy_mix_stitch", params=ToyMixParams)(ToyMixHead)
    try:
        seg = tiny("naclip", **{"head.name": "toy_mix_stitch", "head.params": {"weight": 0.3},
                                "inference.params": {"chunk": 5}})
        img = image96()
        text = seg.text_embeddings(CLASSES)
        got = stitch(seg.engine, img, text, seg.config.inference)
    finally:
        HEADS.unregister("toy_mix_stitch")
    maps, cls = clip_window_tokens(seg, img)
    x = torch.cat([cls[None], naive_stitch(maps, 16, 96).flatten(1).T])  # (1 + 36, D)
    _, _, v = qkv_naive(seg, x)
    v = v[:, 1:]  # (heads, 36, d)
    z = 0.3 * v.mean(dim=1, keepdim=True) + 0.7 * v
    want = naive_logits(seg, z.transpose(0, 1).reshape(36, -1), (6, 6), text)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["naclip", "proxy", "dap"])
def test_stitched_forms_hold_at_most_chunk_rows_of_attention(name: str, monkeypatch) -> None:
    """Memory heads · chunk · N: every attention block applied, and every block of S made, has at most
    ``chunk`` rows; the result equals the one-chunk run."""
    import dapseg.heads.stitched as stitched_module
    from dapseg.heads.affinity import ProxyAffinity
    from dapseg.heads.base import build_head

    seg = tiny("dap")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1 + 20, seg.clip.last_block.attn.embed_dim, generator=gen)  # CLIP grid 4 × 5
    st = StitchedTokens(x=x, grid=(4, 5), vfm_feats=torch.randn(16, 8, 10, generator=gen),
                        image=torch.rand(3, 64, 80, generator=gen), window_area=32 * 40)
    head = build_head(name, {"knn": 4, "steps": 2, "regions": "kmeans"} if name == "dap" else {})
    whole, _ = head.stitched(seg.clip.last_block, st, 1000)

    rows: list[int] = []
    attend, similarity = stitched_module.attend, ProxyAffinity.similarity
    monkeypatch.setattr(stitched_module, "attend", lambda a, v: (rows.append(a.shape[-2]), attend(a, v))[1])
    monkeypatch.setattr(ProxyAffinity, "similarity",
                        lambda self, s, e: (rows.append(e - s), similarity(self, s, e))[1])
    got, _ = head.stitched(seg.clip.last_block, st, 7)
    assert rows and max(rows) <= 7
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
