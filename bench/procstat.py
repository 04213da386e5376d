"""Memory (PSS) and CPU time of a server's whole process tree, read from /proc.

PSS (proportional set size) charges each shared page to the processes sharing it in
equal parts, so summing it over Postfix's master and its dozens of children, or over
pyqmail's workers, counts every page once. RSS sums would count shared libraries and
copy-on-write pages once per process.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        kids.extend(int(k) for k in text.split())
    return kids


def _children_by_scan(pid: int) -> list[int]:
    """Fallback for kernels without /proc/PID/task/TID/children."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(entry))
    return kids


_HAVE_CHILDREN_FILE = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def tree(root: int | Sequence[int]) -> list[int]:
    """``root`` (one PID or several) and all its descendants that are alive now."""
    find = _children if _HAVE_CHILDREN_FILE else _children_by_scan
    pids: list[int] = []
    todo = [root] if isinstance(root, int) else list(root)
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(find(pid))
    return pids


def pss_kib(pid: int) -> int:
    """PSS of one process in KiB; 0 if it is gone (processes come and go mid-sample)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def tree_pss_kib(root: int | Sequence[int]) -> tuple[int, int]:
    """(summed PSS in KiB, number of processes) of the tree under ``root``."""
    pids = tree(root)
    return sum(pss_kib(p) for p in pids), len(pids)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused PID apart)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])  # field 22 of stat(5)
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int, started: int | None) -> bool:
    """Is this still the process that started at ``started``, and not a zombie?"""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return started is not None and int(fields[19]) == started and fields[0] != "Z"


def tree_cpu_seconds(root: int | Sequence[int]) -> float:
    """CPU time (user + system) of the tree, including reaped children of its members."""
    total = 0
    for pid in tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17.
            total += sum(int(v) for v in fields[11:15])
    return total / CLOCK_TICKS


@dataclass(frozen=True)
class MachineTimes:
    """The whole machine's CPU time so far, by kind (/proc/stat's first line, in ticks).

    A server's tree CPU (``tree_cpu_seconds``) leaves out what the kernel does in interrupt
    context: on loopback TCP the receive side of every segment runs as a softirq, charged
    to no process (with the kernel's irq time accounting), and on this VM that was 10-13 %
    of both cores under the plain load. Read before and after a run, these say how much of
    the machine was idle and how much went to interrupts while it ran. They count every
    CPU of the machine, whatever this process's affinity (the benchmark runs unpinned)."""

    busy: int  # user, nice, system: processes (servers, generators, the benchmark itself)
    idle: int  # idle and iowait
    irq: int  # irq and softirq
    steal: int  # taken by the hypervisor from this VM

    @classmethod
    def now(cls) -> MachineTimes:
        """The current counters; all zero where /proc/stat cannot be read."""
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return cls(0, 0, 0, 0)
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return cls(user + nice + system, idle + iowait, irq + softirq, steal)

    def since(self, earlier: MachineTimes) -> MachineShare:
        """What the machine did with its CPU time since ``earlier``."""
        return MachineShare(
            (self.busy - earlier.busy) / CLOCK_TICKS,
            (self.idle - earlier.idle) / CLOCK_TICKS,
            (self.irq - earlier.irq) / CLOCK_TICKS,
            (self.steal - earlier.steal) / CLOCK_TICKS,
        )


@dataclass(frozen=True)
class MachineShare:
    """CPU seconds of every core together over a time span, by kind (see MachineTimes).
    All zero: not measured (no /proc/stat)."""

    busy: float = 0.0
    idle: float = 0.0
    irq: float = 0.0
    steal: float = 0.0

    @property
    def total(self) -> float:
        return self.busy + self.idle + self.irq + self.steal

    @property
    def idle_share(self) -> float:
        """Idle (with iowait) as a share of the span; NaN when not measured."""
        return self.idle / self.total if self.total > 0 else math.nan

    @property
    def irq_share(self) -> float:
        """Interrupts and softirqs as a share of the span; NaN when not measured."""
        return self.irq / self.total if self.total > 0 else math.nan


class PssSampler:
    """Samples a tree's summed PSS in a background thread; ``peak`` is the maximum seen."""

    def __init__(self, root: int | Sequence[int], interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak_kib = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        kib, procs = tree_pss_kib(self.root)
        if kib > self.peak_kib:
            self.peak_kib, self.peak_procs = kib, procs

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
