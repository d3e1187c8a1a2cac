"""A DeviceSpec for the machine we run on, read from /proc and the CPU flags. Torch-free.

The peak is an estimate (cores x clock x fp32 flops per cycle of the vector unit); what
``gkt-profile calibrate`` measures is how much of it the edge model's training step gets.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from device_profiles.catalog import DeviceSpec, Quantity

THIS_MACHINE_ID = "this-machine"
# fp32 flops per cycle per core of Arm cores by /proc/cpuinfo "CPU part" (implementer 0x41,
# NVIDIA Carmel is 0x4e/0x004): 4-lane FMA on 64-bit pipes (8) or two 128-bit pipes (16).
_ARM_PARTS = {"0xd03": ("Cortex-A53", 8), "0xd07": ("Cortex-A57", 8),
              "0xd08": ("Cortex-A72", 8), "0xd0b": ("Cortex-A76", 16),
              "0xd42": ("Cortex-A78AE", 16), "0x004": ("Carmel", 16)}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(text: str, key: str) -> str:
    m = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", text, re.MULTILINE)
    return m.group(1).strip() if m else ""


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (Arm boards: the "Hardware" line)."""
    info = _cpuinfo()
    return (_field(info, "model name") or _field(info, "Hardware") or platform.processor()
            or platform.machine())


def usable_cores() -> int:
    """CPUs this process may run on (affinity, so a container's limit counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _clock_ghz(cpuinfo: str) -> tuple[float, str] | None:
    sysfs = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if sysfs.exists():
        return int(sysfs.read_text()) / 1e6, f"measured: {sysfs} (max clock)"
    mhz = _field(cpuinfo, "cpu MHz")
    if mhz:
        return float(mhz) / 1e3, "measured: /proc/cpuinfo 'cpu MHz' (current clock)"
    return None


def _flops_per_cycle(cpuinfo: str, arch: str) -> tuple[int, str]:
    if arch == "x86_64":
        flags = set(_field(cpuinfo, "flags").split())
        if {"avx2", "fma"} <= flags:
            return 32, "AVX2+FMA: two 256-bit FMA pipes (CPUs with two 512-bit FMA units reach 64)"
        if "avx" in flags:
            return 16, "AVX without FMA"
        return 8, "SSE"
    part = _field(cpuinfo, "CPU part")
    name, fpc = _ARM_PARTS.get(part, ("unknown Arm core", 8))
    return fpc, f"{name}: {fpc} fp32 flops/cycle"


def _ram_gib() -> tuple[float, str]:
    limit = Path("/sys/fs/cgroup/memory.max")
    total = 0.0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) / 2**20
    if limit.exists() and limit.read_text().strip().isdigit():
        cap = int(limit.read_text()) / 2**30
        if cap < total:
            return cap, f"measured: {limit} (cgroup limit)"
    return total, "measured: /proc/meminfo MemTotal"


def this_machine(runtime_mib: float | None = None, matmul_gflops: float | None = None,
                 os_mib: float | None = None, threads: int | None = None) -> DeviceSpec:
    """This machine as a device. ``matmul_gflops`` (from a calibration) stands in for the
    peak when the clock cannot be read, and raises a peak estimate that it exceeds.
    ``threads`` (torch's) caps the cores counted: a 1-thread run can use one core."""
    info = _cpuinfo()
    arch = platform.machine().lower().replace("arm64", "aarch64")
    cores = min(usable_cores(), threads or usable_cores())
    model = cpu_model()
    fpc, fpc_why = _flops_per_cycle(info, arch)
    clock = _clock_ghz(info)
    if clock is not None:
        peak = Quantity(cores * clock[0] * fpc,
                        f"estimate: {cores} cores x {clock[0]:.2f} GHz x {fpc} ({fpc_why})")
        clock_q = Quantity(clock[0], clock[1])
    else:
        clock_q = Quantity(1.0, "estimate: clock unknown (not in /proc or sysfs); placeholder")
        peak = Quantity(matmul_gflops or cores * fpc,
                        "estimate: measured large-matmul throughput taken as the peak"
                        if matmul_gflops else "estimate: clock unknown, 1 GHz assumed")
    if matmul_gflops and matmul_gflops > peak.value:
        peak = Quantity(matmul_gflops, f"measured: large-matmul throughput, above the "
                                       f"{peak.value:.0f} GFLOP/s flag-based estimate")
    ram, ram_src = _ram_gib()
    return DeviceSpec(
        id=THIS_MACHINE_ID,
        name=f"This machine ({model}, {cores} core{'s' if cores != 1 else ''})",
        arch=arch if arch in ("x86_64", "aarch64") else "x86_64",
        cpu=f"{cores}x {model}",
        cpu_cores=Quantity(cores, "measured: CPUs in this process's affinity mask"
                                  + (f", capped at {threads} torch threads" if threads else "")),
        cpu_clock_ghz=clock_q,
        cpu_peak_gflops=peak,
        ram_gib=Quantity(ram, ram_src),
        os_mib=Quantity(os_mib or 500, "estimate: a server OS idle; this machine's other "
                                       "processes are not counted"),
        runtime_mib=(Quantity(runtime_mib, "measured: RSS of a fresh python importing the "
                                           "device stack (torch, torchvision, edge_runtime)")
                     if runtime_mib else None),
        file="measured",
    )
