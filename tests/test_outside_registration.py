"""A new method is one module outside the package: a head, a plug-in, a strategy, a refiner, a VFM
family, a mask generator and a preset registered through ``dapseg.extend`` only
(``tests/outside_toys.py``, copied into a temporary folder as a user's ``toys.py``) are validated by
the config, built by the segmenter with what they declare, and run from the CLI
(``dapseg segment --import toys.py --preset toy``) and from an installed distribution's
``dapseg.components`` entry point, with no edit anywhere in ``dapseg``.

Each toy component has its own naive expectation, written here and checked on the segmenter's output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from dapseg import outside
from dapseg.extend import (
    HEADS,
    MASK_GENERATORS,
    PLUGINS,
    REFINERS,
    STRATEGIES,
    VFM_FAMILIES,
    OutsideCodeError,
    import_components,
    unregister_preset,
)

TOYS = Path(__file__).with_name("outside_toys.py")
CLASSES = ["cup", "table", "wall"]
REGISTRIES = {"head": HEADS, "plugin": PLUGINS, "strategy": STRATEGIES, "refiner": REFINERS,
              "vfm_family": VFM_FAMILIES, "mask_generator": MASK_GENERATORS}
TOY_NAMES = {"head": "toy_vfm_mix", "plugin": "toy_identity_mix", "strategy": "toy_flip",
             "refiner": "toy_region_mean", "vfm_family": "toyvfm", "mask_generator": "toy_grid"}


def _forget_toys() -> None:
    for kind, name in TOY_NAMES.items():
        REGISTRIES[kind].unregister(name)
    unregister_preset("toy")


@pytest.fixture
def toys_file(tmp_path: Path):
    """A user's ``toys.py`` (a fresh path per test: a file is imported once per process); its
    components are unregistered afterwards."""
    path = tmp_path / "user code" / "toys.py"
    path.parent.mkdir()
    shutil.copy(TOYS, path)
    yield path
    _forget_toys()


@pytest.fixture
def image() -> np.ndarray:
    return np.ascontiguousarray(data.coffee()[::10, ::10])  # (40, 60, 3)


def _toy_config():
    from dapseg.config import load_preset

    return load_preset("toy", {"plugins.toy_identity_mix.enabled": True})


# ----------------------------------------------------------------------------- in-process, each formula

def test_every_kind_registers_through_dapseg_extend_and_runs_in_a_preset(toys_file, image):
    from dapseg.api import Segmenter
    from dapseg.config import list_presets, load_preset
    from dapseg.demo.backend import plugin_choices, refiner_choices
    from dapseg.postprocess import class_probs, labels_from_probs
    from dapseg.text import ClassSet

    (toys,) = import_components([str(toys_file)])
    assert import_components([str(toys_file)]) == [toys]  # once per process: nothing registered twice
    for kind, name in TOY_NAMES.items():
        assert name in REGISTRIES[kind].names(), kind
    assert "toy" in list_presets() and "toy-fsa" in list_presets()  # derived presets include outside ones
    assert "toy_identity_mix" in plugin_choices() and "toy_region_mean" in refiner_choices()
    config = _toy_config()
    assert config.head.params == {"weight": 0.25, "temperature": 0.1}  # naclip's sigma not carried over
    with pytest.raises(ValueError, match="weight"):
        load_preset("toy", {"head.params.weight": 2.0})  # the outside params model validates
    with pytest.raises(ValueError, match="splits"):
        load_preset("toy", {"masks.params.splits": 0})

    seg = Segmenter(config, random_weights=True, tiny=True, device="cpu")
    toys.CALLS.clear()
    out = seg.predict(image, CLASSES)
    assert toys.CALLS == {"strategy": 1, "vfm": 2, "plugin": 2, "head": 2, "masks": 1, "refiner": 1}

    # VFM family: its own normalisation, then its convolution
    vfm = seg.engine.vfm
    windows = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(toys.TOY_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(toys.TOY_STD).view(1, 3, 1, 1)
    conv = vfm.patch_embed
    want_feats = F.conv2d((windows - mean) / std, conv.weight, conv.bias, stride=16)  # (1, 8, 2, 3)
    got = vfm(windows)
    torch.testing.assert_close(got.feats, want_feats)
    assert got.attn is None

    # head + plug-in: tokens = out_proj((α·(w/n + (1 − w)·softmax(cos(f)/τ)) + (1 − α)·I) · v)
    seen = []
    inner = seg.engine.plugin
    seg.engine.plugin = lambda head, ctx, text, to_embed: (seen.append(ctx), inner(head, ctx, text, to_embed))[1]
    text = seg.text_embeddings(ClassSet.coerce(CLASSES))
    tokens = seg.engine.head_output(windows, text).tokens
    seg.engine.plugin = inner
    ctx = seen[0]
    torch.testing.assert_close(ctx.vfm_feats, want_feats)
    block = ctx.block
    v = F.linear(block.ln_1(ctx.x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, -1)[2][:, 1:]
    f = want_feats.flatten(2)[0].T  # (6, 8)
    cos = (f / f.norm(dim=1, keepdim=True)) @ (f / f.norm(dim=1, keepdim=True)).T
    n = f.shape[0]
    attn = 0.25 / n + 0.75 * torch.softmax(cos / 0.1, dim=1)
    attn = 0.5 * attn + 0.5 * torch.eye(n)
    torch.testing.assert_close(tokens, block.attn.out_proj(attn @ v), atol=1e-5, rtol=1e-5)

    # strategy: the mean of the image's and the mirrored image's whole-image logits
    plain = Segmenter(config.with_overrides({"inference.mode": "whole", "refine.name": "none", "masks": None}),
                      random_weights=True, tiny=True, device="cpu")
    a = plain.coarse_logits(image, ClassSet.coerce(CLASSES))
    b = plain.coarse_logits(np.ascontiguousarray(image[:, ::-1]), ClassSet.coerce(CLASSES)).flip(-1)
    torch.testing.assert_close(out.coarse_logits, 0.5 * (a + b), atol=1e-5, rtol=1e-5)

    # mask generator + refiner: the probabilities averaged over each cell of a 2 × 2 grid of the image
    probs = class_probs(out.logits, config.postprocess.logit_scale, ClassSet.coerce(CLASSES).query_to_class)
    want = probs.clone()
    h, w = image.shape[:2]
    for rows in (slice(0, h // 2), slice(h // 2, h)):
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            want[:, rows, cols] = probs[:, rows, cols].mean((1, 2), keepdim=True)
    torch.testing.assert_close(out.probs, want)
    assert torch.equal(out.labels, labels_from_probs(want, config.postprocess.prob_thd))


def test_a_family_of_its_own_needs_no_release_file_hub_or_filter(toys_file, tmp_path):
    """The defaults of a non-timm family: its weights file holds the model's own keys and is loaded
    strictly; without one (and without random weights) the error says to give --vfm-weights."""
    from safetensors.torch import save_file

    from dapseg.config import VfmConfig
    from dapseg.models.vfm import build_vfm
    from dapseg.weights import WeightsMissingError

    import_components([str(toys_file)])
    source = build_vfm(VfmConfig(name="toyvfm_p16"), random_weights=True, tiny=True)
    weights = {k: torch.randn_like(t) for k, t in source.state_dict().items()}
    path = tmp_path / "toy.safetensors"
    save_file(weights, str(path))
    loaded = build_vfm(VfmConfig(name="toyvfm_p16", weights=path), tiny=True)
    for key, t in loaded.state_dict().items():
        assert torch.equal(t, weights[key]), key
    assert loaded.traits.fsa_lambda == 2.0
    with pytest.raises(WeightsMissingError, match="--vfm-weights"):
        build_vfm(VfmConfig(name="toyvfm_p16"))
    save_file({"other": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors does not fit toyvfm_p16"):
        build_vfm(VfmConfig(name="toyvfm_p16", weights=tmp_path / "bad.safetensors"), tiny=True)


# ----------------------------------------------------------------------------- from the command line


def test_segment_runs_outside_components_from_an_imported_file(toys_file, image, tmp_path, cli):
    from dapseg.api import Segmenter
    from dapseg.viz import labels_from_png

    photo = tmp_path / "coffee.png"
    Image.fromarray(image).save(photo)
    out = tmp_path / "out"
    proc = cli("segment", str(photo), "--classes", ", ".join(CLASSES), "--import", str(toys_file),
               "--preset", "toy", "--plugin", "toy_identity_mix", "--random-weights", "--tiny", "--out", str(out),
               "--workers", "0", "--save", "labels")
    assert proc.returncode == 0, proc.stderr
    toys = outside.import_components([str(toys_file)])[0]  # the module the command imported
    assert {k: v > 0 for k, v in toys.CALLS.items()} == dict.fromkeys(
        ("strategy", "vfm", "plugin", "head", "masks", "refiner"), True)
    with Image.open(out / "coffee_labels.png") as png:
        labels = labels_from_png(np.asarray(png), len(CLASSES))
    h, w = image.shape[:2]
    for rows in (slice(0, h // 2), slice(h // 2, h)):  # the region-mean refiner: one label per grid cell
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            assert len(np.unique(labels[rows, cols])) == 1
    seg = Segmenter(_toy_config(), random_weights=True, tiny=True, device="cpu")
    assert np.array_equal(labels, seg.predict(image, CLASSES).labels.numpy())


def test_presets_and_components_listings_see_imported_code(toys_file, cli):
    proc = cli("presets", "toy", "--import", str(toys_file))  # one preset shown resolved
    assert proc.returncode == 0, proc.stderr
    assert "name: toy_vfm_mix" in proc.stdout and "mode: toy_flip" in proc.stdout
    proc = cli("presets", "--components", "--import", str(toys_file))
    assert proc.returncode == 0, proc.stderr
    for name in TOY_NAMES.values():
        assert f"  {name} " in proc.stdout, name


def test_a_preset_with_its_own_plugin_gets_no_fsa_twin(toys_file):
    """At most one plug-in reworks the head: a preset naming an outside plug-in has no ``-fsa`` form
    (which would be invalid), and every listed preset loads."""
    from dapseg.config import list_presets, load_preset
    from dapseg.extend import register_preset

    import_components([str(toys_file)])
    register_preset("toy_mixed", {"base": "toy", "plugins": [{"name": "toy_identity_mix"}]})
    try:
        names = list_presets()
        assert "toy_mixed" in names and "toy_mixed-fsa" not in names and "toy-fsa" in names
        assert load_preset("toy-fsa").plugin("fsa") is not None
        assert load_preset("toy_mixed").plugin("toy_identity_mix") is not None
    finally:
        unregister_preset("toy_mixed")


def test_every_command_takes_import():
    from dapseg.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert len(sub.choices) >= len(COMMANDS)
    for name, parser in sub.choices.items():
        action = parser._option_string_actions.get("--import")
        assert action is not None and action.dest == "imports" and action.default == [], name


def test_import_errors_name_the_file_or_module(tmp_path, cli):
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\nraise_here = undefined_name\n", encoding="utf-8")
    proc = cli("presets", "--import", str(broken))
    assert proc.returncode == 2
    assert f"--import {broken}: NameError: name 'undefined_name' is not defined" in proc.stderr
    assert "line 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not [m for m in sys.modules if m.startswith("dapseg_import_broken_")]  # no half-imported module left
    proc = cli("presets", "--import", str(tmp_path / "missing.py"))
    assert proc.returncode == 2 and f"--import {tmp_path / 'missing.py'}: no such file" in proc.stderr
    proc = cli("presets", "--import", "no_such_module_dapseg_test")
    assert proc.returncode == 2 and "no module named 'no_such_module_dapseg_test'" in proc.stderr


def test_a_preset_of_dapseg_cannot_be_replaced_from_outside():
    from dapseg.config import list_presets
    from dapseg.extend import register_preset

    register_preset("naclip", {"description": "mine"})
    try:
        with pytest.raises(ValueError, match="'naclip' registered from outside the package is a preset of dapseg"):
            list_presets()
    finally:
        unregister_preset("naclip")
    with pytest.raises(ValueError, match="settings must be a mapping"):
        register_preset("mine", ["not", "a", "mapping"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- entry points

def _distribution(site: Path, entry_points: str) -> None:
    """An installed distribution ``toy-dapseg-parts`` in ``site`` (a folder on sys.path): its
    ``*.dist-info`` with the entry points, as pip writes them."""
    info = site / "toy_dapseg_parts-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-dapseg-parts\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    outside.reset_entry_points()
    yield site
    monkeypatch.undo()  # the distribution leaves sys.path before the entry points are read again
    outside.reset_entry_points()


def test_an_installed_entry_point_is_loaded_before_the_first_lookup(site, cli):
    shutil.copy(TOYS, site / "toy_parts_module.py")
    _distribution(site, "[dapseg.components]\ntoys = toy_parts_module\n")
    try:
        assert "toy_vfm_mix" in HEADS  # the first lookup after installing loads the entry point
        for kind, name in TOY_NAMES.items():
            assert name in REGISTRIES[kind], kind
        proc = cli("presets", "toy")  # a command sees the entry point's preset without --import
        assert proc.returncode == 0, proc.stderr
        assert "outside the package" in proc.stdout
    finally:
        _forget_toys()
        sys.modules.pop("toy_parts_module", None)


def test_an_entry_point_is_found_by_a_fresh_process(site, cli_env):
    """The real mechanism end to end: a new interpreter with the distribution on its path loads the
    entry point on its first lookup."""
    shutil.copy(TOYS, site / "toy_parts_fresh.py")
    _distribution(site, "[dapseg.components]\ntoys = toy_parts_fresh\n")
    code = "from dapseg.registry import HEADS\nprint('toy_vfm_mix' in HEADS)\n"
    env = {**cli_env, "PYTHONPATH": f"{site}{os.pathsep}{cli_env['PYTHONPATH']}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_an_entry_point_naming_a_function_is_called(site):
    (site / "toy_parts_hook.py").write_text(
        "from dapseg.extend import register_preset\n"
        "def register():\n"
        "    register_preset('toy_hook', {'base': 'naclip', 'description': 'from a hook'})\n",
        encoding="utf-8",
    )
    _distribution(site, "[dapseg.components]\nhook = toy_parts_hook:register\n")
    from dapseg.config import load_preset

    try:
        assert load_preset("toy_hook").description == "from a hook"
    finally:
        unregister_preset("toy_hook")
        sys.modules.pop("toy_parts_hook", None)


def test_a_broken_entry_point_names_itself_and_its_distribution(site, cli):
    _distribution(site, "[dapseg.components]\nbroken = no_such_module_of_toy_parts\n")
    with pytest.raises(OutsideCodeError, match=r"entry point 'broken' = 'no_such_module_of_toy_parts' of "
                       r"distribution 'toy-dapseg-parts' \(group dapseg.components\) failed to load: "
                       r"ModuleNotFoundError"):
        HEADS.names()
    with pytest.raises(OutsideCodeError, match="entry point 'broken'"):
        STRATEGIES.get("whole")  # every later lookup says so again: no run without installed components
    proc = cli("presets")
    assert proc.returncode == 2
    assert "entry point 'broken'" in proc.stderr and "toy-dapseg-parts" in proc.stderr


# ----------------------------------------------------------------------------- the module itself

def test_importing_the_extension_surface_builds_nothing_heavy(cli_env):
    """``import dapseg.extend`` imports neither open_clip nor timm nor segment-anything (no model is
    built); the engine's types load on first access."""
    import dapseg.extend as extend
    from dapseg.inference.engine import DenseEngine, HeadPlugin
    from dapseg.inference.strategies import Strategy

    code = ("import sys, dapseg.extend\n"
            "print([m for m in ('open_clip', 'timm', 'segment_anything', 'diffusers', 'transformers') "
            "if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (extend.DenseEngine, extend.HeadPlugin, extend.Strategy) == (DenseEngine, HeadPlugin, Strategy)
    assert [n for n in extend.__all__ if not hasattr(extend, n)] == []
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        extend.nothing  # noqa: B018


def test_unregistered_names_fail_when_the_config_loads(tmp_path):
    from dapseg.config import load_config_file

    path = tmp_path / "toy.yaml"
    path.write_text("base: naclip\nhead: {name: toy_vfm_mix}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown head 'toy_vfm_mix'; known: .*dap"):
        load_config_file(path)
