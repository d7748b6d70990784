"""A collection with a decompression bomb, a truncated file and an empty file in the middle: `dapseg
segment` must finish every other image and list the three in the manifest (issue 24).

Writes N small random images (default 1000, 32x32) plus the three bad ones at positions N/4, N/2 and
3N/4 of the sorted names, runs `dapseg segment` on the folder in a fresh process (tiny random weights,
32-pixel windows, one prompt per class), then checks the manifest and reports the wall time and the
images per second.

    PYTHONPATH=src python benchmarks/hostile_collection.py                  # 1000 images
    PYTHONPATH=src python benchmarks/hostile_collection.py --images 200 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb(path: Path, side: int = 50000) -> None:
    """A PNG of a few dozen bytes whose header declares side x side 1-bit pixels."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(row, 9))
                     + _chunk(b"IEND", b""))


def build(folder: Path, n: int, size: int) -> dict[str, str]:
    """N good images and three bad ones among them; returns {bad name: what it is}."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:05d}.png")
    bad = {f"img_{n // 4:05d}a_bomb.png": "bomb", f"img_{n // 2:05d}a_cut.png": "truncated",
           f"img_{3 * n // 4:05d}a_empty.png": "empty"}
    for name, kind in bad.items():
        path = folder / name
        if kind == "bomb":
            write_bomb(path)
        elif kind == "truncated":
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_bytes(b"")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "in", Path(tmp) / "out"
        bad = build(folder, args.images, args.size)
        cmd = [sys.executable, "-m", "dapseg", "segment", str(folder), "--classes", "person, sky, cup",
               "--out", str(out), "--workers", str(args.workers), "--random-weights", "--tiny", "--preset",
               "naclip", "--set", "inference.short_side=null", "--set", f"inference.crop={args.size}", "--set",
               f"inference.stride={args.size}", "--set", "templates=none"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DAPSEG_CACHE": tmp})
        seconds = time.perf_counter() - t0
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
        done = [r["name"] for r in lines if r["status"] == "done"]
        failed = {r["name"]: r["error"] for r in lines if r["status"] == "failed"}
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}; {args.images} images {args.size}x{args.size} + 3 bad, --workers "
              f"{args.workers}")
        print(f"exit code {proc.returncode}; {len(done)} done, {len(failed)} failed; {seconds:.1f} s "
              f"(with start-up), {(len(done) + len(failed)) / seconds:.1f} images/s")
        for name, error in failed.items():
            print(f"  {name} ({bad.get(name, '?')}): {error[:160]}")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert len(done) == args.images and set(failed) == set(bad), (len(done), sorted(failed))
        print("ok: every other image finished and the manifest lists the three")


if __name__ == "__main__":
    main()
