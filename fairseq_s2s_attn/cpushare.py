"""How much of this process's cores other processes keep busy, and the intra-op threads that
leaves: ``runtime.threads_follow_other_work`` reads it between batches.

Measured on a 2-core AMD EPYC (Zen 4): two fairseq-train runs of the demo recipe side by side,
each with the batch commands' 2 threads, made 10 updates in 27 s and none in the next 30 s (their
threads wait for each other's cores at every parallel region); with one thread each they made
5.9-8.4k words/s each, more together than one run alone (11-13.5k). fairseq-generate of 1,000
sentences beside a training run: 13.7 s with 2 threads, 4.9 s with 1 (3.3 s alone with 2).

Others' load over a period is the busy time of this process's cores (``/proc/stat``: user,
nice, system, irq, softirq, steal) less the CPU time of this process and its children (its data
loader workers), per second of the period, in cores. Where ``/proc`` cannot be read, None.
"""

import os
import time
from typing import Iterable, Optional, Tuple

try:
    CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    CLOCK_TICKS = 100

# /proc/stat's columns after "cpuN": user nice system idle iowait irq softirq steal guest
# guest_nice; guest time is counted in user already, idle and iowait are not busy
BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def busy_seconds(cpus: Iterable[int], stat: str = "/proc/stat") -> Optional[float]:
    """CPU seconds the given cores have been busy since boot, or None."""
    wanted = {f"cpu{c}" for c in cpus}
    total, seen = 0, 0
    try:
        with open(stat) as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in wanted:
                    values = [int(v) for v in fields[1:]]
                    total += sum(values[i] for i in BUSY_COLUMNS if i < len(values))
                    seen += 1
    except (OSError, ValueError):
        return None
    return total / CLOCK_TICKS if seen == len(wanted) and seen else None


def children_seconds(proc: str = "/proc") -> float:
    """CPU seconds of this process's living child processes (fairseq's data loader workers)."""
    total = 0
    try:
        tasks = os.listdir(f"{proc}/self/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"{proc}/self/task/{tid}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"{proc}/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
            except (OSError, ValueError, IndexError):
                continue
    return total / CLOCK_TICKS


class CoreShare:
    """Cores of ``cpus`` that other processes kept busy since the last reading."""

    def __init__(self, cpus: Iterable[int]):
        self.cpus = sorted(cpus)
        self.last = self.reading()

    def reading(self) -> Tuple[float, Optional[float], float]:
        """(wall clock, busy seconds of the cores, CPU seconds of this process and children)"""
        return (time.monotonic(), busy_seconds(self.cpus),
                time.process_time() + children_seconds())

    def others(self) -> Optional[float]:
        """Cores others used since the last call (or since made), 0 or more; None if unknown."""
        now = self.reading()
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def threads_left(cores: int, most: int, others: float) -> int:
    """Threads for this process where others keep ``others`` of its ``cores`` busy: the cores
    they leave (rounded, so half a core's worth of other work costs a thread), at least 1, at
    most ``most`` (the default for an idle machine)."""
    return max(1, min(most, int(cores - others + 0.5)))
