"""`dapseg bench` on tiny random-weight models: structure of the report, FLOP counting against a
matmul count written out by hand, the stage table, JSON output. No timing assertions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dapseg.bench import FUNCTION_STAGES, STAGES, BenchSettings, StageTimer, count_flops, run_bench
from dapseg.bench.stages import resolve
from dapseg.bench.table import format_report
from dapseg.cli import main
from dapseg.config import ClipConfig
from dapseg.models.clip import build_clip


def test_flops_of_linear_and_bmm_match_hand_count() -> None:
    x = torch.randn(2, 3, 4)
    w = torch.randn(5, 4)
    b = torch.randn(2, 5, 6)
    flops, out = count_flops(lambda: torch.bmm(F.linear(x, w), b))
    assert out.shape == (2, 3, 6)
    # linear: 2·(2·3)·4·5 multiply-adds counted as 2 FLOPs each; bmm: 2·2·3·5·6
    assert flops == 2 * 6 * 4 * 5 + 2 * 2 * 3 * 5 * 6


def test_flops_of_fused_attention_match_hand_count() -> None:
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 4)
    flops, out = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert out.shape == (2, 3, 10, 4)
    assert flops == 2 * 2 * 3 * 10 * 12 * 8 + 2 * 2 * 3 * 10 * 12 * 4  # q·kᵀ + attn·v, 2 batches × 3 heads


def test_flops_of_tiny_clip_blocks_match_hand_count() -> None:
    clip = build_clip(ClipConfig(), random_weights=True, tiny=True)
    # tiny vision tower: width D = 64, 2 layers (1 run before the last block), 4 heads of 16,
    # MLP 2·D, patch 16. A 32 × 48 image: 2 × 3 = 6 patches, T = 7 tokens with CLS.
    d, t, n, mlp, patch_in = 64, 7, 6, 128, 3 * 16 * 16
    images = torch.randn(1, 3, 32, 48)
    flops, (x, grid) = count_flops(lambda: clip.tokens_before_last_block(images))
    assert grid == (2, 3) and x.shape == (1, t, d)
    conv = 2 * n * patch_in * d
    qkv = 2 * t * d * 3 * d
    scores_and_mix = 2 * (2 * t * t * d)  # q·kᵀ and attn·v over all heads: 2·T·T·(heads·16) each
    out_proj = 2 * t * d * d
    ffn = 2 * t * d * mlp + 2 * t * mlp * d
    assert flops == conv + qkv + scores_and_mix + out_proj + ffn


def test_every_stage_path_resolves() -> None:
    """A module move must update FUNCTION_STAGES (the bench would otherwise lose a stage)."""
    for paths in FUNCTION_STAGES.values():
        for path in paths:
            owner, attr = resolve(path)
            assert callable(getattr(owner, attr))


def test_bad_stage_path_is_named() -> None:
    with pytest.raises(ValueError, match=r"dapseg\.nowhere"):
        resolve("dapseg.nowhere:f")
    with pytest.raises(ValueError, match="NoSuchClass"):
        resolve("dapseg.api:NoSuchClass.predict")


def test_stage_timer_is_exclusive_and_restores_the_functions() -> None:
    import dapseg.api
    from dapseg.models.clip import DenseClip

    before = (DenseClip.__dict__["tokens_entering_blocks"], dapseg.api.Segmenter.__dict__["predict"])
    timer = StageTimer()
    # a stage called inside another: the inner call's time goes to the inner stage only
    outer = timer.wrap("stitching", lambda f: f())
    inner = timer.wrap("head", lambda: time.sleep(0.02))
    with timer.active():
        assert DenseClip.__dict__["tokens_entering_blocks"] is not before[0]
        outer(inner)
    assert (DenseClip.__dict__["tokens_entering_blocks"], dapseg.api.Segmenter.__dict__["predict"]) == before
    assert timer.calls == {"stitching": 1, "head": 1}
    assert timer.seconds["head"] >= 0.02 and timer.seconds["stitching"] >= 0
    # the outer stage's own time excludes the inner sleep (an inclusive timer would give it >= 0.02 s)
    assert timer.seconds["stitching"] < timer.seconds["head"]
    assert timer.unresolved == []


@pytest.fixture(scope="module")
def tiny_report() -> dict:
    image = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    settings = BenchSettings(
        device="cpu", random_weights=True, tiny=True, warmup=1, repeats=2,
        overrides={"inference.short_side": 64, "inference.crop": 64, "inference.stride": 32,
                   "inference.pad_multiple": 32},
    )
    return run_bench(["proxyclip", "naclip"], image, ["cat", "sky", "grass"], settings, probe_size=128)


def test_report_has_a_row_per_preset_with_params_flops_and_stages(tiny_report: dict) -> None:
    rows = {r["preset"]: r for r in tiny_report["presets"]}
    assert set(rows) == {"proxyclip", "naclip"}
    assert tiny_report["probe"]["gflops_per_s"] > 0
    assert tiny_report["machine"]["torch"] == torch.__version__
    proxy, naclip = rows["proxyclip"], rows["naclip"]
    assert set(proxy["params"]) == {"clip", "vfm"} and set(naclip["params"]) == {"clip"}
    assert proxy["params"]["clip"] == naclip["params"]["clip"]  # the same tiny CLIP
    # 64 × 107 after the short-side resize: windows of 64 at stride 32 -> 1 row × 3 columns
    assert proxy["windows"] == naclip["windows"] == 3
    # the proxy preset runs a VFM on top of the same CLIP: strictly more matmul work
    assert proxy["gflops"] > naclip["gflops"] > 0
    for r in rows.values():
        assert set(r["stages_s"]) <= set(STAGES)
        assert {"clip_blocks", "head", "stitching", "postprocess"} <= set(r["stages_s"])
        assert len(r["seconds"]) == 3 and r["seconds"]["min"] <= r["seconds"]["median"] <= r["seconds"]["max"]
        # exclusive stage times add up to at most the wall time of the prediction they partition
        assert sum(r["stages_s"].values()) <= r["seconds"]["max"] * 1.001
        assert r["one_at_a_time"] is not None and r["peak_memory_mib"] > 0
        assert r["stage_paths_unresolved"] == []
        assert r["probe_gflops_per_s"] > 0 and r["cpu_seconds"]["median"] > 0
        assert r["fraction_of_probe"] == pytest.approx(r["gflops"] / r["seconds"]["median"] / r["probe_gflops_per_s"])
        assert r["seconds_per_window"] == pytest.approx(r["seconds"]["median"] / r["windows"])
    assert "vfm" in proxy["stages_s"] and "vfm" not in naclip["stages_s"]


def test_stable_diffusion_preset_has_a_row() -> None:
    """SD's row: its UNet counted as the VFM, its forward timed as the vfm stage, time per window."""
    from skimage import data

    settings = BenchSettings(device="cpu", random_weights=True, tiny=True, warmup=0, repeats=1,
                             compare_batching=False, count_flops=False)
    report = run_bench(["proxyclip-sd15"], data.astronaut()[::8, ::8], ["person", "sky"], settings, probe_size=64)
    (row,) = report["presets"]
    assert row["windows"] == 1 and row["params"]["vfm"] > 0 and row["stages_s"]["vfm"] > 0
    assert row["seconds_per_window"] == pytest.approx(row["seconds"]["median"]) and row["peak_memory_mib"] > 0
    assert "proxyclip-sd15" in format_report(report)


def test_report_formats_as_a_table(tiny_report: dict) -> None:
    text = format_report(tiny_report)
    assert "matmul probe" in text
    for preset in ("proxyclip", "naclip"):
        assert sum(line.startswith(preset) for line in text.splitlines()) == 2  # main table + stages


def test_cli_writes_json_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "naclip", "--random-weights", "--tiny", "--image", str(img),
               "--classes", "cat, dog", "--repeats", "1", "--warmup", "0", "--probe-size", "64",
               "--set", "inference.short_side=48", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["preset"] for r in report["presets"]] == ["naclip"]
    assert report["presets"][0]["classes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "img.png"]  # no temporary left
    assert "naclip" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "naclip", "--tiny"], "--tiny needs --random-weights"),
        (["--preset", "no-such-preset", "--random-weights", "--tiny"], "no-such-preset"),
        (["--preset", "naclip", "--random-weights", "--tiny", "--repeats", "0"], "repeats"),
    ],
)
def test_cli_bad_input_is_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_stitch_window_count_uses_the_aligned_size() -> None:
    from dapseg.api import Segmenter
    from dapseg.bench.windows import n_windows

    seg = Segmenter.from_preset("naclip-stitch", random_weights=True, tiny=True, device="cpu",
                                overrides={"inference.short_side": 70, "inference.crop": 32, "inference.stride": 16})
    image = np.zeros((70, 105, 3), np.uint8)
    # 70 x 105 aligned to the 16-px patch: 64 x 112 -> (64-32)/16+1 = 3 rows, (112-32)/16+1 = 6 columns
    # (unaligned it would be 4 x 6 = 24)
    assert n_windows(seg, image) == 18


def test_dap_report_shows_regions_and_text_encoding_as_their_own_stages() -> None:
    image = (np.random.default_rng(2).random((48, 80, 3)) * 255).astype(np.uint8)
    settings = BenchSettings(
        device="cpu", random_weights=True, tiny=True, warmup=0, repeats=1, compare_batching=False,
        count_flops=False, overrides={"inference.short_side": 64, "inference.crop": 64, "inference.stride": 32},
    )
    report = run_bench(["dap"], image, ["cat", "sky", "grass"], settings, probe_size=64)
    (row,) = report["presets"]
    assert row["stages_s"]["regions"] > 0 and row["stage_paths_unresolved"] == []
    assert row["text_encoding_s"] > 0
    text = format_report(report)
    assert "regions" in text and "text enc s" in text


def test_scclip_report_shows_the_outlier_score_as_its_own_stage() -> None:
    image = (np.random.default_rng(3).random((48, 80, 3)) * 255).astype(np.uint8)
    settings = BenchSettings(
        device="cpu", random_weights=True, tiny=True, warmup=0, repeats=1, compare_batching=False,
        count_flops=False, overrides={"inference.short_side": 64, "inference.crop": 64, "inference.stride": 32},
    )
    report = run_bench(["scclip"], image, ["cat", "sky", "grass"], settings, probe_size=64)
    (row,) = report["presets"]
    assert row["stages_s"]["outliers"] > 0 and row["stages_s"]["clip_blocks"] > 0
    assert row["stage_paths_unresolved"] == []
    assert "outliers" in format_report(report)


def test_cli_benches_each_preset_at_each_precision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--precision fp32,bf16: a row per preset and precision, side by side, each with the dtype its
    models were held in, and the speed ratio printed."""
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "naclip", "--random-weights", "--tiny", "--precision", "fp32,bf16",
               "--classes", "cat, dog", "--repeats", "1", "--warmup", "0", "--probe-size", "64",
               "--no-flops", "--no-batching-comparison", "--set", "inference.short_side=48", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [(r["preset"], r["precision"]) for r in report["presets"]] == [("naclip", "float32"), ("naclip", "bfloat16")]
    assert report["settings"]["precisions"] == ["fp32", "bf16"]
    text = capsys.readouterr().out
    assert "naclip: bfloat16" in text and "the speed of float32" in text
    assert main(["bench", "--preset", "naclip", "--random-weights", "--tiny", "--precision", "fp32,half"]) == 2
    assert "--precision" in capsys.readouterr().err
