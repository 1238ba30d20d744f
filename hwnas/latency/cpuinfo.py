"""What identifies this CPU even when a hypervisor hides its marketing name: /proc/cpuinfo and sysfs, read as data.

On the development VM the model name is just "AMD EPYC" whatever the host, and it ran on at least
three CPU generations within a few weeks (each a different speed for the same model): the name
alone let a table of one generation be reused on another, 45 % off. The numbers the CPU reports of
itself do not lie that way: vendor, family, model and stepping name the silicon; the ISA flags
(a digest: AVX-512 present or not changes which kernels ONNX Runtime runs) and the cache sizes
tell parts of one family apart; microcode, the logical CPUs, the process's affinity and SMT
siblings say how it was offered. Anything that cannot be read is left out (None), never guessed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
SYS_CPU = Path("/sys/devices/system/cpu")


def _first_processor(cpuinfo: Path) -> dict[str, str]:
    """The key: value pairs of the first processor block of /proc/cpuinfo (every vCPU reports the same)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), " ".join(value.split()))
    return fields


def _int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text is not None else None
    except ValueError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def caches(sys_cpu: Path = SYS_CPU) -> dict[str, str]:
    """CPU 0's caches by level and type, e.g. {"L1d": "32K", "L1i": "32K", "L2": "512K", "L3": "32768K"}."""
    found: dict[str, str] = {}
    for index in sorted((sys_cpu / "cpu0" / "cache").glob("index*")):
        level, kind, size = (_read(index / name) for name in ("level", "type", "size"))
        if level is None or size is None:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind or "", "")
        found[f"L{level}{suffix}"] = size
    return found


def _cpu_list(text: str | None) -> int | None:
    """How many CPUs a sysfs list such as '0-1,4' names."""
    if not text:
        return None
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += (int(high) - int(low) + 1) if high else 1
    return count


def affinity() -> str:
    """The CPUs this process may run on, as a compact list ('0-1')."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return f"0-{(os.cpu_count() or 1) - 1}"
    ranges: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(f"{start}-{prev}" if prev != start else str(start))
        if cpu is not None:
            start = prev = cpu
    return ",".join(ranges)


def cpu_identity(cpuinfo: Path = CPUINFO, sys_cpu: Path = SYS_CPU) -> dict[str, Any]:
    """The CPU as the fingerprint records it (see the module doc); JSON-ready."""
    info = _first_processor(cpuinfo)
    flags = sorted((info.get("flags") or info.get("Features") or "").split())
    return {
        "vendor": info.get("vendor_id") or info.get("CPU implementer"),
        "family": _int(info.get("cpu family")),
        "model": _int(info.get("model")) if info.get("model", "").isdigit() else _int(info.get("CPU part")),
        "stepping": _int(info.get("stepping")) if info.get("stepping") is not None else _int(info.get("CPU revision")),
        "microcode": info.get("microcode"),
        "flags_digest": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16] if flags else None,
        "flags_count": len(flags),
        "avx512": any(f.startswith("avx512") for f in flags),
        "cache": caches(sys_cpu),
        "threads_per_core": _cpu_list(_read(sys_cpu / "cpu0" / "topology" / "thread_siblings_list")),
        "logical_cpus": os.cpu_count() or 1,
        "affinity": affinity(),
    }


__all__ = ["affinity", "caches", "cpu_identity"]
