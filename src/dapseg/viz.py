"""Palettes, palette label PNGs, overlays with a legend of the class colours, heatmaps."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dapseg.postprocess import UNLABELED

UNLABELED_PNG = 255  # an unlabeled pixel in a palette label PNG (lists of up to 255 classes)
UNLABELED_PNG16 = 65535  # ... in a 16-bit label PNG (lists of more than 255 classes)
MAX_PALETTE_CLASSES = 255  # a palette PNG keeps index 255 for unlabeled pixels
UNLABELED_COLOUR = (224, 224, 192)  # PASCAL VOC's colour of its "void" (255) pixels


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
    """(H, W) int labels -> palette ('P' mode) PNG-ready image; pixel values are class indices and
    ``UNLABELED_PNG`` (255) where ``labels`` is ``UNLABELED``. Lists of more than 255 classes give a
    16-bit grayscale PNG, ``UNLABELED_PNG16`` (65535) where unlabeled."""
    unlabeled = labels == UNLABELED
    if n_classes > MAX_PALETTE_CLASSES:
        return Image.fromarray(np.where(unlabeled, UNLABELED_PNG16, labels).astype(np.uint16))
    img = Image.fromarray(np.where(unlabeled, UNLABELED_PNG, labels).astype(np.uint8), mode="P")
    colours = np.zeros((256, 3), np.uint8)
    colours[:n_classes] = display_palette(n_classes)
    colours[UNLABELED_PNG] = UNLABELED_COLOUR
    img.putpalette(colours.flatten().tolist())
    return img


def labels_from_png(values: np.ndarray, n_classes: int) -> np.ndarray:
    """The inverse of ``label_image``: PNG pixel values (H, W) -> int64 labels with ``UNLABELED``.
    A value that is neither a class index nor the unlabeled value is a ``ValueError``."""
    unlabeled_value = UNLABELED_PNG16 if n_classes > MAX_PALETTE_CLASSES else UNLABELED_PNG
    values = values.astype(np.int64)
    unlabeled = values == unlabeled_value
    bad = ~unlabeled & ((values < 0) | (values >= n_classes))
    if bad.any():
        raise ValueError(f"pixel value {int(values[bad][0])} is no class index (0..{n_classes - 1}) and not "
                         f"the unlabeled value {unlabeled_value}")
    return np.where(unlabeled, UNLABELED, values)


def colour_labels(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 in the overlay's class colours, ``UNLABELED_COLOUR`` where
    unlabeled."""
    colours = np.concatenate([display_palette(n_classes), np.array([UNLABELED_COLOUR], np.uint8)])
    return colours[np.where(labels == UNLABELED, n_classes, labels)]


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


def legend(names: list[str], shares: list[float] | None = None, width: int = 260,
           unlabeled_share: float = 0.0) -> Image.Image:
    """A legend panel: one colour swatch and name (with pixel share) per class (see ``legend_rows``),
    and a row for the unlabeled pixels where there are any."""
    font = _font(14)
    row = 22
    shown, left_out = legend_rows(len(names), shares)
    colours = [tuple(int(c) for c in rgb) for rgb in display_palette(len(names))]
    rows = [(names[i] if shares is None else f"{names[i]}  {100 * shares[i]:.1f}%", colours[i]) for i in shown]
    if unlabeled_share > 0:
        rows.append((f"(unlabeled)  {100 * unlabeled_share:.1f}%", UNLABELED_COLOUR))
    img = Image.new("RGB", (width, row * (len(rows) + (left_out > 0)) + 10), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (text, colour) in enumerate(rows):
        y = 5 + k * row
        draw.rectangle([6, y + 2, 24, y + 18], fill=colour, outline=(0, 0, 0))
        draw.text((32, y + 2), text, fill=(0, 0, 0), font=font)
    if left_out:
        draw.text((32, 5 + len(rows) * row + 2), f"+ {left_out} classes not shown", fill=(90, 90, 90), font=font)
    return img


def overlay(
    image: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.5, with_legend: bool = True
) -> Image.Image:
    """The image blended with the class colours, with a legend panel to its right. Unlabeled pixels
    show the image in grey, untinted."""
    unlabeled = labels == UNLABELED
    colours = colour_labels(labels, len(names)).astype(np.float32)
    blended = (image.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (H, W) luma
    blended[unlabeled] = grey[unlabeled, None].astype(np.uint8)
    out = Image.fromarray(blended)
    if not with_legend:
        return out
    counts = np.bincount(labels[~unlabeled].ravel(), minlength=len(names)) / max(1, labels.size)
    panel = legend(names, [float(s) for s in counts], unlabeled_share=float(unlabeled.mean()) if labels.size else 0.0)
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
