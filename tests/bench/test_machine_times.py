"""The whole machine's CPU counters the benchmark reads around each run
(bench/procstat.py MachineTimes): busy, idle and interrupt time from /proc/stat."""

from __future__ import annotations

import math
import os
import time

from bench.procstat import MachineShare, MachineTimes


def test_a_busy_second_is_counted_as_busy_time() -> None:
    """One core spinning for half a second: at least most of that half second is busy
    time of the machine (other processes may add to it, never take from it)."""
    before = MachineTimes.now()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
    span = MachineTimes.now().since(before)
    assert span.busy >= 0.35
    cores = len(os.sched_getaffinity(0))
    # every core's time is in one of the three parts: about cores x the wall time
    assert 0.4 * cores <= span.busy + span.idle + span.irq <= 0.8 * (os.cpu_count() or 1)
    assert 0 <= span.share(span.irq) <= 1
    assert 0 < span.share(span.busy) <= 1


def test_shares_of_an_empty_span_are_nan() -> None:
    empty = MachineShare()
    assert math.isnan(empty.share(empty.idle))
    assert MachineShare(busy=1.0, idle=2.0, irq=1.0).share(2.0) == 0.5
