"""Device and precision choice."""

import pytest
import torch

from digital_stain.core.arrays import InputError
from digital_stain.core.devices import (
    cpu_has_fast_bf16,
    resolve_device,
    resolve_precision,
    resolve_training_precision,
)

CPU = torch.device("cpu")


def test_auto_precision_on_the_cpu_follows_the_hardware():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("FP32", CPU) == "fp32"
    with pytest.raises(InputError, match="unknown precision"):
        resolve_precision("fp8", CPU)


def test_training_never_runs_in_fp16():
    with pytest.raises(InputError, match="fp16 training is not supported"):
        resolve_training_precision("fp16", CPU)
    assert resolve_training_precision("auto", CPU) == "fp32"  # bf16 training on a CPU measured worse
    assert resolve_training_precision("bf16", CPU) == "bf16"


def test_devices_resolve_or_refuse_clearly():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/cpuinfo"), reason="needs Linux's /proc/cpuinfo")
def test_fast_bf16_agrees_with_the_flags_the_kernel_reports():
    """The probe reads the CPU (torch's own probes moved between releases; a stale one said False everywhere)."""
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    assert cpu_has_fast_bf16() == ("amx_tile" in flags or "avx512_bf16" in flags)


@pytest.mark.parametrize("slow", ["bf16", "fp32"])
def test_auto_precision_on_a_fast_bf16_cpu_is_timed_once_and_picks_the_faster(slow):
    import time

    from digital_stain.core.devices import faster_cpu_precision

    calls = []

    def run(precision):
        calls.append(precision)
        time.sleep(0.05 if precision == slow else 0.01)

    key = ("test network", slow)
    chosen = faster_cpu_precision(run, key)
    if not cpu_has_fast_bf16():  # bf16 is slow on such CPUs whatever the network: nothing is timed
        assert chosen == "fp32" and calls == []
        return
    assert chosen == ("fp32" if slow == "bf16" else "bf16")
    assert calls.count("fp32") == calls.count("bf16") == 3  # a warm-up and two timed calls each
    assert faster_cpu_precision(run, key) == chosen and len(calls) == 6  # cached
    calls.clear()
    assert faster_cpu_precision(lambda precision: time.sleep(0.01), ("a tie", slow)) == "fp32"  # bf16 must pay


def test_a_model_stains_in_the_precision_asked_for_or_the_timed_one(tiny_model):
    assert tiny_model.precision_for("fp32") == "fp32" and tiny_model.precision_for("BF16") == "bf16"
    auto = tiny_model.precision_for("auto")
    assert auto == "fp32" if not cpu_has_fast_bf16() else auto in ("fp32", "bf16")
    assert tiny_model.precision_for("auto") == auto  # timed once
