"""The web demo's request handling, free of any UI code: knobs, model pool, result views.

A request (image, class text, preset, knobs) becomes an ``Outputs`` record: the overlay, the
label map, a legend table with pixel shares, the heatmap state and the files to download, or an
error message. Models are built once per preset and kept in the shared ``dapseg.pool.SegmenterPool``;
a request's knobs are config overrides applied with ``Segmenter.derive``, which shares the preset's
modules, so turning a knob never reloads weights. The plug-in and refiner menus list the registries.
"""

from __future__ import annotations

import html
import logging
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dapseg.config import SegmenterConfig
from dapseg.pool import SegmenterPool
from dapseg.registry import PLUGINS, REFINERS
from dapseg.viz import UNLABELED_COLOUR, colour_labels, display_palette

log = logging.getLogger(__name__)

MAX_INPUT_SIDE = 2048  # larger uploads are shrunk first: a demo request must stay interactive
STATE_SIDE = 768  # the heatmap state (image + per-class probabilities) is kept at most this big
NONE = "none"  # the menus' "no plug-in" / "no refiner" entry


def plugin_choices() -> list[str]:
    """The plug-in menu: none plus every registered plug-in."""
    return [NONE, *PLUGINS.names()]


def refiner_choices() -> list[str]:
    """The refiner menu: none plus every registered refiner."""
    return [NONE, *REFINERS.names()]


# ----------------------------------------------------------------------------- request knobs

@dataclass(frozen=True)
class Knobs:
    """The settings a user can turn per request; each maps to one config override."""

    short_side: int | None  # None: keep the input size
    crop: int
    stride: int
    prob_thd: float
    plugin: str  # a registered plug-in, or "none"
    refine: str  # a registered refiner, or "none"

    @classmethod
    def from_config(cls, config: SegmenterConfig) -> Knobs:
        inf = config.inference
        plugin = config.plugins[0].name if config.plugins else NONE
        return cls(inf.short_side, inf.crop, inf.stride, config.postprocess.prob_thd, plugin, config.refine.name)

    def overrides(self, base: SegmenterConfig | None = None) -> dict[str, Any]:
        """The config overrides of these knobs. Against ``base`` (the preset's config), a plug-in or
        refiner that stays the same keeps its preset parameters; a new one starts from its defaults."""
        out: dict[str, Any] = {
            "inference.short_side": self.short_side,
            "inference.crop": self.crop,
            "inference.stride": self.stride,
            "postprocess.prob_thd": self.prob_thd,
        }
        base_plugin = base.plugins[0].name if base is not None and base.plugins else NONE
        if base is None or self.plugin != base_plugin:
            out["plugins"] = [] if self.plugin == NONE else [{"name": self.plugin}]
        if base is None or self.refine != base.refine.name:
            out["refine"] = {"name": self.refine, "params": {}}
        return out


def knobs_from_ui(short_side: float | None, crop: float, stride: float, prob_thd: float,
                  plugin: str, refine: str) -> Knobs:
    """UI values -> Knobs; a short side of 0 (or empty) means "keep the input size"."""
    if refine not in refiner_choices():
        raise ValueError(f"refiner must be one of {', '.join(refiner_choices())}, got {refine!r}")
    if plugin not in plugin_choices():
        raise ValueError(f"plug-in must be one of {', '.join(plugin_choices())}, got {plugin!r}")
    side = int(short_side) if short_side else None
    if int(crop) < 1 or int(stride) < 1:
        raise ValueError(f"window and stride must be >= 1 px, got window {crop}, stride {stride}")
    if int(stride) > int(crop):
        raise ValueError(f"stride ({int(stride)} px) larger than the window ({int(crop)} px) "
                         "would leave pixels unseen")
    return Knobs(side, int(crop), int(stride), float(prob_thd), str(plugin), str(refine))


# ----------------------------------------------------------------------------- result views

UNLABELED_ROW = "\0unlabeled"  # the unlabeled pixels' key among the class shares (no class name has a NUL)


def percent_shares(shares: dict[str, float]) -> dict[str, float]:
    """Pixel shares (fractions or percentages) as percentages rounded to 0.01 that sum to
    exactly 100.00 (largest-remainder rounding), so the table adds up as the user expects."""
    total = float(sum(shares.values()))
    if not shares or total <= 0:
        raise ValueError("pixel shares are empty or sum to zero")
    hundredths = {k: v / total * 10000.0 for k, v in shares.items()}  # in units of 0.01 %
    floors = {k: int(np.floor(v)) for k, v in hundredths.items()}
    missing = 10000 - sum(floors.values())
    # Hand the missing hundredths to the largest remainders (ties: first listed first).
    order = sorted(hundredths, key=lambda k: floors[k] - hundredths[k])
    for k in order[:missing]:
        floors[k] += 1
    return {k: floors[k] / 100.0 for k in shares}


def legend_html(classes: Sequence[str], colors: Sequence[tuple[int, int, int]],
                percents: dict[str, float]) -> str:
    """A legend table: colour swatch, class name, pixel share (%), with a total row; a row for the
    unlabeled pixels where ``percents`` has some (key ``UNLABELED_ROW``)."""
    rows = []
    named = {name: name for name in classes}
    if percents.get(UNLABELED_ROW, 0) > 0:
        classes, colors = [*classes, UNLABELED_ROW], [*colors, UNLABELED_COLOUR]
        named[UNLABELED_ROW] = "(unlabeled)"
    for name, (r, g, b) in zip(classes, colors, strict=True):
        rows.append(
            f'<tr class="legend-row"><td><span class="swatch" style="display:inline-block;width:1.2em;'
            f'height:1.2em;border:1px solid #444;background:rgb({r},{g},{b})"></span></td>'
            f'<td class="legend-class">{html.escape(named[name])}</td>'
            f'<td class="legend-share" style="text-align:right">{percents[name]:.2f}</td></tr>'
        )
    total = sum(percents.values())
    return (
        '<table class="dapseg-legend"><thead><tr><th></th><th>class</th><th>pixels (%)</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody><tfoot><tr><td></td><td>total</td>'
        f'<td class="legend-total" style="text-align:right">{total:.2f}</td></tr></tfoot></table>'
    )


def error_html(message: str) -> str:
    return (f'<div class="dapseg-error" role="alert" style="border:2px solid #c62828;'
            f'background:#ffebee;color:#b71c1c;padding:0.6em 1em;border-radius:6px">'
            f"<b>Error:</b> {html.escape(message)}</div>")


@dataclass
class HeatmapState:
    """What the heatmap dropdown needs, kept per browser session (small: <= STATE_SIDE px)."""

    image: np.ndarray  # (h, w, 3) uint8
    probs: np.ndarray  # (C, h, w) uint8, probability * 255
    classes: list[str]


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def heatmap_state(image: np.ndarray, probs: np.ndarray, classes: list[str]) -> HeatmapState:
    """image (H, W, 3) uint8, probs (C, H, W) float in [0, 1] -> a shrunken uint8 state."""
    small = _shrink(image, STATE_SIDE)
    h, w = small.shape[:2]
    planes = []
    for p in probs:  # per class (H, W): resize in float, then quantise
        plane = Image.fromarray(np.asarray(p, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR)
        planes.append(np.clip(np.asarray(plane) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return HeatmapState(small, np.stack(planes), list(classes))


def render_heatmap(state: HeatmapState, class_name: str) -> Image.Image:
    """The class's probability as a colour map over the image (``dapseg.viz.heatmap``)."""
    from dapseg.viz import heatmap

    if class_name not in state.classes:
        raise ValueError(f"unknown class {class_name!r}; classes: {', '.join(state.classes)}")
    prob = state.probs[state.classes.index(class_name)].astype(np.float32) / 255.0  # (h, w)
    return heatmap(state.image, prob)


# ----------------------------------------------------------------------------- the request

class RequestError(ValueError):
    """A problem with what the user asked for, shown in the page as is."""


# Errors that describe the request (input, class list, settings, weights) rather than a bug.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, RuntimeError)


@dataclass
class Outputs:
    error: str = ""
    status: str = ""
    overlay: Image.Image | None = None
    label_map: Image.Image | None = None
    legend: str = ""
    classes: list[str] = field(default_factory=list)
    heatmap: Image.Image | None = None
    files: list[str] | None = None
    state: HeatmapState | None = None


class DemoSession:
    """Runs one segmentation request: validate, predict with the pooled model, build the views."""

    def __init__(self, pool: SegmenterPool, out_root: Path, keep: int = 32, description: str = ""):
        self.pool = pool
        self.out_root = Path(out_root)
        self.keep = keep  # request folders of downloads kept on disk
        self.description = description
        self._count = 0
        self._lock = threading.Lock()

    def _out_dir(self) -> Path:
        with self._lock:
            self._count += 1
            n = self._count
        out = self.out_root / f"req{n:06d}"
        out.mkdir(parents=True, exist_ok=True)
        old = self.out_root / f"req{n - self.keep:06d}"
        if n > self.keep and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return out

    def run(self, image_path: str | None, classes_text: str, preset: str, knobs: Knobs) -> Outputs:
        try:
            return self._run(image_path, classes_text, preset, knobs)
        except RequestError as e:
            return Outputs(error=str(e))
        except _USER_ERRORS as e:
            log.warning("request failed: %s: %s", type(e).__name__, e)
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            return Outputs(error=msg or type(e).__name__)
        except Exception as e:  # a bug: keep serving, show it, log the traceback
            log.exception("request failed")
            return Outputs(error=f"internal error ({type(e).__name__}): {e}")

    def _run(self, image_path: str | None, classes_text: str, preset: str, knobs: Knobs) -> Outputs:
        from dapseg.images import load_image
        from dapseg.text import ClassSet

        if not image_path:
            raise RequestError("no image: upload one or pick an example first")
        if not re.sub(r"[\s,;]", "", classes_text or ""):  # nothing but separators
            raise RequestError("the class list is empty: type class names separated by commas, "
                               "synonyms by ';' (e.g. 'person, sky; clouds, grass')")
        classes = ClassSet.parse(classes_text)
        image = load_image(image_path)
        note = ""
        if max(image.shape[:2]) > MAX_INPUT_SIDE:
            h, w = image.shape[:2]
            image = _shrink(image, MAX_INPUT_SIDE)
            note = f" (input {w}×{h} shrunk to {image.shape[1]}×{image.shape[0]})"

        t0 = time.perf_counter()
        seg = self.pool.get(preset, knobs.overrides(self.pool.base(preset).config))
        t1 = time.perf_counter()
        res = seg.predict(image, classes)
        t2 = time.perf_counter()

        names = list(res.classes)
        # over every pixel, the unlabeled ones included, so a class's percentage is of the image
        percents = percent_shares({**res.pixel_shares(), UNLABELED_ROW: res.unlabeled_share()})
        colors = display_palette(len(names))  # the colours of the overlay and the label PNG
        labels = res.labels.cpu().numpy()
        state = heatmap_state(image, res.probs.float().cpu().numpy(), names)
        stem = Path(image_path).stem or "image"
        saved = res.save(self._out_dir(), stem)
        files = [str(p) for p in saved.values()]
        h, w = image.shape[:2]
        load_note = f", model ready in {t1 - t0:.1f} s" if t1 - t0 > 0.5 else ""
        status = (f"**{preset}**{self.description}: {w}×{h} px{note}, {len(names)} classes, "
                  f"segmented in {t2 - t1:.2f} s{load_note}.")
        return Outputs(
            status=status,
            overlay=res.overlay(),
            label_map=Image.fromarray(colour_labels(labels, len(names))),  # unlabeled: VOC's void colour
            legend=legend_html(names, [tuple(int(v) for v in c) for c in colors], percents),
            classes=names,
            heatmap=render_heatmap(state, names[0]),
            files=files,
            state=state,
        )


