"""The terminal tables of a bench report: one row per preset, then the per-stage breakdown.

A table is a list of ``Column``s (title, width, alignment, how a row's cell reads); adding a figure
to the preset table is one ``Column`` in ``PRESET_COLUMNS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dapseg.bench.stages import stage_order

Row = dict[str, Any]


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    cell: Callable[[Row], str]  # the row's text in this column
    left: bool = False  # left-aligned (default: right)

    def fit(self, text: str) -> str:
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"


def maybe(value: float | None, spec: str = "", scale: float = 1, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` (times ``scale``), or "-" when it is unknown (None)."""
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def render(columns: Sequence[Column], rows: Sequence[Row]) -> list[str]:
    """The header, a rule and one line per row, cells separated by one space."""
    head = " ".join(c.fit(c.title) for c in columns)
    return [head, "-" * len(head), *(" ".join(c.fit(c.cell(r)) for c in columns) for r in rows)]


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _params(r: Row) -> str:
    return "/".join(_m(r["params"][k]) for k in ("clip", "vfm", "sam") if k in r["params"])


def _seconds(r: Row) -> str:
    s = r["seconds"]
    return f"{s['median']:.3f} [{s['min']:.2f}-{s['max']:.2f}]"


PRESET_COLUMNS: tuple[Column, ...] = (
    Column("preset", 16, lambda r: r["preset"], left=True),
    Column("dtype", 8, lambda r: r.get("precision", "-"), left=True),
    Column("params (clip/vfm/sam)", 24, _params, left=True),
    Column("win", 3, lambda r: maybe(r["windows"])),
    Column("GFLOP", 8, lambda r: maybe(r["gflops"], ".1f")),
    Column("s/img", 18, _seconds),
    Column("s/win", 6, lambda r: maybe(r["seconds_per_window"], ".2f")),
    Column("CPU s", 6, lambda r: f"{r['cpu_seconds']['median']:.1f}"),
    Column("img/s", 6, lambda r: f"{r['images_per_s']:.2f}"),
    Column("GFLOP/s", 7, lambda r: maybe(r["achieved_gflops_per_s"], ".0f")),
    Column("probe", 6, lambda r: maybe(r["probe_gflops_per_s"] or None, ".0f")),
    Column("% probe", 7, lambda r: maybe(r["fraction_of_probe"], ".0f", 100, "%")),
    Column("1-by-1 s/img", 12, lambda r: maybe(r["one_at_a_time"] and r["one_at_a_time"]["seconds"]["median"], ".3f")),
    Column("peak MiB", 9, lambda r: f"{r['peak_memory_mib']:.0f}"),
    Column("text enc s", 10, lambda r: f"{r['text_encoding_s']:.2f}"),
)


def precision_ratios(rows: Sequence[Row]) -> list[str]:
    """Lines "preset: bfloat16 1.42x the speed of float32" for each preset benched at float32 and lower."""
    by_preset: dict[str, dict[str, float]] = {}
    for r in rows:
        by_preset.setdefault(r["preset"], {})[r.get("precision", "float32")] = r["seconds"]["median"]
    lines = []
    for preset, seconds in by_preset.items():
        if "float32" not in seconds:
            continue
        for dtype, s in seconds.items():
            if dtype != "float32":
                lines.append(f"  {preset}: {dtype} {seconds['float32'] / s:.2f}x the speed of float32 "
                             f"({s:.3f} against {seconds['float32']:.3f} s/img)")
    return ["", "precision (median s/img, side by side in this process):", *lines] if lines else []


def stage_column(stage: str) -> Column:
    """Seconds of ``stage`` and its share of the row's staged time."""

    def cell(r: Row) -> str:
        v = r["stages_s"].get(stage)
        return "-" if v is None else f"{v:>8.3f} ({100 * v / (sum(r['stages_s'].values()) or 1.0):>3.0f}%)"

    return Column(stage, 15, cell)


def format_report(report: dict[str, Any]) -> str:
    """The terminal tables: one row per preset, then the per-stage breakdown."""
    m = report["machine"]
    probe = report["probe"]
    where = m.get("gpu") or m["cpu"]
    rows = report["presets"]
    lines = [
        f"machine: {where} ({m['device']}, {m['torch_threads']} torch threads), torch {m['torch']}, "
        f"load {m.get('load_average', '?')}",
        f"image {report['image_size'][0]}x{report['image_size'][1]}; matmul probe "
        f"{probe['gflops_per_s']:.0f} GFLOP/s ({int(probe['size'])}² fp32, min {probe['min']:.0f}, "
        f"max {probe['max']:.0f}; each preset's % is against probes taken between its repeats); "
        f"{report['settings']['repeats']} repeats after "
        f"{report['settings']['warmup']} warm-up",
        "",
        *render(PRESET_COLUMNS, rows),
        "", "text enc s: encoding the class list once, uncached (all templates); the `text` stage below is the "
        "per-image lookup of the cached embeddings",
        *precision_ratios(rows),
    ]
    stage_names = stage_order(k for r in rows for k in r["stages_s"])
    if stage_names:
        lines += ["", "seconds per image by stage (median of the batched repeats; exclusive times):"]
        lines += render([PRESET_COLUMNS[0], *map(stage_column, stage_names)], rows)
    missing = sorted({p for r in rows for p in r["stage_paths_unresolved"]})
    if missing:
        lines += ["", "stage functions not found (a `stages` extra or FUNCTION_STAGES needs updating): "
                  + ", ".join(missing)]
    return "\n".join(lines)
