"""Reports (xlsx/csv/md/json) and sweep grid parsing."""

import json
import math

import pandas as pd
import pytest

from dapseg.eval.report import markdown_table, summary_table, write_results
from dapseg.eval.sweep import combinations, combo_slug, parse_grid


def rec(preset, dataset, miou, classes=("a", "b")):
    return {"preset": preset, "dataset": dataset, "mIoU": miou, "mAcc": miou + 1, "aAcc": miou + 2,
            "n_images": 3, "n_bad": 0, "per_class": [{"class": c, "IoU": miou, "Acc": None} for c in classes],
            "settings": {"preset": preset}, "provenance": {"versions": {"torch": "x"}}}


def test_summary_rows_presets_columns_datasets_in_benchmark_order():
    records = [rec("dap", "ade20k", 20.0), rec("dap", "voc21", 60.0), rec("naclip", "voc21", 58.0)]
    t = summary_table(records)
    assert list(t.index) == ["dap", "naclip"] and list(t.columns) == ["voc21", "ade20k", "average"]
    assert t.loc["dap", "average"] == 40.0
    assert math.isnan(t.loc["naclip", "ade20k"]) and math.isnan(t.loc["naclip", "average"])  # no partial mean


def test_write_results_all_formats(tmp_path):
    records = [rec("dap", "voc21", 61.234), rec("naclip", "voc21", 58.0), rec("dap", "cityscapes", 40.0,
                                                                             ("road", "sky", "car"))]
    paths = write_results(tmp_path, records, title="t", note="synthetic")
    sheets = pd.read_excel(paths["xlsx"], sheet_name=None, index_col=0)
    assert list(sheets)[:1] == ["summary"] and {"voc21", "cityscapes"} <= set(sheets)
    assert list(sheets["cityscapes"].index) == ["road", "sky", "car"]
    assert sheets["summary"].loc["dap", "voc21"] == pytest.approx(61.234)
    assert len(pd.read_csv(paths["csv"])) == 3
    md = paths["md"].read_text()
    assert "| dap | 61.23 | 40.00 | 50.62 |" in md and "synthetic" in md
    payload = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert payload["summary_mIoU"]["naclip"]["cityscapes"] is None
    assert payload["results"][0]["provenance"]["versions"]["torch"] == "x"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_markdown_table_escapes_and_dashes():
    df = pd.DataFrame({"x": [1.0, float("nan")]}, index=pd.Index(["a|b", "c"], name="k"))
    assert markdown_table(df) == "| k | x |\n|---|---|\n| a\\|b | 1.00 |\n| c | – |\n"


def test_parse_grid_and_combinations():
    axes = parse_grid("rho=0,0.25,0.5 regions=none,slic")
    assert axes == {"rho": [0, 0.25, 0.5], "regions": ["none", "slic"]}
    combos = combinations(axes)
    assert len(combos) == 6 and combos[0] == {"rho": 0, "regions": "none"} and combos[-1] == {
        "rho": 0.5, "regions": "slic"}
    assert parse_grid(["head.params.knn=0,8", "fsa.enabled=true,false"]) == {
        "head.params.knn": [0, 8], "fsa.enabled": [True, False]}
    assert combo_slug({"rho": 0.5, "regions": "slic"}) == "rho=0.5,regions=slic"
    assert combo_slug({"a": "x/y z"}) == "a=x_y_z"


@pytest.mark.parametrize("bad,msg", [("", "empty"), ("rho", "key=v1"), ("=1,2", "no key"),
                                     ("rho=1,,2", "empty value"), ("rho=1,1", "repeats"),
                                     ("rho=1 rho=2", "twice")])
def test_parse_grid_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_grid(bad)
