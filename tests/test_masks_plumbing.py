"""Region masks reach heads and refiners: the `masks:` section, Need.REGION_MASKS, the per-window
crops (checked against crops made by hand here), one generator call per image, and the image's name
reaching the generator from predict, `dapseg segment` and `dapseg eval`."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from skimage import data

from dapseg.heads.base import HeadContext, HeadOutput
from dapseg.heads.naclip import NaclipHead
from dapseg.refine import Refined
from dapseg.registry import HEADS, MASK_GENERATORS, REFINERS, Need

CLASSES = ["cup", "table", "wall"]
SENTINEL = 10000  # CorrCLIP's forward_slide pads the crops of the map with value=10000


class CountingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    regions: int = 5


class CountingMasks:
    """A generator with a known map (horizontal bands plus a block), counting its calls and names."""

    calls: ClassVar[list[str | None]] = []

    def __init__(self, params: CountingParams) -> None:
        self.regions = params.regions

    def __call__(self, image: np.ndarray, *, name: str | None = None) -> torch.Tensor:
        CountingMasks.calls.append(name)
        h, w = image.shape[:2]
        rows = torch.arange(h)[:, None].expand(h, w)
        out = (rows * self.regions // h).to(torch.int64)
        out[h // 3 : h // 2, w // 4 : w // 2] = self.regions + 1
        return out


class RecordingHead(NaclipHead):
    """NACLIP's head, recording the region masks it is given (declares Need.REGION_MASKS)."""

    seen: ClassVar[list[torch.Tensor]] = []

    @staticmethod
    def declared_needs(params) -> frozenset[Need]:
        return frozenset({Need.REGION_MASKS})

    def forward(self, ctx: HeadContext) -> HeadOutput:
        if ctx.region_masks is None:
            raise ValueError("no region masks")
        RecordingHead.seen.append(ctx.region_masks.cpu().clone())
        return super().forward(ctx)


class RecordingRefiner:
    seen: ClassVar[list[torch.Tensor | None]] = []

    def __call__(self, inp):
        RecordingRefiner.seen.append(inp.region_masks)
        return Refined(logits=inp.logits)


@pytest.fixture
def toys():
    MASK_GENERATORS.register("toy_count", params=CountingParams)(
        lambda params, *, build: CountingMasks(params))
    HEADS.register("toy_regions", params=NaclipHead.Params, needs={Need.REGION_MASKS})(RecordingHead)
    REFINERS.register("toy_masks", needs={Need.REGION_MASKS})(lambda: RecordingRefiner())
    CountingMasks.calls, RecordingHead.seen, RecordingRefiner.seen = [], [], []
    yield
    MASK_GENERATORS.unregister("toy_count")
    HEADS.unregister("toy_regions")
    REFINERS.unregister("toy_masks")


def _segmenter(**overrides):
    from dapseg.api import Segmenter

    base = {"head.name": "toy_regions", "head.params": {}, "masks": {"name": "toy_count"}}
    return Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu",
                                 overrides={**base, **overrides})


def naive_window_maps(region_map: torch.Tensor, size: tuple[int, int], crop: int, stride: int,
                      multiple: int) -> list[torch.Tensor]:
    """The reference's steps written out: nearest to the processed size, MMSeg's window grid, each
    crop padded centred to a multiple of ``multiple`` with the sentinel."""
    resized = F.interpolate(region_map[None, None].float(), size=size, mode="nearest")[0, 0].long()
    h, w = size
    out = []
    for i in range(max(h - crop + stride - 1, 0) // stride + 1):
        for j in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            win = resized[y1:y2, x1:x2]
            ph, pw = (-win.shape[0]) % multiple, (-win.shape[1]) % multiple
            padded = torch.full((win.shape[0] + ph, win.shape[1] + pw), SENTINEL, dtype=torch.long)
            padded[ph // 2 : ph // 2 + win.shape[0], pw // 2 : pw // 2 + win.shape[1]] = win
            out.append(padded)
    return out


@pytest.mark.parametrize("max_batch", [1, 3])
def test_slide_windows_get_the_map_cropped_like_the_pixels(toys, max_batch):
    seg = _segmenter(**{"inference.short_side": 52, "inference.crop": 40, "inference.stride": 24,
                        "inference.pad_multiple": 28, "inference.max_batch": max_batch})
    image = np.ascontiguousarray(data.coffee()[::6, ::6])  # (67, 100, 3) -> processed 52 x 78
    seg.predict(image, CLASSES)
    assert CountingMasks.calls == [None]  # once per image, not per window
    full = CountingMasks(CountingParams())(image)
    want = naive_window_maps(full, (52, 78), 40, 24, 28)
    got = [m for batch in RecordingHead.seen for m in batch]
    assert len(got) == len(want) == 6
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.int64 and torch.equal(g, w)
    assert (got[0] == SENTINEL).any()  # the windows were padded, and the padding holds the sentinel


def test_whole_gets_the_resized_map_and_the_refiner_the_image_map(toys):
    seg = _segmenter(**{"inference.mode": "whole", "inference.short_side": 40, "inference.pad_multiple": 32,
                        "refine.name": "toy_masks"})
    image = np.ascontiguousarray(data.astronaut()[::8, ::5])  # (64, 103, 3) -> processed 40 x 64
    seg.predict(image, CLASSES)
    assert len(CountingMasks.calls) == 1  # one call feeds the head and the refiner
    full = CountingMasks(CountingParams())(image)
    (got,) = RecordingHead.seen
    assert torch.equal(got[0], naive_window_maps(full, (40, 64), 64, 64, 32)[0])
    (refined,) = RecordingRefiner.seen
    assert torch.equal(refined, full)  # the refiner sees the map at the image's own resolution


def test_no_masks_section_means_no_generator_and_no_region_masks():
    from dapseg.api import Segmenter

    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu")
    assert seg.mask_generator is None and seg.region_map(np.zeros((8, 8, 3), np.uint8)) is None


def test_a_component_needing_masks_without_a_section_is_a_clear_error(toys):
    from dapseg.api import Segmenter

    with pytest.raises(ValueError, match=r"head 'toy_regions' needs region masks; configure a `masks:` section"):
        Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu",
                              overrides={"head.name": "toy_regions", "head.params": {}})
    with pytest.raises(ValueError, match=r"refiner 'toy_masks' needs region masks"):
        Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu",
                              overrides={"refine.name": "toy_masks"})


@pytest.mark.parametrize("mode", ["stitch", "splice"])
def test_strategies_that_cannot_crop_masks_refuse_clearly(toys, mode):
    overrides = {"inference.mode": mode, "inference.params": {}}
    if mode == "splice":
        overrides["inference.params"] = {"kind": "none"}
    with pytest.raises(ValueError, match=rf"inference.mode={mode} does not crop them per window; use "
                                         r"inference.mode=slide or whole"):
        _segmenter(**overrides)


def test_the_masks_section_is_validated_through_the_registry(toys):
    from pydantic import ValidationError

    from dapseg.config import SegmenterConfig

    cfg = SegmenterConfig().with_overrides({"masks.name": "toy_count"})
    assert cfg.masks.params == {"regions": 5}
    assert SegmenterConfig().masks is None
    with pytest.raises(ValidationError, match="unknown mask generator 'nope'; known: "):
        SegmenterConfig().with_overrides({"masks.name": "nope"})
    with pytest.raises(ValidationError, match="bogus"):
        SegmenterConfig().with_overrides({"masks": {"name": "toy_count", "params": {"bogus": 1}}})


def test_predict_names_path_inputs_by_their_stem(toys, tmp_path):
    from PIL import Image

    seg = _segmenter(**{"inference.mode": "whole", "inference.short_side": 32})
    path = tmp_path / "mug.png"
    Image.fromarray(np.ascontiguousarray(data.coffee()[::12, ::12])).save(path)
    seg.predict(path, CLASSES)
    seg.predict(str(path), CLASSES, name="given/name")
    seg.predict(np.zeros((20, 30, 3), np.uint8), CLASSES)
    list(seg.predict_many([path, np.zeros((20, 30, 3), np.uint8)], CLASSES))
    assert CountingMasks.calls == ["mug", "given/name", None, "mug", None]


FAST = ["--random-weights", "--tiny", "--set", "inference.short_side=32", "--set", "inference.crop=32",
        "--set", "inference.stride=16", "--set", "templates=simple_imagenet", "--set", "head.name=toy_regions",
        "--set", "head.params={}"]


def test_segment_reads_masks_dir_by_the_mirrored_name_and_one_missing_mask_fails_alone(toys, tmp_path, capsys):
    from PIL import Image

    from dapseg.cli import main

    image = np.ascontiguousarray(data.coffee()[::10, ::10])  # (40, 60, 3)
    for rel in ("a/mug.png", "b/cup.png"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "in" / rel)
    region_map = np.zeros((40, 60), np.int16)
    region_map[10:30, 5:40] = 3
    (tmp_path / "masks" / "a").mkdir(parents=True)
    np.savez_compressed(tmp_path / "masks" / "a" / "mug.npz", instance_mask=region_map)  # no mask for b/cup
    rc = main(["segment", str(tmp_path / "in"), "--preset", "naclip", "--recursive", "--classes", "cup, table", "--out",
               str(tmp_path / "out"), "--workers", "0", "--masks-dir", str(tmp_path / "masks"), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "no region mask for image 'b/cup'" in err and "a/mug" not in err
    assert (tmp_path / "out" / "a" / "mug_labels.png").is_file() and not (tmp_path / "out" / "b").exists()
    (seen,) = RecordingHead.seen  # whole 32x48 processed image in 2 windows of 32 (stride 16) -> one batch
    want = F.interpolate(torch.from_numpy(region_map.astype(np.int64))[None, None].float(), size=(32, 48),
                         mode="nearest")[0, 0].long()
    assert torch.equal(seen[0], want[:, :32]) and torch.equal(seen[-1], want[:, -32:])


def test_eval_hands_the_sample_names_to_the_generator(toys, tmp_path):
    from dapseg.cli import main
    from eval_synth import make_dataset

    names = sorted(make_dataset(tmp_path / "data", "voc21", n=2, seed=3))
    rc = main(["eval", "--preset", "naclip", "--dataset", "voc21", "--data-root", str(tmp_path / "data"),
               "--work-dir", str(tmp_path / "w"), "--workers", "0", "--no-progress", "--set",
               "masks.name=toy_count", *FAST])
    assert rc == 0 and sorted(CountingMasks.calls) == names


def test_masks_dir_is_the_folder_generator(tmp_path):
    import argparse

    from dapseg.commands.common import add_model_args, config_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--preset", "naclip", "--masks-dir", str(tmp_path)])
    cfg = config_from_args(args)
    assert cfg.masks.name == "folder" and cfg.masks.params == {"root": tmp_path, "key": "instance_mask"}


def test_bench_times_the_masks_as_their_own_stage(toys):
    from dapseg.bench.stages import STAGES, StageTimer

    seg = _segmenter(**{"inference.mode": "whole", "inference.short_side": 32})
    image = np.ascontiguousarray(data.coffee()[::12, ::12])
    timer = StageTimer()
    with timer.active(seg):
        seg.predict(image, CLASSES)
    assert "masks" in STAGES and timer.calls["masks"] == 1 and timer.seconds["masks"] >= 0
    assert timer.calls["head"] >= 1
    assert seg.models.mask_generator.__class__ is CountingMasks  # the wrapper is gone afterwards
