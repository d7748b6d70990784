"""The web demo's request logic without a browser: shares, knobs, model pool, requests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from dapseg.config import SegmenterConfig, load_preset
from dapseg.demo.backend import (
    DemoSession,
    Knobs,
    heatmap_state,
    knobs_from_ui,
    legend_html,
    percent_shares,
    plugin_choices,
    refiner_choices,
)
from dapseg.pool import SegmenterPool
from dapseg.registry import PLUGINS, REFINERS

# ----------------------------------------------------------------------------- percent_shares


@pytest.mark.parametrize("seed", range(5))
def test_percent_shares_sum_to_exactly_100_and_stay_within_a_hundredth(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    raw = rng.random(n) * (rng.random(n) > 0.3)  # some classes have no pixels
    raw[0] += 0.1
    shares = {f"c{i}": float(v) for i, v in enumerate(raw)}
    out = percent_shares(shares)
    assert list(out) == list(shares)
    assert sum(round(v * 100) for v in out.values()) == 10000  # exactly 100.00 in hundredths
    for k, v in shares.items():
        naive = v / raw.sum() * 100
        assert abs(out[k] - naive) < 0.01 + 1e-9
        assert out[k] == round(out[k], 2)
    # Percentages in give the same as fractions in.
    assert percent_shares({k: v * 100 for k, v in shares.items()}) == out


def test_percent_shares_degenerate_inputs():
    assert percent_shares({"only": 0.37}) == {"only": 100.0}
    assert percent_shares({"a": 1, "b": 0, "c": 0}) == {"a": 100.0, "b": 0.0, "c": 0.0}
    thirds = percent_shares({"a": 1, "b": 1, "c": 1})
    assert sorted(thirds.values()) == [33.33, 33.33, 33.34]
    with pytest.raises(ValueError, match="sum to zero"):
        percent_shares({"a": 0.0})
    with pytest.raises(ValueError):
        percent_shares({})


def test_legend_html_escapes_names_and_lists_every_class():
    text = legend_html(["<b>cat</b>", "sky; clouds"], [(1, 2, 3), (4, 5, 6)], {"<b>cat</b>": 25.0,
                                                                               "sky; clouds": 75.0})
    assert "<b>cat</b>" not in text and "&lt;b&gt;cat&lt;/b&gt;" in text
    assert re.findall(r'legend-share[^>]*>([\d.]+)<', text) == ["25.00", "75.00"]
    assert "rgb(4,5,6)" in text and "100.00" in text


# ----------------------------------------------------------------------------- knobs


def test_knobs_from_ui_and_their_overrides_validate():
    k = knobs_from_ui(0, 224, 112, 0.25, "fsa", "pamr")
    assert k == Knobs(None, 224, 112, 0.25, "fsa", "pamr")
    config = SegmenterConfig().with_overrides(k.overrides())
    assert config.inference.short_side is None and config.inference.stride == 112
    assert config.postprocess.prob_thd == 0.25 and config.plugin("fsa") is not None
    assert config.refine.name == "pamr" and config.inference.crop == 224
    assert Knobs.from_config(config) == k
    off = config.with_overrides(knobs_from_ui(0, 224, 112, 0.25, "none", "none").overrides(config))
    assert off.plugins == [] and off.refine.name == "none"
    pamr = load_preset("naclip-pamr")  # the same refiner keeps the preset's parameters
    kept = pamr.with_overrides(Knobs.from_config(pamr).overrides(pamr))
    assert kept == pamr
    with pytest.raises(ValueError, match="stride"):
        knobs_from_ui(336, 112, 224, 0.0, "none", "none")
    with pytest.raises(ValueError, match="refiner"):
        knobs_from_ui(336, 224, 112, 0.0, "none", "crf")
    with pytest.raises(ValueError, match="plug-in"):
        knobs_from_ui(336, 224, 112, 0.0, "fsb", "none")


def test_menus_list_the_registries():
    assert plugin_choices() == ["none", *PLUGINS.names()] and "fsa" in plugin_choices()
    assert refiner_choices() == ["none", *REFINERS.names()] and {"pamr", "sam"} <= set(refiner_choices())


# ----------------------------------------------------------------------------- pool


class _FakeSeg:
    """Records how it was made; derive() shares the base's 'modules' (its identity)."""

    def __init__(self, config: SegmenterConfig, root: _FakeSeg | None = None):
        self.config = config
        self.root = root or self
        self.derived: list[dict] = []

    def derive(self, overrides):
        self.derived.append(dict(overrides))
        return _FakeSeg(self.config.with_overrides(overrides), self.root)


def test_pool_builds_each_preset_once_and_derives_knob_changes():
    built: list[str] = []

    def build(name):
        built.append(name)
        return _FakeSeg(SegmenterConfig(name=name))

    pool = SegmenterPool(build, capacity=2, derived_capacity=2)
    base = pool.get("a", {})
    same = pool.get("a", Knobs.from_config(base.config).overrides(base.config))  # knobs at the defaults
    assert same is base and base.derived == []
    d1 = pool.get("a", {"inference.stride": 56})
    assert d1.root is base and d1.config.inference.stride == 56
    assert pool.get("a", {"inference.stride": 56}) is d1  # the derived one is reused
    assert base.derived == [{"inference.stride": 56}]
    pool.get("a", {"inference.stride": 48})
    pool.get("a", {"inference.stride": 40})  # evicts stride 56 (derived_capacity 2)
    assert pool.get("a", {"inference.stride": 56}) is not d1
    pool.get("b", {})
    pool.get("a", {})
    pool.get("c", {})  # evicts b (least recently used)
    assert built == ["a", "b", "c"] and pool.builds == 3
    pool.get("b", {})
    assert built == ["a", "b", "c", "b"]
    assert all(k[0] != "a" for k in pool._derived)  # a was evicted with its derived models


# ----------------------------------------------------------------------------- requests


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from dapseg.api import Segmenter

    def build(name):
        return Segmenter(load_preset(name), device="cpu", random_weights=True, tiny=True)

    return DemoSession(SegmenterPool(build), tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "coffee.png"
    Image.fromarray(skimage.data.coffee()[::4, ::4].copy()).save(path)  # 100x150
    return path


def _knobs(name="naclip", **kw):
    return Knobs(**{**vars(Knobs.from_config(load_preset(name))), **kw})


def test_request_gives_views_files_and_shares(session, photo):
    out = session.run(str(photo), "cup, table; desk, background", "naclip", _knobs(prob_thd=0.0))
    assert out.error == ""
    assert out.classes == ["cup", "table; desk", "background"]
    assert out.overlay.width >= 150 and out.label_map.size == (150, 100)
    shares = [float(v) for v in re.findall(r'legend-share[^>]*>([\d.]+)<', out.legend)]
    assert len(shares) == 3 and round(sum(shares), 6) == 100.0
    names = sorted(p.split("/")[-1] for p in out.files)
    assert names == ["coffee.json", "coffee_labels.png", "coffee_overlay.png"]
    by_suffix = {p.rsplit("/", 1)[-1].split("coffee", 1)[1]: p for p in out.files}
    saved = json.loads(Path(by_suffix[".json"]).read_text(encoding="utf-8"))
    assert saved["classes"] == out.classes
    labels = np.asarray(Image.open(by_suffix["_labels.png"]))
    assert labels.shape == (100, 150) and labels.max() < 3
    assert out.state.probs.shape == (3, 100, 150) and out.state.probs.dtype == np.uint8
    # The heatmap's probabilities agree with the label map (argmax, threshold 0) up to quantisation.
    probs = out.state.probs.astype(int)
    chosen = np.take_along_axis(probs, labels[None].astype(int), 0)[0]
    assert (chosen >= probs.max(0) - 1).all()
    assert out.heatmap.size == (150, 100)


def test_request_errors_are_messages(session, photo, tmp_path):
    assert "class list is empty" in session.run(str(photo), " , ", "naclip", _knobs()).error
    assert "class list is empty" in session.run(str(photo), "", "naclip", _knobs()).error
    assert "no image" in session.run(None, "cat", "naclip", _knobs()).error
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert "broken.png" in session.run(str(bad), "cat", "naclip", _knobs()).error
    assert "duplicate" in session.run(str(photo), "cat, cat", "naclip", _knobs()).error
    assert "unknown preset" in session.run(str(photo), "cat", "nope", _knobs()).error


def test_knob_changes_reuse_the_preset_model(session, photo):
    base = session.pool.base("naclip")
    before = session.pool.builds
    a = session.run(str(photo), "cup, table", "naclip", _knobs(stride=56, crop=112))
    b = session.run(str(photo), "cup, table", "naclip", _knobs(short_side=None, prob_thd=0.9))
    assert a.error == "" and b.error == ""
    assert session.pool.builds == before  # no model was rebuilt for the knobs
    derived = [seg for key, seg in session.pool._derived.items() if key[0] == "naclip"]
    assert derived and all(seg.clip is base.clip for seg in derived)


def test_heatmap_state_shrinks_and_quantises():
    image = np.zeros((1000, 500, 3), np.uint8)
    probs = np.stack([np.ones((1000, 500)), np.zeros((1000, 500))]).astype(np.float32)
    st = heatmap_state(image, probs, ["a", "b"])
    assert st.image.shape == (768, 384, 3) and st.probs.shape == (2, 768, 384)
    assert (st.probs[0] == 255).all() and (st.probs[1] == 0).all()


def test_missing_weights_are_a_message_and_other_presets_still_work(session, photo, tmp_path):
    from dapseg.weights import WeightsMissingError

    def build(name):
        if name == "clip":
            raise WeightsMissingError("CLIP ViT-B-16 (openai)", "Run `dapseg download clip`.")
        return session.pool.base(name)

    offline = DemoSession(SegmenterPool(build), tmp_path)
    out = offline.run(str(photo), "cup, table", "clip", _knobs("clip"))
    assert "weights missing: CLIP ViT-B-16" in out.error and "dapseg download clip" in out.error
    assert out.overlay is None and out.files is None
    ok = offline.run(str(photo), "cup, table", "naclip", _knobs())
    assert ok.error == "" and ok.classes == ["cup", "table"]
    assert "weights missing" in offline.run(str(photo), "cup", "clip", _knobs("clip")).error


# ----------------------------------------------------------------------------- the command's catalog


def test_demo_catalog_applies_command_line_settings_to_the_starting_entry(tmp_path):
    from dapseg.cli import build_parser
    from dapseg.commands.demo import make_catalog, weights_for

    args = build_parser().parse_args(["demo", "--preset", "naclip", "--set", "inference.stride=56",
                                      "--clip-weights", str(tmp_path / "ViT-B-16.pt")])
    catalog = make_catalog(args)
    assert catalog.initial == "naclip" and "sclip" in catalog.names
    assert catalog.resolve("naclip").inference.stride == 56
    assert catalog.resolve("sclip").inference.stride == load_preset("sclip").inference.stride
    assert catalog.resolve("sclip").clip.weights == tmp_path / "ViT-B-16.pt"  # same CLIP model
    other = load_preset("sclip").with_overrides({"clip.model": "ViT-L-14"})
    assert weights_for(other, catalog.resolve("naclip")).clip.weights is None  # not for ViT-L/14

    cfg = tmp_path / "mine.yaml"
    cfg.write_text("base: naclip\ninference:\n  stride: 48\n", encoding="utf-8")
    catalog = make_catalog(build_parser().parse_args(["demo", "--config", str(cfg)]))
    assert catalog.initial == "mine (config)" and catalog.names[0] == "mine (config)"
    assert catalog.resolve("mine (config)").inference.stride == 48

    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        make_catalog(build_parser().parse_args(["demo", "--preset", "nope"]))
    assert build_parser().parse_args(["demo"]).host == "127.0.0.1"
