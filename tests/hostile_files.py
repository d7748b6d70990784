"""Hostile files built in the tests: images that declare more pixels than they hold (decompression
bombs), truncated and empty images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` 1-bit pixels (its data
    holds one row): what a decompression bomb looks like to a reader that opens it."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + one row of zeros
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(row, 9))
                     + _chunk(b"IEND", b""))
    return path


def truncated_png(path: Path, size: int = 32, seed: int = 0) -> Path:
    """A real PNG cut in half."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
