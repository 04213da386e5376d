"""The whole machine's CPU counters the benchmark reads around each run
(bench/procstat.py MachineTimes): busy, idle and interrupt time from /proc/stat."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict

from bench.procstat import MachineShare, MachineTimes
from bench.smtpd_load import Run


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
    # every core's time is in one of the parts: about cores x the wall time
    assert 0.4 * cores <= span.total <= 0.8 * (os.cpu_count() or 1)
    assert 0 <= span.irq_share <= 1
    assert 0 <= span.idle_share < 1


def test_shares_of_an_unmeasured_span_are_nan() -> None:
    assert math.isnan(MachineShare().idle_share)
    assert math.isnan(MachineShare().irq_share)
    share = MachineShare(busy=1.0, idle=2.0, irq=0.5, steal=0.5)
    assert (share.idle_share, share.irq_share) == (0.5, 0.125)


def test_a_run_with_its_machine_share_is_written_as_json() -> None:
    """``bench/smtpd_load.py --json`` writes every run (the nested share included)."""
    run = Run(
        rate=1.0, messages=1, errors=0, pss_kib=0, procs=1, server_cpu=0.1, gen_cpu=0.1,
        seconds=1.0, machine=MachineShare(busy=1.0, idle=0.5, irq=0.25),
    )  # fmt: skip
    back = json.loads(json.dumps(asdict(run)))
    assert back["machine"] == {"busy": 1.0, "idle": 0.5, "irq": 0.25, "steal": 0.0}
