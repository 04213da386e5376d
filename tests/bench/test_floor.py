"""The floor the receive benchmark measures each run (bench/floor.py): that every part is
measured, and that the per-workload floor follows the count its docstring gives."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import pytest

from bench import floor
from bench.certs import make_certs
from bench.floor import Floor
from bench.procstat import MachineShare
from bench.smtpd_load import WORKLOADS, Run, floor_lines, parse_args

# Round figures, so the counts can be checked by hand.
MADE = Floor(
    connect_ms=0.2,
    round_trip_ms=0.02,
    body_ms=0.04,
    handshake_ms=0.4,
    resumed_ms=0.3,
    commit_p50_ms=1.0,
    commit_p90_ms=2.0,
    commit_cpu_ms=0.3,
    fsync_p50_ms=0.5,
    tickets="made up",
)


def test_measure_reports_every_part(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "tls")
    cores = os.sched_getaffinity(0)
    measured = floor.measure(tmp_path, certs)
    for field in dataclasses.fields(Floor):
        value = getattr(measured, field.name)
        if field.name == "round_trip_cross_ms" and len(os.sched_getaffinity(0)) < 2:
            assert math.isnan(value)  # one core: nothing to cross
        elif field.type == "float":
            assert math.isfinite(value), (field.name, value)  # resumed too: it did resume
            assert value > 0, (field.name, value)
    assert measured.commit_p90_ms >= measured.commit_p50_ms
    assert os.sched_getaffinity(0) == cores  # the pinning for the loopback figures is undone
    assert "ticket keys" in measured.tickets
    assert [p.name for p in tmp_path.iterdir()] == ["tls"]  # the commit files are gone
    shapes = {(w.starttls, w.per_session, w.resume, w.pipelining) for w in WORKLOADS}
    cost = {s: floor.server_cpu_floor(measured, *s) for s in shapes}
    assert cost[(True, 1, False, False)] > cost[(False, 1, False, False)]
    assert cost[(False, 1, False, False)] > cost[(False, 10, False, False)]
    assert cost[(True, 1, False, False)] > cost[(True, 10, False, False)]
    assert cost[(False, 1, False, False)] > cost[(False, 1, False, True)]
    assert len(floor.describe(measured)) == 4


def test_server_cpu_floor_follows_its_count() -> None:
    # per session: half of (connection + 2.5 round trips); per message: half of
    # (3 round trips + the body)
    assert floor.server_cpu_floor(MADE, False, 1) == pytest.approx(0.5 * 0.25 + 0.5 * 0.1)
    assert floor.server_cpu_floor(MADE, False, 10) == pytest.approx(0.125 / 10 + 0.05)
    # STARTTLS: 4 more round trips per session and the server's handshake
    tls_session = 0.5 * (0.2 + 6.5 * 0.02)
    assert floor.server_cpu_floor(MADE, True, 1) == pytest.approx(tls_session + 0.4 + 0.05)
    assert floor.server_cpu_floor(MADE, True, 10) == pytest.approx((tls_session + 0.4) / 10 + 0.05)
    assert floor.server_cpu_floor(MADE, True, 1, True) == pytest.approx(tls_session + 0.3 + 0.05)
    # pipelined: MAIL, RCPT and DATA are one round trip, not three
    assert floor.server_cpu_floor(MADE, False, 1, pipelined=True) == pytest.approx(0.125 + 0.03)
    no_resume = dataclasses.replace(MADE, resumed_ms=math.nan)
    assert math.isnan(floor.server_cpu_floor(no_resume, True, 1, True))


def test_latency_floor_and_ceiling() -> None:
    assert floor.latency_floor(MADE) == pytest.approx(1.0 + 0.01)  # 2 fsyncs + half a trip
    assert floor.latency_floor(MADE, 1) == pytest.approx(0.5 + 0.01)
    assert floor.ceiling(0.2, 0.3, 2) == pytest.approx(4000.0)
    # 2,000 msg/s on 2 cores is 1 ms of CPU per message, 0.3 of it the generator's
    assert floor.cpu_budget(2000, 0.3, 2) == pytest.approx(0.7)
    assert math.isnan(floor.cpu_budget(0, 0.3, 2))


def _run(rate: float, server_cpu: float, irq: float = 0.0) -> Run:
    return Run(
        rate=rate,
        messages=1000,
        errors=0,
        pss_kib=0,
        procs=1,
        server_cpu=server_cpu,
        gen_cpu=0.3,
        seconds=1.0,
        machine=MachineShare(busy=1.6, idle=0.4 - irq, irq=irq),
    )


def test_table_section() -> None:
    plain1 = WORKLOADS[0]
    runs = {
        (plain1.name, "pyqmail"): [_run(2000, 0.5, irq=0.1)],
        (plain1.name, "postfix"): [_run(1000, 1.0)],
    }
    lines = floor_lines([plain1, WORKLOADS[4]], ["pyqmail", "postfix"], runs, MADE, cores=2)
    assert lines[0].startswith("floor: server CPU per message (ms)")
    cells = lines[1].split()
    # floor 0.175, pyqmail 0.50 (2.86 x), postfix 1.00 (5.71 x)
    assert cells[-5:] == ["0.175", "0.50", "2.86", "1.00", "5.71"]
    assert "(*)" in lines[2]  # the checks row, not run: dashes
    assert lines[2].split()[-4:] == ["-", "n/a", "-", "n/a"]
    assert any(
        line.startswith("250 after DATA floor (ms): pyqmail 2 fsyncs 1.01") for line in lines
    )
    ceiling = next(line for line in lines if line.startswith(plain1.name) and "0.300" in line)
    # 2 cores / (0.175 + 0.3 ms) = 4211 msg/s, against 2.0 x 1000; the budget for that is
    # 2 cores / 2000 msg/s - 0.3 = 0.70 ms; 0.1 s of interrupts over 1000 messages is
    # 0.10 ms each, which leaves 0.60; pyqmail spends 0.50
    assert ceiling.split()[-8:] == [
        "0.300", "4211", "2000.0", "2000.0", "0.70", "0.10", "0.60", "0.50"
    ]  # fmt: skip


def test_no_floor_option() -> None:
    assert parse_args([]).no_floor is False
    assert parse_args(["--no-floor"]).no_floor is True


@pytest.mark.parametrize("failing", ["client", "server"])
def test_a_failed_loopback_end_is_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A client that dies before it connects would leave the server end in accept() for
    ever, a server end that fails would leave the client in recv(): the deadline and the
    kill turn either into an error the benchmark survives (it prints the floor as not
    measured), with the child reaped."""
    monkeypatch.setattr(floor, "LOOPBACK_DEADLINE", 3.0)
    core = min(os.sched_getaffinity(0))
    nowhere = 4095  # no such core: sched_setaffinity fails in that end
    cpus = (core, nowhere) if failing == "client" else (nowhere, core)
    before, children = os.sched_getaffinity(0), _children()  # a worker may have others
    lst = floor._listener()
    started = time.monotonic()
    try:
        with pytest.raises(OSError):  # TimeoutError, or the failed pinning
            floor.loopback_exchange_ms(lst, floor.REQUEST, cpus)
    finally:
        lst.close()
    assert time.monotonic() - started < 10
    assert os.sched_getaffinity(0) == before
    assert _children() <= children  # the client was reaped


def _children() -> set[int]:
    """This process's child processes, zombies included (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == os.getpid():
                found.add(int(entry.name))
    return found
