"""Results tables: results.xlsx (summary + per-class sheets), results.csv, results.md, results.json.

A *record* is one (preset, dataset) evaluation: ``EvalResult.to_dict()`` plus ``preset`` and
``provenance``. Every file is written atomically (temp file + rename), each on its own: one that
fails (full disk, file-size limit, a missing writer) does not stop the others; ``TablesNotWritten``
then names every file that failed and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dapseg.data.spec import EXTRA, STANDARD
from dapseg.files import atomic_write, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd


def require_extra(modules: tuple[str, ...], extra: str, needed_by: str) -> None:
    """RuntimeError naming the missing module and ``pip install 'dapseg[extra]'`` unless all import."""
    for module in modules:
        try:
            __import__(module)
        except ImportError as e:
            raise RuntimeError(f"{needed_by} need {module} (the `{extra}` extra): "
                               f"pip install 'dapseg[{extra}]'") from e


def require_eval_extras() -> None:
    """Fail before any work where the `eval` extra (pandas, openpyxl: the result tables) is missing."""
    require_extra(("pandas", "openpyxl"), "eval", "evaluation reports")


def _pandas():  # the pandas module, imported only when a table is made
    require_eval_extras()
    import pandas

    return pandas


def _dataset_order(names: list[str]) -> list[str]:
    known = [d for d in [*STANDARD, *EXTRA] if d in names]
    return known + sorted(n for n in names if n not in known)


def summary_table(records: list[dict[str, Any]], metric: str = "mIoU") -> pd.DataFrame:
    """One row per preset (in first-seen order), one column per dataset, then the average."""
    pd = _pandas()
    presets = list(dict.fromkeys(r["preset"] for r in records))
    datasets = _dataset_order(list({r["dataset"] for r in records}))
    table = pd.DataFrame(index=pd.Index(presets, name="preset"), columns=datasets, dtype=float)
    for r in records:
        table.loc[r["preset"], r["dataset"]] = r[metric]
    table["average"] = table[datasets].mean(axis=1, skipna=False).round(2)
    return table


def per_class_table(records: list[dict[str, Any]], dataset: str) -> pd.DataFrame:
    """Rows: classes of ``dataset``; columns: IoU (%) per preset."""
    pd = _pandas()
    cols = {}
    classes: list[str] = []
    for r in records:
        if r["dataset"] == dataset:
            classes = [c["class"] for c in r["per_class"]]
            cols[r["preset"]] = [c["IoU"] for c in r["per_class"]]
    return pd.DataFrame(cols, index=pd.Index(classes, name="class"), dtype=float)


def markdown_table(df: pd.DataFrame, index: bool = True, floatfmt: str = "{:.2f}") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else floatfmt.format(v)
        return str(v).replace("|", "\\|")

    head = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for idx, row in df.iterrows():
        cells = ([cell(idx)] if index else []) + [cell(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sheet_name(name: str, used: set[str]) -> str:
    base = "".join(ch for ch in name if ch not in "[]:*?/\\")[:31] or "sheet"
    out, k = base, 1
    while out in used:
        k += 1
        out = f"{base[:28]}~{k}"
    used.add(out)
    return out


def write_xlsx(path: Path, sheets: dict[str, pd.DataFrame]) -> None:
    pd = _pandas()
    used: set[str] = set()

    def write(tmp: Path) -> None:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            for name, df in sheets.items():
                df.to_excel(writer, sheet_name=_sheet_name(name, used))

    atomic_write(path, write)


class TablesNotWritten(OSError):
    """Some result tables could not be written; ``written`` holds the paths of those that were."""

    def __init__(self, errors: list[str], written: dict[str, Path]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
        self.written = written


def write_each(writers: dict[str, tuple[Path, Callable[[Path], object]]]) -> dict[str, Path]:
    """Call every ``write(path)``, each on its own; raise ``TablesNotWritten`` after the last if any
    failed (an OSError names the file and the OS error; any other error is named with the file)."""
    written: dict[str, Path] = {}
    errors: list[str] = []
    for key, (path, write) in writers.items():
        try:
            write(path)
            written[key] = path
        except OSError as e:  # atomic_write's "cannot write <path>: <reason>"
            errors.append(str(e) if str(path) in str(e) else f"cannot write {path}: {e}")
        except Exception as e:  # a table library's own failure must not lose the other tables
            errors.append(f"cannot write {path}: {type(e).__name__}: {e}")
    if errors:
        raise TablesNotWritten(errors, written)
    return written


def write_results(out_dir: str | Path, records: list[dict[str, Any]], *, title: str = "dapseg results",
                  note: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write results.{xlsx,csv,md,json} for ``records``, each on its own; returns the paths (or raises
    ``TablesNotWritten`` naming each file that failed, after writing the others)."""
    pd = _pandas()
    out_dir = Path(out_dir)
    summary = summary_table(records)
    datasets = [c for c in summary.columns if c != "average"]
    sheets = {"summary": summary}
    for metric in ("mAcc", "aAcc"):
        sheets[f"summary {metric}"] = summary_table(records, metric)
    for d in datasets:
        sheets[d] = per_class_table(records, d)
    long = pd.DataFrame([{k: r.get(k) for k in ("preset", "dataset", "mIoU", "mAcc", "aAcc", "n_images",
                                                  "n_bad")} for r in records])
    md = [f"# {title}\n"]
    if note:
        md.append(f"{note}\n")
    md.append("mIoU (%) per dataset:\n")
    md.append(markdown_table(summary))
    md.append("\nDetails (mIoU / mAcc / aAcc, images):\n")
    md.append(markdown_table(long.set_index("preset")))
    payload = {"title": title, "note": note, "summary_mIoU": json.loads(summary.to_json(orient="index")),
               "results": records, **(extra or {})}
    return write_each({
        "xlsx": (out_dir / "results.xlsx", lambda p: write_xlsx(p, sheets)),
        "csv": (out_dir / "results.csv", lambda p: atomic_write_text(p, long.to_csv(index=False))),
        "md": (out_dir / "results.md", lambda p: atomic_write_text(p, "\n".join(md))),
        "json": (out_dir / "results.json", lambda p: atomic_write_text(p, dumps_json(payload))),
    })


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so the JSON is standard (``null`` = undefined, e.g. a class never seen)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_json(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, default=str, allow_nan=False)
