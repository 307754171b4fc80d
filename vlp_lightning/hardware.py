"""What the machine can do fast, for the defaults `vlp` picks: the CPU's feature flags and model, and the precision
a run gets when its recipe sets none.

bf16 autocast is the fast path on CPUs with native bf16 matrix instructions (AVX-512 BF16, AMX) and on GPUs since
Ampere (compute capability 8.0); elsewhere bf16 is emulated and slower than fp32 (2-3x on the CPUs the bench ran
on), so those machines keep fp32.
"""

from __future__ import annotations

import platform

import torch

#: CPU flags (/proc/cpuinfo) of native bf16 matrix arithmetic.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def default_precision(accelerator: str | None) -> tuple[str, str]:
    """(Lightning precision, the reason in words) for a run whose config sets no precision."""
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())
    if uses_gpu:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"{torch.cuda.get_device_name()} computes in bf16 natively (Ampere or later)"
        return "32-true", "this GPU has no native bf16 (before Ampere); 16-mixed is the faster choice to set by hand"
    flags = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    if flags:
        return "bf16-mixed", f"the CPU ({cpu_model()}) has native bf16 ({', '.join(flags)})"
    return "32-true", f"the CPU ({cpu_model()}) has no native bf16 (no {' / '.join(BF16_CPU_FLAGS)}): bf16 would be slower"
