"""`dapseg analyze`: histogram AP against scikit-learn, pair labels and counts against naive loops, an
oracle affinity, every VFM family as a source, two gloo ranks, and the command end to end."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve

from dapseg.analysis import run as run_mod
from dapseg.analysis.histogram import PairHistogram
from dapseg.analysis.labels import DROPPED, center_window, patch_labels
from dapseg.analysis.report import output_path
from dapseg.analysis.run import AnalysisOptions, analyze, count_pairs
from dapseg.analysis.sources import Affinity, ClipAttention, SourceInfo, VfmCosine
from dapseg.cli import main
from dapseg.config import ClipConfig, VfmConfig
from dapseg.data.dataset import SegDataset
from dapseg.data.spec import load_dataset_spec
from dapseg.models.clip import build_clip
from dapseg.models.vfm import build_vfm
from dapseg.registry import VFM_FAMILIES
from eval_synth import make_dataset

FAST = ["--random-weights", "--tiny", "--workers", "0", "--no-progress", "--device", "cpu"]


def sklearn_ap_of_hist(h: PairHistogram) -> float:
    """scikit-learn's AP of the histogram read as weighted samples (score = bin index)."""
    idx = np.arange(h.bins, dtype=np.float64)
    scores = np.concatenate([idx, idx])
    truth = np.concatenate([np.ones(h.bins), np.zeros(h.bins)])
    weight = np.concatenate([h.pos.numpy(), h.neg.numpy()]).astype(np.float64)
    keep = weight > 0
    return float(average_precision_score(truth[keep], scores[keep], sample_weight=weight[keep]))


# ---------------------------------------------------------------- histogram AP


def test_histogram_ap_of_a_hand_made_case_matches_exact_ap():
    scores = torch.tensor([0.93, 0.81, 0.80, 0.62, 0.55, 0.41, 0.40, 0.12, -0.25, -0.31, -0.6, -0.9])
    truth = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    h = PairHistogram.empty(2000)
    h.add(scores, truth)
    exact = average_precision_score(truth.numpy(), scores.numpy())
    assert h.average_precision() == pytest.approx(exact, abs=1e-3)
    # every score in its own bin here, so the two agree exactly
    assert h.average_precision() == pytest.approx(exact, abs=1e-12)
    assert h.positive_rate() == pytest.approx(5 / 12)


def test_histogram_ap_with_shared_bins_is_sklearn_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3000, generator=gen) * 2 - 1
    truth = torch.rand(3000, generator=gen) < (scores + 1) / 2  # informative, not perfect
    h = PairHistogram.empty(1000)
    h.add(scores, truth)
    exact = average_precision_score(truth.numpy(), scores.numpy())
    assert h.average_precision() == pytest.approx(exact, abs=1e-3)
    binned = average_precision_score(truth.numpy(), h.bin_index(scores).numpy())
    assert h.average_precision() == pytest.approx(binned, abs=1e-12)
    # the PR curve: scikit-learn's on the bin indices, highest threshold first
    p, r, _ = precision_recall_curve(truth.numpy(), h.bin_index(scores).numpy())
    recall, precision = h.pr_curve()
    np.testing.assert_allclose(recall.numpy(), r[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(precision.numpy(), p[:-1][::-1], atol=1e-12)


def test_histogram_streams_and_merges():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(500, generator=gen) * 2.2 - 1.1  # some outside [-1, 1]: clamped to the end bins
    truth = torch.rand(500, generator=gen) < 0.3
    whole, parts, merged = PairHistogram.empty(50), PairHistogram.empty(50), PairHistogram.empty(50)
    whole.add(scores, truth)
    for s, t in zip(scores.split(37), truth.split(37), strict=True):
        parts.add(s, t)
    merged.merge(parts)
    assert torch.equal(whole.pos, parts.pos) and torch.equal(whole.neg, merged.neg)
    assert whole.n_pos == int(truth.sum()) and whole.n_neg == int((~truth).sum())
    naive = [min(max(int(np.floor((float(s) + 1) / 2 * 50)), 0), 49) for s in scores]
    assert Counter(b for b, t in zip(naive, truth.tolist(), strict=True) if t) == Counter(
        {i: int(c) for i, c in enumerate(whole.pos.tolist()) if c})


def test_histogram_without_positives_has_no_ap():
    h = PairHistogram.empty(10)
    assert np.isnan(h.average_precision()) and np.isnan(h.positive_rate())
    with pytest.raises(ValueError, match="bins"):
        PairHistogram.empty(1)


# ---------------------------------------------------------------- patch labels, pairs


def naive_patch_labels(label: np.ndarray, grid, cell, num_classes: int, ignore: int) -> list[int]:
    out = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            votes = Counter()
            for y in range(label.shape[0]):
                for x in range(label.shape[1]):
                    if int(np.floor(y / cell[0])) == i and int(np.floor(x / cell[1])) == j:
                        v = int(label[y, x])
                        votes[num_classes if v == ignore else v] += 1
            if not votes:  # finer than a pixel: the pixel at the patch centre
                v = int(label[min(int((i + 0.5) * cell[0]), label.shape[0] - 1),
                              min(int((j + 0.5) * cell[1]), label.shape[1] - 1)])
                votes[num_classes if v == ignore else v] += 1
            best = max(votes.values())
            winner = min(c for c, n in votes.items() if n == best)
            out.append(-1 if winner == num_classes else winner)
    return out


@pytest.mark.parametrize(("size", "grid", "cell"), [
    ((16, 16), (4, 4), (4.0, 4.0)),  # CLIP-like: whole patches
    ((18, 17), (4, 4), (4.0, 4.0)),  # pixels beyond the last patch take no part
    ((21, 21), (4, 4), (5.25, 5.25)),  # a model that resizes: fractional strides
    ((6, 6), (8, 8), (0.75, 0.75)),  # patches finer than a pixel
])
def test_patch_labels_are_the_majority_vote(size, grid, cell):
    rng = np.random.default_rng(3)
    label = rng.integers(0, 4, size=size)
    label[rng.random(size) < 0.3] = 255
    ours = patch_labels(torch.from_numpy(label), grid, cell, 4, 255)
    assert ours.tolist() == naive_patch_labels(label, grid, cell, 4, 255)
    assert DROPPED in ours.tolist() or size == (6, 6)


def test_center_window_resizes_the_short_side_then_crops():
    image = np.zeros((30, 60, 3), np.uint8)
    label = np.zeros((30, 60), np.int64)
    label[:, 30:] = 7  # left half 0, right half 7
    image[:, 30:] = 200
    win, lab = center_window(image, label, 20)  # -> 20 x 40, centre 20 x 20: columns 10..29
    assert win.shape == (20, 20, 3) and lab.shape == (20, 20)
    assert (lab[:, :10] == 0).all() and (lab[:, 10:] == 7).all()
    same_image, same_label = center_window(image[:, :30], label[:, :30], 30)
    assert np.array_equal(same_image, image[:, :30]) and np.array_equal(same_label, label[:, :30])


def naive_histogram(rows, cols, labels, bins) -> PairHistogram:
    h = PairHistogram.empty(bins)
    valid = [i for i in range(len(labels)) if labels[i] != DROPPED]
    for i in valid:
        for j in valid:
            if i != j:
                s = float(rows[i] @ cols[j])
                b = min(max(int(np.floor((s + 1) / 2 * bins)), 0), bins - 1)
                (h.pos if labels[i] == labels[j] else h.neg)[b] += 1
    return h


def test_pairs_counted_in_blocks_match_a_double_loop(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    rows = F.normalize(torch.randn(23, 5, generator=gen), dim=-1)
    cols = F.normalize(torch.randn(23, 5, generator=gen), dim=-1)
    labels = torch.randint(-1, 3, (23,), generator=gen)
    naive = naive_histogram(rows, cols, labels, 64)
    a = Affinity(SourceInfo("t", "t"), rows, cols, (1, 23), (1.0, 1.0))
    monkeypatch.setattr(run_mod, "PAIRS_PER_BLOCK", 40)  # blocks of 2 rows: the streaming path
    h = PairHistogram.empty(64)
    n = count_pairs(h, a, labels)
    assert n == int((labels != DROPPED).sum())
    assert torch.equal(h.pos, naive.pos) and torch.equal(h.neg, naive.neg)


def test_one_hot_oracle_has_ap_one():
    labels = torch.tensor([0, 0, 1, 2, 1, -1, 2, 2, 0, 3])
    one_hot = F.one_hot(labels.clamp(min=0), 4).float()
    h = PairHistogram.empty(100)
    count_pairs(h, Affinity(SourceInfo("oracle", "oracle"), one_hot, one_hot, (1, 10), (1.0, 1.0)), labels)
    assert h.average_precision() == 1.0
    assert h.positive_rate() < 1.0


# ---------------------------------------------------------------- the loop, end to end with an oracle


class OracleSource:
    """Reads each pixel's class off the window (the image encodes it) and scores pairs by the cosine of
    one-hot patch labels (majority vote written naively here)."""

    def __init__(self, num_classes: int, ignore: int, patch: int) -> None:
        self.num_classes, self.ignore, self.patch = num_classes, ignore, patch
        self.info = SourceInfo("oracle", "oracle")

    def infos(self):
        return [self.info]

    def __call__(self, window01):
        codes = (window01[0, 0] * 255).round().long().numpy()
        label = np.where(codes == 255, self.ignore, codes // 12)
        g = label.shape[0] // self.patch
        lab = torch.tensor(naive_patch_labels(label, (g, g), (self.patch, self.patch), self.num_classes, self.ignore))
        x = F.one_hot(lab.clamp(min=0), self.num_classes).float()
        return [Affinity(self.info, x, x, (g, g), (float(self.patch), float(self.patch)))]


def test_oracle_affinity_gives_ap_one_through_the_loop(tmp_path):
    spec = load_dataset_spec("cityscapes")  # PNG images: the class codes survive exactly
    make_dataset(tmp_path, spec, n=3, seed=4)
    root = tmp_path / spec.root
    rng = np.random.default_rng(5)
    for k, img in enumerate(sorted((root / spec.img_dir).rglob(f"*{spec.img_suffix}"))):
        blocks = rng.integers(0, 5, size=(4, 4))
        blocks[k % 4, 1] = 255
        lab = np.kron(blocks, np.ones((8, 8), np.int64))  # 32 x 32 in 8 x 8 blocks
        codes = np.where(lab == 255, 255, lab * 12).astype(np.uint8)
        Image.fromarray(np.repeat(codes[..., None], 3, axis=2)).save(img)
        ann = root / spec.ann_dir / img.relative_to(root / spec.img_dir)
        Image.fromarray(lab.astype(np.uint8), mode="L").save(str(ann).replace(spec.img_suffix, spec.seg_suffix))
    ds = SegDataset(spec, tmp_path)
    res = analyze(ds, [OracleSource(spec.num_classes, 255, 4)], AnalysisOptions(window=32, bins=50))
    (r,) = res.sources
    assert res.n_images == 3 and r.grid == (8, 8) and r.patches == 3 * 64 - 3 * 4  # the ignore blocks dropped
    assert r.hist.average_precision() == 1.0 and 0 < r.hist.positive_rate() < 1


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("family", VFM_FAMILIES.names())
def test_every_vfm_family_is_a_cosine_source(family):
    spec = VFM_FAMILIES.build(family).specs[0]
    torch.manual_seed(0)
    vfm = build_vfm(VfmConfig(name=spec.name), random_weights=True, tiny=True, window_size=32, device="cpu")
    (a,) = VfmCosine(vfm)(torch.rand(1, 3, 32, 32))
    gh, gw = a.grid
    assert a.info.key == f"vfm:{spec.name}" and a.rows.shape == (gh * gw, vfm(torch.rand(1, 3, 32, 32)).feats.shape[1])
    assert torch.allclose(a.rows.norm(dim=-1), torch.ones(gh * gw), atol=1e-5)
    assert gh * a.cell[0] <= 32 + 1e-9 and gw * a.cell[1] <= 32 + 1e-9  # the grid lies on the window
    labels = patch_labels(torch.zeros(32, 32, dtype=torch.long), a.grid, a.cell, 2, 255)
    h = PairHistogram.empty(20)
    assert count_pairs(h, a, labels) == gh * gw and h.n_pos == gh * gw * (gh * gw - 1)


def test_clip_attention_sources_are_cosines_of_last_block_q_k_v():
    from dapseg.heads.base import merge_heads, qkv
    from dapseg.inference.preprocess import normalize

    torch.manual_seed(0)
    clip = build_clip(ClipConfig(), random_weights=True, tiny=True)
    window = torch.rand(1, 3, 32, 48)
    got = {a.info.key: a for a in ClipAttention(clip)(window)}
    x, grid = clip.tokens_before_last_block(normalize(window, clip.mean, clip.std))
    q, k, v = (merge_heads(t)[0, 1:] for t in qkv(clip.last_block, x))
    for key, (a, b) in {"clip:q-k": (q, k), "clip:q-q": (q, q), "clip:k-k": (k, k), "clip:v-v": (v, v)}.items():
        expected = (a @ b.t()) / (a.norm(dim=-1)[:, None] * b.norm(dim=-1)[None, :])
        assert torch.allclose(got[key].rows @ got[key].cols.t(), expected, atol=1e-5), key
        assert got[key].grid == grid == (2, 3) and got[key].cell == (16.0, 16.0)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, "voc21", n=3, seed=1)
    return root


def histograms(out: Path) -> dict[str, tuple[list[int], list[int]]]:
    payload = json.loads((out / "ap.json").read_text())
    return {s["source"]: (s["histogram"]["positives"], s["histogram"]["negatives"]) for s in payload["sources"]}


def test_torchrun_two_gloo_ranks_sum_to_one_process(voc, tmp_path, cli_env):
    """Two CPU ranks (gloo) share the images and sum their histograms: the same counts as one process."""
    import subprocess
    import sys

    args = ["analyze", "--dataset", "voc21", "--data-root", str(voc), "--vfm", "dino_vits8", "--window", "32",
            "--bins", "100", *FAST]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**cli_env, "DAPSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "dapseg", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert histograms(tmp_path / "two") == histograms(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "ap.json").read_text())["settings"]["provenance"]["world_size"] == 2


def test_analyze_command_end_to_end(voc, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["analyze", "--dataset", "voc21", "--data-root", str(voc), "--vfm", "dino_vits8", "--vfm",
               "mae_vitb16", "--window", "64", "--bins", "200", "--limit", "2", "--out", str(out), *FAST])
    printed = capsys.readouterr().out
    assert rc == 0 and "CLIP tiny q·k" in printed and "2 images" in printed
    keys = ["clip:q-k", "clip:q-q", "clip:k-k", "clip:v-v", "vfm:dino_vits8", "vfm:mae_vitb16"]
    import pandas as pd

    table = pd.read_csv(out / "ap.csv")
    assert list(table["source"]) == keys
    payload = json.loads((out / "ap.json").read_text())
    assert payload["n_images"] == 2 and payload["settings"]["window"] == 64 and payload["settings"]["bins"] == 200
    assert payload["settings"]["random_weights"] is True and payload["settings"]["vfms"] == ["dino_vits8", "mae_vitb16"]
    grids = {s["source"]: s["grid"] for s in payload["sources"]}
    assert grids["clip:q-k"] == "4x4" and grids["vfm:dino_vits8"] == "8x8" and grids["vfm:mae_vitb16"] == "4x4"
    for s, row in zip(payload["sources"], table.itertuples(), strict=True):
        h = PairHistogram(torch.tensor(s["histogram"]["positives"]), torch.tensor(s["histogram"]["negatives"]))
        assert h.bins == 200 and h.n_pos == s["positive_pairs"] > 0 and h.n_neg == s["negative_pairs"] > 0
        assert s["AP"] == pytest.approx(100 * sklearn_ap_of_hist(h), abs=0.006)  # rounded to 2 decimals
        assert s["chance_AP"] == pytest.approx(100 * h.n_pos / (h.n_pos + h.n_neg), abs=0.006)
        assert s["AP"] == row.AP and h.n_pos + h.n_neg <= s["patches"] * (s["patches"] - 1)
    clip_counts = {(s["positive_pairs"], s["negative_pairs"]) for s in payload["sources"][:4]}
    assert len(clip_counts) == 1  # CLIP's four attentions score the same pairs
    md = (out / "ap.md").read_text()
    assert "Random weights" in md and "chance AP (%)" in md and all(f"| {lab} |" in md for lab in table["label"])
    with Image.open(out / "pr_curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # not the folder lock
    assert written == ["ap.csv", "ap.json", "ap.md", "pr_curves.png"]


def test_analyze_defaults_to_the_presets_vfm_and_window(voc, tmp_path, monkeypatch):
    seen = {}

    def fake_analyze(args, plan):
        seen.update(plan)
        raise KeyboardInterrupt

    from dapseg.commands import analyze as command

    monkeypatch.setattr(command, "_analyze", fake_analyze)
    with pytest.raises(KeyboardInterrupt):
        command.run(command_args(voc, tmp_path, "--dataset", "cityscapes"))
    assert seen["vfms"] == ["dino_vitb8"] and seen["window"] == 224  # proxyclip on cityscapes: crop 224
    with pytest.raises(KeyboardInterrupt):
        command.run(command_args(voc, tmp_path, "--preset", "proxyclip-sam_vitb"))
    assert seen["vfms"] == ["sam_vitb"] and seen["window"] == 336
    with pytest.raises(KeyboardInterrupt):
        command.run(command_args(voc, tmp_path, "--preset", "proxyclip-sd15", "--vfm", "dino_vits8", "--vfm", "sd15"))
    assert seen["vfms"] == ["dino_vits8", "sd15"]


def command_args(voc, tmp_path, *extra):
    from dapseg.cli import build_parser

    base = ["analyze", "--dataset", "voc21", "--data-root", str(voc), "--out", str(tmp_path / "o"), *FAST]
    args = build_parser().parse_args(base + list(extra))
    return args


@pytest.mark.parametrize(("extra", "message"), [
    (["--vfm", "no_such_vfm"], "unknown VFM 'no_such_vfm'; valid names: dino_vits8"),
    (["--vfm", "dino_vits8", "--window", "40"], "--window 40 is not a multiple of CLIP tiny's patch size 16"),
    (["--vfm", "dino_vits8", "--vfm", "mae_vitb16", "--vfm-weights", "x.pth"], "--vfm-weights needs exactly one"),
    (["--bins", "1"], "--bins must be >= 2"),
])
def test_analyze_bad_arguments_fail_clearly(voc, tmp_path, capsys, extra, message):
    rc = main(["analyze", "--dataset", "voc21", "--data-root", str(voc), "--out", str(tmp_path / "o"), *FAST, *extra])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o" / "ap.json").exists()


def test_outputs_outside_the_out_folder_are_refused(voc, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    assert output_path(out, "ap.md") == (out / "ap.md").resolve()
    with pytest.raises(ValueError, match="leads outside"):
        output_path(out, "../elsewhere.md")
    (out / "ap.json").symlink_to(tmp_path / "elsewhere.json")
    rc = main(["analyze", "--dataset", "voc21", "--data-root", str(voc), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "'ap.json' leads outside" in err
    assert not (tmp_path / "elsewhere.json").exists()


def test_without_the_analyze_extra(voc, tmp_path, capsys, monkeypatch):
    """matplotlib (the `analyze` extra) missing: the command says at once what to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["analyze", "--dataset", "voc21", "--data-root", str(voc), "--out", str(tmp_path / "o"), *FAST])
    assert rc == 2 and "pip install 'dapseg[analyze]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_second_run_on_the_same_out_folder_stops(voc, tmp_path, capsys, cli_env):
    import subprocess
    import textwrap

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from dapseg.folder_lock import hold_folder
        with hold_folder({str(out)!r}, "--out"):
            print("held", flush=True)
            time.sleep(60)
    """)], env=cli_env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["analyze", "--dataset", "voc21", "--data-root", str(voc), "--out", str(out), *FAST])
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and f"pid {holder.pid}" in capsys.readouterr().err
    assert not (out / "ap.json").exists()
