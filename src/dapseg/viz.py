"""Palettes, palette label PNGs, overlays with a legend of the class colours, heatmaps."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours: the PASCAL VOC bit-interleaving palette (class 0 black), extended."""
    cmap = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(max(n, 1)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    if n > 0:
        cmap[0] = (0, 0, 0) if n > 1 else (128, 0, 0)
    return cmap[:n]


def display_palette(n: int) -> np.ndarray:
    """Colours for overlays: the VOC palette shifted by one so that class 0 is not black."""
    return palette(n + 1)[1:]


def label_image(labels: np.ndarray, n_classes: int) -> Image.Image:
    """(H, W) int labels -> palette ('P' mode) PNG-ready image; pixel values are class indices."""
    if n_classes > 256:
        # A palette PNG holds 256 entries; more classes go to a 16-bit grayscale PNG.
        return Image.fromarray(labels.astype(np.uint16))
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(display_palette(n_classes).flatten().tolist())
    return img


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


LEGEND_ROWS = 40  # a longer class list shows only the classes present (largest first), up to this many


def legend_rows(n_classes: int, shares: list[float] | None) -> tuple[list[int], int]:
    """(class indices shown, classes left out): every class of a list up to ``LEGEND_ROWS`` long; of a
    longer one (a large vocabulary) the classes present, largest share first, at most ``LEGEND_ROWS``."""
    if n_classes <= LEGEND_ROWS or shares is None:
        return list(range(n_classes)), 0
    present = sorted((i for i in range(n_classes) if shares[i] > 0), key=lambda i: (-shares[i], i))
    return sorted(present[:LEGEND_ROWS]), n_classes - min(len(present), LEGEND_ROWS)


def legend(names: list[str], shares: list[float] | None = None, width: int = 260) -> Image.Image:
    """A legend panel: one colour swatch and name (with pixel share) per class (see ``legend_rows``)."""
    font = _font(14)
    row = 22
    shown, left_out = legend_rows(len(names), shares)
    img = Image.new("RGB", (width, row * (len(shown) + (left_out > 0)) + 10), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    colours = display_palette(len(names))
    for k, i in enumerate(shown):
        y = 5 + k * row
        draw.rectangle([6, y + 2, 24, y + 18], fill=tuple(int(c) for c in colours[i]), outline=(0, 0, 0))
        text = names[i] if shares is None else f"{names[i]}  {100 * shares[i]:.1f}%"
        draw.text((32, y + 2), text, fill=(0, 0, 0), font=font)
    if left_out:
        draw.text((32, 5 + len(shown) * row + 2), f"+ {left_out} classes not shown", fill=(90, 90, 90), font=font)
    return img


def overlay(
    image: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.5, with_legend: bool = True
) -> Image.Image:
    """The image blended with the class colours, with a legend panel to its right."""
    colours = display_palette(len(names))
    blended = (image.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha).astype(np.uint8)
    out = Image.fromarray(blended)
    if not with_legend:
        return out
    present = np.bincount(labels.ravel(), minlength=len(names)) / max(1, labels.size)
    panel = legend(names, [float(s) for s in present])
    canvas = Image.new("RGB", (out.width + panel.width, max(out.height, panel.height)), (255, 255, 255))
    canvas.paste(out, (0, 0))
    canvas.paste(panel, (out.width, 0))
    return canvas


def heatmap(image: np.ndarray, prob: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """A class's probability map (H, W) in [0, 1] as a jet-like colour map over the image."""
    p = np.clip(prob, 0, 1)[..., None]
    # Blue (0) -> green (0.5) -> red (1), piecewise linear.
    colour = np.concatenate([np.clip(2 * p - 1, 0, 1), 1 - np.abs(2 * p - 1), np.clip(1 - 2 * p, 0, 1)], -1) * 255
    blended = image.astype(np.float32) * (1 - alpha) + colour * alpha
    return Image.fromarray(blended.astype(np.uint8))
