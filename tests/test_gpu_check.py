"""benchmarks/gpu_check.py runs on the CPU with tiny models, so it is ready for a GPU and never rots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dapseg.config import load_preset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_rows_are_valid_configs(gpu_check):
    for _, preset, overrides in (*gpu_check.TRIDENT_TABLE8, *gpu_check.PROXYCLIP_TABLE5):
        load_preset(preset, {**overrides, "inference.precision": "fp16"})
    main = gpu_check.main_presets()
    assert {"clip", "naclip", "proxyclip", "dap", "trident", "trident-refine"} <= set(main)
    assert not any("dino_vit" in p or "sam_vit" in p for p in main)


def test_runs_on_cpu_with_tiny_models(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--presets", "naclip", "dap", "--repeats", "1",
                         "--warmup", "0", "--no-flops", "--probe-size", "64", "--bench-precision", "fp32",
                         "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16"  # CPU default: the precision a CPU may use
    rows = {r["preset"]: r for r in report["agreement"]}
    assert set(rows) == {"naclip", "dap"}
    for r in rows.values():
        assert r["dtype"] == "bfloat16" and 0 < r["max_abs_logit"] <= 2e-2 and r["label_agreement"] > 0.9
    trident = [r["preset"] for r in report["trident_table8"]["presets"]]
    assert trident == ["CLIP-B/16 alone", "+DINO", "+SAM", "+refinement"]
    proxy = report["proxyclip_table5"]["presets"]
    assert all(r["max_batch"] == 1 for r in proxy)
    assert "regions" in next(r for r in proxy if r["preset_name"] == "dap")["stages_s"]
    assert all(r["peak_memory_mib"] > 0 and r["stages_s"] for r in report["trident_table8"]["presets"])
    printed = capsys.readouterr().out
    assert "Trident Table 8" in printed and "ProxyCLIP Table 5" in printed
