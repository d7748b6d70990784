"""`dapseg bench`: the efficiency table of a method (parameters, FLOPs, speed, memory, stages).

``flops`` counts matmul work with torch's own counter, ``probe`` measures the machine's matmul
rate, ``stages`` times the pipeline's stages by wrapping the functions listed in one table, and
``runner`` puts them together per preset.
"""

from dapseg.bench.flops import count_flops
from dapseg.bench.probe import matmul_rate
from dapseg.bench.runner import BenchSettings, bench_preset, run_bench
from dapseg.bench.stages import FUNCTION_STAGES, STAGES, StageTimer

__all__ = [
    "FUNCTION_STAGES",
    "STAGES",
    "BenchSettings",
    "StageTimer",
    "bench_preset",
    "count_flops",
    "matmul_rate",
    "run_bench",
]
