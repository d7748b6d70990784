"""What components declare about themselves in their registry entries, and the parts that ask them:
a strategy's window plan (``windows``) and whether it takes plug-ins (``no_plugins``), the bench
stages of any component (``stages``), the preset twins a plug-in makes (``derived_preset``).
docs/design.md, "Contracts", describes each."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from dapseg.api import Segmenter
from dapseg.bench import BenchSettings, StageTimer, format_report, run_bench
from dapseg.bench.stages import declared_stages, resolve, stage_order
from dapseg.bench.windows import n_windows
from dapseg.config import list_presets, load_preset
from dapseg.inference.strategies import whole
from dapseg.registry import PLUGINS, STRATEGIES, all_registries

CLASSES = ["cup", "table", "wall"]
SMALL = {"inference.short_side": None, "inference.crop": 32, "inference.stride": 16, "inference.pad_multiple": None}


def clip_windows(seg: Segmenter, image: np.ndarray) -> int:
    """Windows CLIP's patch embedding sees in one prediction (the batch sizes, summed)."""
    sizes: list[int] = []
    hook = seg.clip.visual.conv1.register_forward_hook(lambda _m, args, _out: sizes.append(args[0].shape[0]))
    try:
        seg.predict(image, CLASSES)
    finally:
        hook.remove()
    return sum(sizes)


@pytest.mark.parametrize(("preset", "overrides"), [
    ("naclip", {}),  # slide
    ("naclip", {"inference.mode": "whole"}),
    ("naclip-stitch", {}),  # aligned to the patch before cutting
    ("trident", {"inference.params": {"kind": "none"}}),  # splice: resized to splice_size first
])
def test_window_plan_is_the_windows_the_strategy_runs(preset, overrides):
    seg = Segmenter.from_preset(preset, random_weights=True, tiny=True, device="cpu",
                                overrides={**SMALL, "inference.max_batch": 4, **overrides})
    image = np.ascontiguousarray(data.coffee()[:70, :105])  # sides no multiple of the 16-px patch
    assert n_windows(seg, image) == clip_windows(seg, image) >= 1


def test_every_built_in_strategy_declares_its_window_plan():
    for name in ("whole", "slide", "splice", "stitch"):
        assert callable(STRATEGIES.get(name).extras.get("windows")), name


def test_every_declared_stage_resolves():
    declared = 0
    for registry in all_registries().values():
        for name in registry.names():
            for stage, paths in declared_stages(registry.get(name)).items():
                for path in paths:
                    owner, attr = resolve(path)
                    assert callable(getattr(owner, attr)), (registry.kind, name, stage, path)
                    declared += 1
    assert declared >= 6  # dap, corrclip (regions), scclip (outliers), splice (sam, global_affinity), pearl_prop


# ----------------------------------------------------------------------------- toy components


def toy_flip_logits(logits):
    """Called by the toy strategy through this module's globals: its declared bench stage."""
    return logits.flip(-1).flip(-1)


def toy_staged(engine, image01, text, cfg):
    return toy_flip_logits(whole(engine, image01, text, cfg))


@pytest.fixture
def toys():
    STRATEGIES.register("toy_staged", extras={"stages": {"toy_stage": ("toy_flip_logits",)}})(lambda: toy_staged)
    STRATEGIES.register("toy_alone", extras={"no_plugins": "toy reason"})(lambda: whole)
    PLUGINS.register("toy_twin", extras={"derived_preset": "toy twin"})(lambda: (lambda head, ctx, *_: head(ctx)))
    yield
    for registry, name in ((STRATEGIES, "toy_staged"), (STRATEGIES, "toy_alone"), (PLUGINS, "toy_twin")):
        registry.unregister(name)


def test_a_components_declared_stage_is_timed_as_its_own(toys):
    seg = Segmenter.from_preset("naclip", random_weights=True, tiny=True, device="cpu",
                                overrides={**SMALL, "inference.mode": "toy_staged"})
    timer = StageTimer()
    before = globals()["toy_flip_logits"]
    with timer.active(seg):
        assert globals()["toy_flip_logits"] is not before  # wrapped where the strategy looks it up
        seg.predict(np.ascontiguousarray(data.coffee()[::12, ::12]), CLASSES)
    assert timer.calls["toy_stage"] == 1 and timer.unresolved == []
    assert globals()["toy_flip_logits"] is before  # the wrapper is gone afterwards
    assert stage_order(["text", "toy_stage", "head", "clip_blocks"]) == ["clip_blocks", "head", "toy_stage", "text"]


def test_a_strategy_without_a_window_plan_has_an_unknown_window_count(toys):
    settings = BenchSettings(device="cpu", random_weights=True, tiny=True, warmup=0, repeats=1,
                             compare_batching=False, count_flops=False,
                             overrides={**SMALL, "inference.mode": "toy_staged"})
    report = run_bench(["naclip"], np.ascontiguousarray(data.coffee()[::12, ::12]), CLASSES, settings, probe_size=32)
    (row,) = report["presets"]
    assert row["windows"] is None and row["seconds_per_window"] is None
    assert row["stages_s"]["toy_stage"] >= 0
    line = next(line for line in format_report(report).splitlines() if line.startswith("naclip "))
    assert line.split()[3] == "-"  # the win column (after preset, dtype and params)


def test_a_strategy_that_refuses_plugins_is_refused_when_the_config_loads(toys):
    with pytest.raises(ValueError, match=r"inference\.mode 'toy_alone' takes no plug-in \('fsa' given\): toy reason"):
        load_preset("naclip", {"inference.mode": "toy_alone", "fsa.enabled": True})
    assert load_preset("naclip", {"inference.mode": "toy_alone"}).plugins == []


def test_a_plugin_declaring_a_derived_preset_twins_every_preset_that_takes_plugins(toys):
    presets = set(list_presets())
    twins = {p.removesuffix("-toy_twin") for p in presets if p.endswith("-toy_twin")}
    fsa_twins = {p.removesuffix("-fsa") for p in presets if p.endswith("-fsa")}
    assert twins == fsa_twins  # the same presets take a plug-in, whichever it is
    assert "naclip" in twins and "naclip-stitch" not in twins and "corrclip" not in twins  # stitch, corrclip refuse
    assert not any("-fsa-" in p or "-toy_twin-" in p for p in presets)  # a preset with a plug-in gets no twin
    config = load_preset("naclip-toy_twin")
    assert [p.name for p in config.plugins] == ["toy_twin"]
    assert config.description.endswith(" + toy twin")
    assert load_preset("naclip-fsa").description.endswith(" + FSA feedback attention")


def test_a_plugin_without_a_derived_preset_makes_none(toys):
    PLUGINS.register("toy_plain_plugin")(lambda: None)
    try:
        assert not any(p.endswith("-toy_plain_plugin") for p in list_presets())
    finally:
        PLUGINS.unregister("toy_plain_plugin")
