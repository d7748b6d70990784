"""``inference.precision``: which dtype the models hold their weights in, and the autocast around them.

``inference_dtype(device, precision)`` is the one place the dtype is chosen. The models' weights
(CLIP, the VFM, the SAM image encoder) are *held* in that dtype (``hold_weights``, done once by
``ModelBundle``), and the models still run under autocast at the same dtype (``autocast_context``):
with the weights already in the dtype autocast's casts of them are no-ops, and what it still does is
glue: a float32 tensor coming out of a float32 island (a head's distances, a ``.float()`` affinity)
meets a low-precision weight or activation in a matmul without every such place casting by hand.
Code that must stay float32 turns autocast off locally (``torch.autocast(device_type,
enabled=False)``) and casts its inputs up, never by checking the setting.

Normalisation layers' parameters and the buffers (normalisation constants, masks, rotary periods) stay
float32: they are small, and a float32 island's output may enter a LayerNorm, whose CPU kernel takes a
half input with float32 parameters but not the other way round.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of x86 units that compute bf16 products natively (AVX-512 BF16, AMX BF16)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


# "1" / "0": take this CPU as having native bf16 units or not, whatever it reports (``auto``'s CPU rule)
CPU_BF16_ENV = "DAPSEG_CPU_NATIVE_BF16"

# Whether ``auto`` picks bf16 on a CPU with native bf16 units. Off until ``dapseg bench --precision
# fp32,bf16`` shows bf16 faster end to end on such a CPU: the one measurement so far (an AVX-512 BF16
# CPU, autocast over float32 weights, before the weights were held in the dtype) had bf16 3.2x slower
# than fp32 for naclip, and held weights have not been measured there yet.
AUTO_BF16_ON_NATIVE_CPUS = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX BF16): where bf16 matmuls beat
    float32 (about 2× on AVX-512 BF16). A CPU without them emulates bf16 and runs it many times slower
    than float32 (an AMD EPYC Zen 3: 0.3 against 142 GFLOP/s for a 2048² product).

    ``DAPSEG_CPU_NATIVE_BF16=0`` / ``=1`` overrides the answer (e.g. to keep ``auto`` at float32)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1, got {forced!r}")
    return _detected_native_bf16()


@functools.cache
def _detected_native_bf16() -> bool:
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(callable(p) for p in probes):  # torch's own query (cpuinfo: any OS, checks OS support too)
        return any(bool(p()) for p in probes if callable(p))
    return bool(_cpuinfo_flags() & NATIVE_BF16_FLAGS)


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU flags Linux lists (empty elsewhere)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype inference runs in on ``device`` for the setting ``inference.precision`` (None: float32,
    no autocast).

    ``auto`` is bf16 on CUDA where supported, else fp16; on a CPU it is float32 (bf16 only where the CPU
    has native bf16 units, ``cpu_has_native_bf16``, and ``AUTO_BF16_ON_NATIVE_CPUS`` says the bench
    showed bf16 faster on them: not yet). ``fp32`` is None everywhere;
    ``bf16`` / ``fp16`` are those dtypes (bf16 on a CUDA device without it is an error)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and AUTO_BF16_ON_NATIVE_CPUS and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if precision == "fp32":
        return None
    if precision not in _DTYPES:
        raise ValueError(f"inference.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"inference.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; "
                         "use fp16 or auto")
    return _DTYPES[precision]


def dtype_name(dtype: torch.dtype | None) -> str:
    """"float32" for None (no autocast), else the dtype's name ("bfloat16", "float16")."""
    return str(dtype or torch.float32).removeprefix("torch.")


def autocast_context(device: torch.device, precision: str = "auto") -> AbstractContextManager[object]:
    """Autocast at ``inference_dtype(device, precision)``; nothing (float32) where that is None."""
    dtype = inference_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def is_normalization(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, GroupNorm, BatchNorm, SAM's LayerNorm2d, ...): its parameters stay
    float32. Its kernels take a bf16/fp16 input with float32 parameters (and give the input's dtype),
    but not a float32 input with half parameters, which a float32 island's output would be; and the
    parameters are a few per layer."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
    return isinstance(module, norms) or "Norm" in type(module).__name__


def held_parameters(module: nn.Module, *, norms: bool = False) -> Iterator[nn.Parameter]:
    """The floating-point parameters ``hold_weights`` converts to the dtype: all but the normalisation
    layers' (``norms=True``: those, which it keeps in float32), each shared parameter once."""
    norm_params = {id(p) for m in module.modules() if is_normalization(m) for p in m.parameters(recurse=False)}
    for p in module.parameters():  # yields a shared parameter once
        if p.is_floating_point() and (id(p) in norm_params) == norms:
            yield p


def _targets(module: nn.Module, dtype: torch.dtype | None) -> Iterator[tuple[nn.Parameter, torch.dtype]]:
    """(parameter, the dtype ``hold_weights`` gives it) for every floating-point parameter."""
    for p in held_parameters(module):
        yield p, dtype or torch.float32
    for p in held_parameters(module, norms=True):
        yield p, torch.float32


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module``'s weights are held in (``held_parameters``; float32 for a module without any);
    weights in several dtypes are an error (``hold_weights`` gives one)."""
    dtypes = {p.dtype for p in held_parameters(module)}
    if len(dtypes) > 1:
        raise ValueError(f"{type(module).__name__} holds weights in {sorted(map(str, dtypes))}, not one dtype")
    return dtypes.pop() if dtypes else torch.float32


@torch.no_grad()
def hold_weights(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``module`` with its weights (``held_parameters``) converted to ``dtype`` (None: float32), in place.

    Parameters keep their identity (tied weights stay tied); normalisation layers' parameters are
    float32, buffers are left as they are."""
    for p, target in _targets(module, dtype):
        if p.dtype != target:
            p.data = p.data.to(target)
    return module


@torch.no_grad()
def weights_copy(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``module`` with its weights (``held_parameters``) in ``dtype`` (None: float32); ``module``
    is left untouched. Converted tensor by tensor: the full-precision weights are never copied as a
    whole, so the peak is the original plus the converted copy."""
    memo: dict[int, object] = {}
    for p, target in _targets(module, dtype):  # each shared parameter once: ties survive the copy
        memo[id(p)] = nn.Parameter(p.detach().to(target, copy=True), requires_grad=p.requires_grad)
    return copy.deepcopy(module, memo)
