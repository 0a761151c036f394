"""What this machine's CPU computes in hardware, read from /proc/cpuinfo:
training's precision and the precision OpenVINO runs an export at follow it.

A leaf: imports nothing of the project.
"""

from __future__ import annotations

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo: bfloat16 in hardware


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 in hardware (AMX or AVX512-BF16);
    ``flags`` default to this machine's."""
    return bool(set(BF16_CPU_FLAGS) & set(cpu_flags() if flags is None else flags))
