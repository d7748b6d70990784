"""`dapseg bench`: the efficiency table of a method (parameters, FLOPs, speed, memory, stages).

``flops`` counts matmul work with torch's own counter, ``probe`` measures the machine's matmul
rate, ``stages`` times the pipeline's stages (and those the components declare) by wrapping
functions, ``runner`` puts them together per preset with ``memory``, ``param_count``, ``windows``,
``timing`` and ``machine``, and ``table`` prints the report.
"""

from dapseg.bench.flops import count_flops
from dapseg.bench.probe import matmul_rate
from dapseg.bench.runner import BenchSettings, bench_preset, run_bench
from dapseg.bench.stages import FUNCTION_STAGES, STAGES, StageTimer
from dapseg.bench.table import format_report

__all__ = [
    "FUNCTION_STAGES",
    "STAGES",
    "BenchSettings",
    "StageTimer",
    "bench_preset",
    "count_flops",
    "format_report",
    "matmul_rate",
    "run_bench",
]
