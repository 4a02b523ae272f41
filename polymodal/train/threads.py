"""How many torch threads a CPU run should use: `train.threads=auto`.

Torch takes every core by default and its OpenMP threads spin while they wait for each other. When other
work holds some cores, the spinning threads fight it for them and a run can get several times slower
(benchmarks/threads.py measures it). `auto` counts the cores that are idle right now (from two readings of
/proc/stat a moment apart) among those this process may use, and takes that many, at least one.
"""
from __future__ import annotations

import os
import time
from typing import Callable


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read_cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(idle, total) jiffies summed over all CPUs, or None where /proc/stat does not exist."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)         # idle + iowait
    return idle, sum(values[:8])                                      # guest time is already in user


def idle_cores(interval: float = 0.25, read: Callable[[], tuple[int, int] | None] = _read_cpu_times) -> float | None:
    """How many of the machine's cores were idle over the next `interval` seconds (None when unknown)."""
    first = read()
    if first is None:
        return None
    time.sleep(interval)
    second = read()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, min(1.0, share)) * (os.cpu_count() or 1)


def resolve_threads(value: int | str, idle: float | None = None) -> int:
    """The thread count for `train.threads`: an integer > 0 as given; 0 = torch's default (returns 0);
    "auto" = the idle usable cores, rounded, at least 1 (all usable cores when idleness is unknown).

    Args:
        value: the recipe value.
        idle: idle cores, when already measured (tests); measured now otherwise.
    """
    if value != "auto":
        return int(value)
    cores = usable_cores()
    if idle is None:
        idle = idle_cores()
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.5)))
