"""Device and precision choice: ``auto|cpu|cuda|mps`` and ``auto|fp32|bf16|fp16``."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch

from digital_stain.core.arrays import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a user's choice; ``auto`` prefers CUDA, then MPS, then the CPU."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' was asked for, but this PyTorch sees no CUDA GPU; choose device auto or cpu.")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InputError("device 'mps' was asked for, but Apple's Metal backend is not available; choose device auto or cpu.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")


@functools.cache  # the CPU's flags do not change while we run; asked before every stain
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 autocast pays (read off the CPU's flags)."""
    return _cpu_flag("amx_tile") or _cpu_flag("avx512_bf16")


def _cpu_flag(name: str) -> bool:
    # torch.cpu has the probes since 2.3; older releases kept them in torch._C._cpu. Where neither
    # answers, fall back to the flags the kernel reports (Linux), never to an assumption.
    for module in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        probe = getattr(module, f"_is_{name}_supported", None)
        if probe is not None:
            return bool(probe())
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and name in line.split() for line in cpuinfo)
    except OSError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware does it fast (CUDA with bf16, CPUs with AMX), else fp32."""
    precision = precision.lower()
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


BF16_MARGIN = 1.25  # how much faster bf16 must be to be chosen over fp32 on a CPU
_FASTER: dict = {}  # (what was timed, threads) -> "fp32" | "bf16", measured once per process


def faster_cpu_precision(run: Callable[[str], None], key) -> str:
    """``"bf16"`` or ``"fp32"``, whichever makes ``run(precision)`` faster on this CPU.

    For CPUs with fast bf16 flags only (elsewhere bf16 is far slower and nothing is timed):
    whether bf16 autocast pays depends on the network and the machine (on one AVX512-BF16 CPU
    it ran the paper-size student 1.5x faster and the shipped small students no faster), so it
    is timed: one warm-up call each, then the best of two, alternating. bf16 must be at least
    ``BF16_MARGIN`` times faster: its stains differ from fp32's by about 1/100, so a tie (or
    timing noise) keeps fp32. Cached by ``key`` and the torch thread count, so each network
    shape is timed once per process.
    """
    if not cpu_has_fast_bf16():
        return "fp32"
    key = (key, torch.get_num_threads())
    if key not in _FASTER:
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for precision in ("fp32", "bf16"):
            run(precision)  # warm-up: first-call allocations and kernel choice
        for _ in range(2):
            for precision in best:
                start = time.perf_counter()
                run(precision)
                best[precision] = min(best[precision], time.perf_counter() - start)
        _FASTER[key] = "bf16" if best["bf16"] * BF16_MARGIN <= best["fp32"] else "fp32"
    return _FASTER[key]


def resolve_training_precision(precision: str, device: torch.device) -> str:
    """Like :func:`resolve_precision`, but never fp16, and ``auto`` is fp32 on the CPU.

    fp16 training needs loss scaling, which we do not do: ``auto`` falls back to fp32 where
    it would pick fp16 (CUDA GPUs without bf16), and an explicit ``fp16`` is refused with what
    to use instead. On a CPU with fast bf16 (AVX512-BF16), bf16 autocast training measured
    worse: a fine-tune's student collapsed at step 166 of 500 and the run was not faster
    (``docs/benchmarks.md``), so ``auto`` trains in fp32 there; ``bf16`` can still be asked for.
    """
    if precision.lower() == "fp16":
        raise InputError("fp16 training is not supported (it needs loss scaling); use bf16 where the GPU has it, or fp32.")
    resolved = resolve_precision(precision, device)
    if precision.lower() == "auto" and device.type == "cpu":
        return "fp32"
    return "fp32" if resolved == "fp16" else resolved


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
