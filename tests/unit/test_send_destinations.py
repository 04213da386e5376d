"""One destination cannot take every remote worker, and one with no connection to be had
defers what waits for it at once (``pyqmail.send.scheduler``).

Real parts: pyqmail-send's manager with its delivery children, real SMTP servers on
127.0.0.1 (``Recorder``, and ``Tarpit``: a host that takes connections and never greets,
what an overloaded MX costs a client: a whole wait per attempt, ``timeoutremote`` for the
greeting, as a blackholed one costs ``timeoutconnect``).
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.resolver
import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.queue.state import Attempt, read_state
from pyqmail.queue.store import Queue
from pyqmail.send.manager import Log, Manager, nextretry
from pyqmail.send.mx import DnsResolver
from pyqmail.send.remote import RemoteDelivery
from pyqmail.send.scheduler import unreachable
from tests.dnsserver import silent_server
from tests.e2e.helpers import wait_for
from tests.e2e.test_send import Recorder
from tests.unit.test_send_job_failures import run_manager

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


class Tarpit:
    """Accepts connections and says nothing; counts them. ``release`` closes the ones
    held (the client then reads end of file where the greeting should be)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        with self.lock:
            return len(self.held)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.held.append(conn)

    def release(self) -> None:
        with self.lock:
            for conn in self.held:
                conn.close()

    def close(self) -> None:
        self.sock.close()
        self.release()


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    pit = Tarpit()
    yield pit
    pit.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


def _routes(root: Path, tarpit: Tarpit, recorder: Recorder, **files: str) -> None:
    """dead.test to the tarpit, alive.test to the recorder, and control ``files``."""
    control = root / "control"
    (control / "smtproutes").write_text(
        f"dead.test:127.0.0.1:{tarpit.port}\nalive.test:127.0.0.1:{recorder.port}\n"
    )
    for name, value in files.items():
        (control / name).write_text(f"{value}\n")


def _idle(m: Manager) -> bool:
    with m.lock:
        return (m.busy_remote, m.remote_workers, m.ready_remote) == (0, {}, {})


def _deferred(m: Manager, ids: list[str]) -> bool:
    with m.lock:
        rcpts = [m.msgs[i].rcpts[0] for i in ids]
        return all(r.status == "pending" and r.result is not None for r in rcpts)


def test_a_dead_destination_leaves_workers_to_the_others(
    send_root: Path, tarpit: Tarpit, recorder: Recorder
) -> None:
    """Six messages for a destination that never answers, then one for another: the
    other is delivered at once, while the first destination holds its two workers (it
    held all four, and the other waited for the greeting's 60 s per attempt)."""
    _routes(
        send_root,
        tarpit,
        recorder,
        concurrencyremote="4",
        concurrencydestination="2",
        timeoutremote="60",
    )
    q = Queue(send_root / "queue")
    for n in range(6):
        q.enqueue("a@mx.test", [f"u{n}@dead.test"], MESSAGE)
    q.enqueue("a@mx.test", ["v@alive.test"], MESSAGE)
    m = Manager(send_root, Log(io.StringIO()))
    try:
        assert m.pickup() == 7
        run_manager(m, lambda: bool(recorder.accepted), 15, "the message to alive.test")
        assert [rcpt for rcpt, _, _ in recorder.accepted] == ["v@alive.test"]
        wait_for(lambda: tarpit.connections == 2, 10, "two connections to dead.test")
        time.sleep(0.3)
        assert tarpit.connections == 2  # concurrencydestination, not concurrencyremote
        with m.lock:
            assert m.remote_workers[f"[127.0.0.1]:{tarpit.port}"] == 2
    finally:
        tarpit.close()
        m.children.close()


def test_no_connection_defers_what_waits_for_the_destination_at_once(
    send_root: Path, tarpit: Tarpit, recorder: Recorder
) -> None:
    """Ten messages for a destination that never greets: two attempts (its two workers),
    each paying the greeting's wait, and the eight messages waiting get the same temporary
    failure at once, on their usual retry schedule, instead of an attempt each."""
    _routes(send_root, tarpit, recorder, concurrencydestination="2", timeoutremote="2")
    q = Queue(send_root / "queue")
    ids = [q.enqueue("a@mx.test", [f"u{n}@dead.test"], MESSAGE).queue_id for n in range(10)]
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    try:
        assert m.pickup() == 10
        run_manager(m, lambda: _deferred(m, ids), 30, "every message deferred")
        assert tarpit.connections in (1, 2)  # 1: the second worker started after the wait
        key = re.escape(f"[127.0.0.1]:{tarpit.port}")
        said = re.search(
            rf"status no connection to {key}: (\d+) more job\(s\) deferred", out.getvalue()
        )
        assert said is not None and int(said[1]) in (8, 9), out.getvalue()
        details = set()
        for queue_id in ids:
            msg = m.msgs[queue_id]
            r = msg.rcpts[0]
            assert r.result is not None and unreachable(r.result)
            details.add(r.result.detail)
            assert r.next_try == nextretry(msg.env.received, r.last_try, "remote")
            [record] = read_state(send_root / "queue" / "state" / queue_id)
            assert isinstance(record, Attempt) and record.event == "deferred"
            assert (record.status, record.detail) == ("4.4.1", r.result.detail)
        assert len(details) <= 2, details  # the two attempts' own words, nothing else
        assert all(f"127.0.0.1:{tarpit.port}" in d for d in details), details
        wait_for(lambda: _idle(m), 10, "the workers to give their slots back")
    finally:
        m.children.close()


def test_a_job_that_comes_due_later_is_tried(
    send_root: Path, tarpit: Tarpit, recorder: Recorder
) -> None:
    """Only what waited when the connection failed is deferred by the scheduler: the next
    message goes to remote delivery again, which knows the silent address from its
    memory of them (tcpto, ``pyqmail.send.peers``) and defers it without a connection."""
    _routes(send_root, tarpit, recorder, concurrencydestination="1", timeoutremote="1")
    q = Queue(send_root / "queue")
    first = [q.enqueue("a@mx.test", [f"u{n}@dead.test"], MESSAGE).queue_id for n in range(3)]
    m = Manager(send_root, Log(io.StringIO()))
    try:
        m.pickup()
        run_manager(m, lambda: _deferred(m, first), 20, "the first messages deferred")
        assert tarpit.connections == 1
        later = q.enqueue("a@mx.test", ["w@dead.test"], MESSAGE).queue_id
        m.pickup()
        run_manager(m, lambda: _deferred(m, [later]), 20, "the later message deferred")
        result = m.msgs[later].rcpts[0].result
        assert result is not None and unreachable(result)
        assert result.detail.startswith("not tried: every address of dead.test"), result
        assert tarpit.connections == 1
    finally:
        m.children.close()


def test_a_destination_whose_dns_does_not_answer_defers_what_waits_at_once(
    send_root: Path,
) -> None:
    """Ten messages for a domain whose name servers never answer (a real UDP socket on
    loopback that reads nothing): the two workers each wait the resolver's lifetime and
    defer with 4.4.3; the eight messages waiting get that failure at once, recorded and on
    their retry schedule, instead of a lifetime's wait each in a slot."""
    (send_root / "control" / "concurrencydestination").write_text("2\n")
    q = Queue(send_root / "queue")
    ids = [q.enqueue("a@mx.test", [f"u{n}@broken.test"], MESSAGE).queue_id for n in range(10)]
    out = io.StringIO()
    with silent_server() as (host, port):
        res = dns.resolver.Resolver(configure=False)
        res.nameservers, res.port, res.timeout = [host], port, 0.5
        m = Manager(send_root, Log(out), resolver=DnsResolver(lifetime=1.5, resolver=res))
        try:
            assert m.pickup() == 10
            run_manager(m, lambda: _deferred(m, ids), 30, "every message deferred")
            said = re.search(
                r"status no connection to mx:broken\.test: (\d+) more job\(s\) deferred",
                out.getvalue(),
            )
            assert said is not None and int(said[1]) in (8, 9), out.getvalue()
            for queue_id in ids:
                msg = m.msgs[queue_id]
                r = msg.rcpts[0]
                assert r.result is not None and r.result.status == "4.4.3", r.result
                assert r.next_try == nextretry(msg.env.received, r.last_try, "remote")
                [record] = read_state(send_root / "queue" / "state" / queue_id)
                assert isinstance(record, Attempt) and record.event == "deferred"
                assert record.status == "4.4.3"
            wait_for(lambda: _idle(m), 10, "the workers to give their slots back")
        finally:
            m.children.close()


def _control(root: Path, port: int) -> Control:
    (root / "control").mkdir(parents=True, exist_ok=True)
    (root / "control" / "me").write_text("mx.test\n")
    (root / "control" / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
    (root / "control" / "timeoutremote").write_text("1\n")
    return Control.load(root)


def test_what_remote_delivery_answers_when_no_connection_is_made(
    tmp_path: Path, tarpit: Tarpit
) -> None:
    """The signal the scheduler relies on (``unreachable``), from remote delivery itself:
    a refused connection and a server that never greets are; a server's own 451 4.4.1
    is a reply, not a destination without a connection."""
    closed = socket.create_server(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    results = {}
    for name, port in (("refused", refused_port), ("silent", tarpit.port)):
        session = RemoteDelivery(_control(tmp_path / name, port)).session("remote.test")
        [results[name]] = session.deliver(_env(), MESSAGE, ["a@remote.test"])
        session.close()
    assert all(unreachable(r) for r in results.values()), results
    rec = Recorder(rcpt_reply={"a@remote.test": "451 4.4.1 no answer from the next hop"})
    try:
        session = RemoteDelivery(_control(tmp_path / "replied", rec.port)).session("remote.test")
        [replied] = session.deliver(_env(), MESSAGE, ["a@remote.test"])
        session.close()
    finally:
        rec.close()
    assert replied.status == "4.4.1" and not unreachable(replied), replied


def _env() -> Envelope:
    return Envelope("1.2.3", "a@mx.test", ("a@remote.test",), len(MESSAGE), time.time())
