"""What ``dapseg analyze`` writes under its output folder: the PR curves (PNG), the AP table
(ap.md, ap.csv, ap.json, with the positive rate = the AP of chance) and the histograms (in ap.json,
so curves can be redrawn or runs merged). Every file is written atomically and must resolve inside
the output folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dapseg.analysis.run import AnalysisResult, SourceResult
from dapseg.eval.report import dumps_json, markdown_table, require_extra
from dapseg.files import atomic_write, atomic_write_text, resolve_inside

FILES = {"md": "ap.md", "csv": "ap.csv", "json": "ap.json", "png": "pr_curves.png"}


def require_analyze_extras() -> None:
    """Fail before any work where the `analyze` extra (pandas: tables, matplotlib: curves) is missing."""
    require_extra(("pandas", "matplotlib"), "analyze", "affinity reports")


def output_path(out_dir: str | Path, name: str) -> Path:
    """``out_dir / name`` resolved, refused (ValueError) unless it stays inside ``out_dir`` (a name with
    ``..``, an absolute name, or a symbolic link pointing elsewhere)."""
    return resolve_inside(out_dir, name, what=f"--out {out_dir}")


def _pct(x: float) -> float | None:
    return round(100.0 * x, 2) if math.isfinite(x) else None


def source_row(r: SourceResult) -> dict[str, Any]:
    return {
        "source": r.info.key,
        "label": r.info.label,
        "AP": _pct(r.hist.average_precision()),
        "chance_AP": _pct(r.hist.positive_rate()),
        "grid": "x".join(map(str, r.grid)) if r.grid else None,
        "patches": r.patches,
        "positive_pairs": r.hist.n_pos,
        "negative_pairs": r.hist.n_neg,
    }


def write_analysis(out_dir: str | Path, result: AnalysisResult, settings: dict[str, Any],
                   note: str | None = None) -> dict[str, Path]:
    """Write ap.{md,csv,json} and pr_curves.png; returns the paths by kind."""
    require_analyze_extras()
    import pandas as pd

    paths = {kind: output_path(out_dir, name) for kind, name in FILES.items()}
    rows = [source_row(r) for r in result.sources]
    table = pd.DataFrame(rows)
    atomic_write_text(paths["csv"], table.to_csv(index=False))

    shown = table.drop(columns=["source"]).set_index("label")
    shown.index.name = "affinity"
    shown = shown.rename(columns={"AP": "AP (%)", "chance_AP": "chance AP (%)"})
    md = [f"# dapseg analyze: {result.dataset}\n"]
    if note:
        md.append(f"{note}\n")
    md.append(f"Patch pairs of a {settings['window']}×{settings['window']} window per image, {result.n_images} "
              "images; a pair is positive when both patches have the same label. AP from "
              f"{settings['bins']} score bins; chance AP = the share of positive pairs.\n")
    md.append(markdown_table(shown))
    atomic_write_text(paths["md"], "\n".join(md))

    payload = {"title": f"dapseg analyze: {result.dataset}", "note": note, "dataset": result.dataset,
               "n_images": result.n_images, "bad": result.bad, "settings": settings,
               "score_range": [-1.0, 1.0],
               "sources": [{**row, "histogram": {"positives": r.hist.pos.tolist(), "negatives": r.hist.neg.tolist()}}
                           for row, r in zip(rows, result.sources, strict=True)]}
    atomic_write_text(paths["json"], dumps_json(payload))
    atomic_write(paths["png"], lambda tmp: plot_pr_curves(result, tmp))
    return paths


def plot_pr_curves(result: AnalysisResult, path: Path) -> None:
    """One PR curve per source (solid) and its chance level (dotted, same colour) into a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, 5.5), dpi=120)
    ax = fig.add_subplot()
    for k, r in enumerate(result.sources):
        color = f"C{k % 10}"
        ap = r.hist.average_precision()
        if not math.isfinite(ap):
            continue
        recall, precision = r.hist.pr_curve()
        # AP sums precision over each recall step: precision holds up to the step's end ("pre")
        ax.step([0.0, *recall.tolist()], [float(precision[0]), *precision.tolist()], where="pre", color=color,
                label=f"{r.info.label}  AP {100 * ap:.1f}")
        ax.axhline(r.hist.positive_rate(), color=color, linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"Patch pairs with the same label: {result.dataset} ({result.n_images} images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, title="dotted: chance (positive rate)", title_fontsize=8)
    fig.savefig(path, format="png")
