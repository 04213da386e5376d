"""qmail's tcpto under concurrency (``pyqmail.send.peers``): many workers of the delivery
child fail together in one outage, and that is one failure, not twenty.

Against a loopback server that accepts and never greets (``tests.smtpserver``), with
``timeoutremote`` 1 s, and workers as threads sharing one ``PeerMemory`` whose clock the
test can move past a rest. Before, every worker's timeout doubled the rest (20 in flight:
an hour, and no probe), and refusals doubled it too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.send.delivery import Result
from pyqmail.send.mx import Destination
from pyqmail.send.peers import BACKOFF_FIRST, PeerMemory
from pyqmail.send.remote import RemoteDelivery
from tests.smtpserver import Conversation, SmtpServer

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
WORKERS = 8


class Clock:
    """time.monotonic(), which the test can move forward by ``skip``."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def skip(self, seconds: float) -> None:
        self.offset += seconds


def _delivery(tmp_path: Path, port: int, peers: PeerMemory) -> RemoteDelivery:
    root = tmp_path / "control"
    root.mkdir(exist_ok=True)
    (root / "me").write_text("mx.test\n")
    (root / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
    (root / "timeoutremote").write_text("1\n")
    (root / "timeoutconnect").write_text("1\n")
    return RemoteDelivery(Control.load(tmp_path), peers=peers)


def _deliver(delivery: RemoteDelivery) -> Result:
    session = delivery.session("remote.test")
    env = Envelope("id", "me@mx.test", ("a@remote.test",), len(MESSAGE), 0.0)
    try:
        (result,) = session.deliver(env, MESSAGE, ["a@remote.test"])
    finally:
        session.close()
    return result


def _together(delivery: RemoteDelivery, workers: int = WORKERS) -> list[Result]:
    """``workers`` deliveries started at once, each in a thread (a worker of the child)."""
    start = threading.Barrier(workers)
    results: list[Result] = []

    def work() -> None:
        start.wait()
        results.append(_deliver(delivery))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == workers, "a delivery raised or still runs"
    return results


def _never_greet(conv: Conversation) -> None:
    """Accept, and say nothing until the client goes away."""
    conv.hold()


@pytest.fixture
def silent() -> Iterator[SmtpServer]:
    with SmtpServer(_never_greet) as server:
        yield server


def test_workers_failing_together_start_one_rest_and_one_probe_follows(
    tmp_path: Path, silent: SmtpServer
) -> None:
    clock = Clock()
    peers = PeerMemory(clock=clock)
    delivery = _delivery(tmp_path, silent.port, peers)
    dest = Destination("127.0.0.1", "127.0.0.1", silent.port)
    results = _together(delivery)
    assert all("no greeting within 1 s" in r.detail for r in results), results
    assert len(silent.conversations) == WORKERS  # all of them were under way
    assert 0 < peers.resting(dest) <= BACKOFF_FIRST  # one outage: the first rest
    clock.skip(BACKOFF_FIRST)
    results = _together(delivery)
    assert len(silent.conversations) == WORKERS + 1  # one probe, not eight tries
    assert sum("no greeting" in r.detail for r in results) == 1, results
    assert sum("not tried" in r.detail for r in results) == WORKERS - 1
    # The probe failed after the rest had ended: the next rest is twice as long.
    assert BACKOFF_FIRST < peers.resting(dest) <= 2 * BACKOFF_FIRST


def test_refusals_do_not_lengthen_the_rest_of_a_later_timeout(tmp_path: Path) -> None:
    """An address that refuses (nothing listens) is tried every time, after the others,
    and its refusals are not counted: when it later accepts and never greets, it rests
    the first 60 s, not 60 s doubled once per refusal."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = int(probe.getsockname()[1])
    peers = PeerMemory()
    delivery = _delivery(tmp_path, port, peers)
    dest = Destination("127.0.0.1", "127.0.0.1", port)
    for _ in range(4):
        result = _deliver(delivery)
        assert "cannot connect" in result.detail and "not tried" not in result.detail, result
        assert peers.resting(dest) == 0
    with SmtpServer(_never_greet, "127.0.0.1", port) as late:
        result = _deliver(delivery)
        assert "no greeting within 1 s" in result.detail, result
        assert len(late.conversations) == 1
    assert 0 < peers.resting(dest) <= BACKOFF_FIRST


def test_a_try_under_way_before_a_rest_ended_does_not_double_it() -> None:
    """The memory itself: failures during a rest leave it as it is; a failure reported
    after the rest ended by a try that began before (a long greeting wait) starts a rest
    of the same length; only a try begun after the rest (the probe) doubles it."""
    now = [1000.0]
    peers = PeerMemory(clock=lambda: now[0])
    dest = Destination("h", "192.0.2.1", 25)
    peers.connect_failed(dest, timed_out=True)
    now[0] += 30
    peers.connect_failed(dest, timed_out=True, started=990.0)
    assert peers.resting(dest) == BACKOFF_FIRST - 30  # not extended, not doubled
    now[0] += 40  # the rest ended 10 s ago
    peers.connect_failed(dest, timed_out=True, started=1000.0)
    assert peers.resting(dest) == BACKOFF_FIRST
    now[0] += BACKOFF_FIRST
    assert peers.order([dest]) == ([dest], [])  # the probe
    assert peers.order([dest]) == ([], [dest])  # the others wait for it
    peers.connect_failed(dest, timed_out=True, started=now[0])
    assert peers.resting(dest) == 2 * BACKOFF_FIRST
    now[0] += 2 * BACKOFF_FIRST
    assert peers.order([dest]) == ([dest], [])
    peers.connected(dest)  # the probe greeted: everyone may go
    assert peers.order([dest]) == ([dest], [])
    assert peers.order([dest]) == ([dest], [])
