"""CPU time and memory of processes, read from /proc (Linux).

CPU is user + system time from ``/proc/PID/stat`` (fields 14 and 15, in clock
ticks; 1 tick = 10 ms here), so a phase must last long enough for ticks to
add up: the benchmark divides by thousands of requests. Peak RSS is
``VmHWM`` from ``/proc/PID/status``: a high-water mark since the process
started, unless reset with ``clear_refs`` (see :func:`reset_peak_rss`).
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
US_PER_TICK = 1_000_000 / CLOCK_TICKS


def cpu_split_us(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU time of ``pid`` in microseconds, or None if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) * US_PER_TICK, int(fields[12]) * US_PER_TICK


def cpu_us(pid: int) -> float | None:
    """user + system CPU time of ``pid`` in microseconds, or None if unreadable."""
    split = cpu_split_us(pid)
    return None if split is None else split[0] + split[1]


def oncpu_ns(pid: int) -> int | None:
    """Time ``pid`` has spent on a CPU, in ns (/proc/PID/schedstat): fine-grained,
    for short measurements where clock ticks are too coarse."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS, ...), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs to own the process or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_busy_us() -> tuple[float, float, float]:
    """(busy, total, steal) CPU time of the whole machine, all cores, in µs.

    Steal is time this VM wanted a CPU and the host gave it to someone else."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7]
    total = sum(fields[:8])  # guest time is already inside user/nice
    return (total - idle - steal) * US_PER_TICK, total * US_PER_TICK, steal * US_PER_TICK
