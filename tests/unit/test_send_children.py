"""pyqmail-send's delivery children without root: separate processes, same uid.

Each Manager forks a local and a remote spawner (``pyqmail.send.spawn``); deliveries run in
their children. A child killed with a job in flight gives the job back as a temporary
failure and another child takes over; an answer the manager cannot trust is refused.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pyqmail.queue.store import Queue
from pyqmail.send import spawn
from pyqmail.send.manager import Log, Manager
from pyqmail.send.spawn import parse_forward, parse_result
from tests.e2e.helpers import wait_for


def _drain(m: Manager, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while m.msgs and time.monotonic() < deadline:
        m.retry_all()
        m.dispatch()
        m.finish()
        time.sleep(0.02)
    assert not m.msgs, "messages still queued"


def test_local_delivery_runs_in_a_child_process(send_root: Path) -> None:
    q = Queue(send_root / "queue")
    q.enqueue("a@remote.test", ["user@mx.test"], b"Subject: hi\r\n\r\nbody\r\n")
    m = Manager(send_root, Log(io.StringIO()))
    link = m.children.links["local"]
    wait_for(lambda: link.sock is not None, 10, "the local child")
    assert link.pid not in (0, os.getpid())
    assert m.pickup() == 1
    _drain(m)
    [name] = os.listdir(send_root.parent / "home" / "Maildir" / "new")
    # the Maildir's unique name carries the pid of the process that wrote it
    assert f"P{link.pid}Q" in name
    m.children.close()


def test_a_killed_child_defers_its_job_and_another_delivers_it(send_root: Path) -> None:
    q = Queue(send_root / "queue")
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    link = m.children.links["local"]
    wait_for(lambda: link.sock is not None, 10, "the local child")
    first = link.pid
    os.kill(first, signal.SIGSTOP)
    env = q.enqueue("a@remote.test", ["user@mx.test"], b"Subject: hi\r\n\r\nbody\r\n")
    m.pickup()
    m.dispatch()
    wait_for(lambda: link.calls, 10, "the job to reach the child")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: m.msgs[env.queue_id].rcpts[0].status == "pending", 10, "the deferral")
    assert "1 job(s) in flight deferred" in out.getvalue()
    assert "result=deferred" in out.getvalue()
    wait_for(lambda: link.sock is not None and link.pid != first, 10, "a new child")
    _drain(m)
    assert len(os.listdir(send_root.parent / "home" / "Maildir" / "new")) == 1
    m.children.close()


def test_forwards_are_queued_by_the_manager(send_root: Path) -> None:
    (send_root / "alias" / ".qmail-fwd").write_text("&user@mx.test\n")
    (send_root / "alias" / ".qmail-fwd").chmod(0o644)
    q = Queue(send_root / "queue")
    q.enqueue("a@remote.test", ["fwd@mx.test"], b"Subject: fwd\r\n\r\nbody\r\n")
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    m.pickup()
    deadline = time.monotonic() + 20
    while "forwarded to user@mx.test as" not in out.getvalue() and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.02)
    m.pickup()
    _drain(m)
    [delivered] = os.listdir(send_root.parent / "home" / "Maildir" / "new")
    data = (send_root.parent / "home" / "Maildir" / "new" / delivered).read_bytes()
    assert b"Delivered-To: fwd@mx.test" in data
    m.children.close()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"kind": "ok"}, "unexpected fields"),
        (
            dict.fromkeys(
                ("kind", "detail", "status", "remote", "diagnostic", "tls", "verified"), "x"
            ),
            "result kind 'x'",
        ),
        (
            {
                **dict.fromkeys(("detail", "status", "remote", "diagnostic", "tls"), ""),
                "kind": "ok",
                "verified": 1,
            },
            "not a string",
        ),
        ("ok", "unexpected fields"),
    ],
)
def test_an_answer_the_manager_cannot_trust_is_refused(raw: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_result(raw)


def test_a_forward_without_recipients_is_refused() -> None:
    with pytest.raises(ValueError, match="without recipients"):
        parse_forward({"to": [], "delivered_to": "x", "done": [], "source": "y"})


def test_hup_gives_the_children_the_new_control_files(send_root: Path) -> None:
    """The local child checks the hop limit with the manager's control files, so a new
    ``maxhops`` reaches it after HUP (it never reads control/ itself)."""
    q = Queue(send_root / "queue")
    hops = b"Received: from a\r\nReceived: from b\r\nReceived: from c\r\n"
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    q.enqueue("a@remote.test", ["user@mx.test"], hops + b"Subject: 1\r\n\r\nbody\r\n")
    m.pickup()
    _drain(m)
    assert "result=done" in out.getvalue()
    (send_root / "control" / "maxhops").write_text("1\n")
    m.flags.add("hup")
    m._handle_flags()
    assert "control files reloaded" in out.getvalue()
    q.enqueue("a@remote.test", ["user@mx.test"], hops + b"Subject: 2\r\n\r\nbody\r\n")
    m.pickup()
    _drain(m)
    assert "too many hops (3, over 2)" in out.getvalue()
    m.children.close()


def test_a_lost_spawner_stops_the_manager_with_111(send_root: Path) -> None:
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    spawner = m.children.links["remote"].spawner.pid
    os.kill(spawner, signal.SIGKILL)
    wait_for(lambda: m.children.lost == ["remote"], 10, "the manager to notice")
    m._handle_flags()
    assert m.stopping
    assert m.status == 111
    assert f"error remote spawner {spawner} is gone" in out.getvalue()
    m.children.close()


def test_a_long_detail_is_cut_not_refused() -> None:
    """A server may answer with 64 KiB of text: the result stays usable, its fields cut."""
    raw = {**dict.fromkeys(("status", "remote", "diagnostic", "tls", "verified"), "")}
    raw |= {"kind": "perm", "detail": "x" * 100_000}
    assert parse_result(raw).detail == "x" * 4000


def _dying_during_send(link: spawn.Link, *, taken: bool) -> None:
    """Make the next send to ``link``'s child fail with EPIPE; with ``taken``, the child
    dies first and the link's thread fails the calls in flight (as ``_serve`` does on EOF)."""
    real_send = link._send

    def send(sock: socket.socket, request: dict[str, Any]) -> None:
        link._send = real_send  # type: ignore[method-assign]
        if taken:
            with link.cond:
                calls = link._take_calls()
            # the link's thread, not this one, answers them
            reader = threading.Thread(target=spawn._fail, args=(calls,))
            reader.start()
            reader.join()
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    link._send = send  # type: ignore[method-assign]


@pytest.mark.parametrize("taken", [True, False])
def test_a_job_whose_send_fails_has_exactly_one_outcome(taken: bool) -> None:
    ours, child = socket.socketpair()
    ctl, spawner = socket.socketpair()
    link = spawn.Link(spawn.Spawner("local", 0, ctl), print, lambda kind: None)
    link.sock = ours
    _dying_during_send(link, taken=taken)
    answers: list[object] = []
    raised = False
    try:
        link.submit({"op": "local"}, answers.append)
    except spawn.ChildLostError:
        raised = True
    finally:
        for sock in (ours, child, ctl, spawner):
            sock.close()
    # the link's thread answered None (the caller must not run the job again), or the
    # caller got ChildLostError and the callback never runs
    assert (raised, answers) == ((False, [None]) if taken else (True, []))
    assert not link.calls


def test_a_child_dying_during_a_send_keeps_the_slot_count(send_root: Path) -> None:
    q = Queue(send_root / "queue")
    m = Manager(send_root, Log(io.StringIO()))
    link = m.children.links["local"]
    wait_for(lambda: link.sock is not None, 10, "the local child")
    env = q.enqueue("a@remote.test", ["user@mx.test"], b"Subject: hi\r\n\r\nbody\r\n")
    m.pickup()
    _dying_during_send(link, taken=True)
    m.dispatch()
    m.local_pool.shutdown(wait=True)  # a second run of the job (the bug) is over
    assert m.busy_local == 0
    assert m.msgs[env.queue_id].rcpts[0].status == "pending"  # deferred once, not delivered
    assert not list((send_root.parent / "home" / "Maildir" / "new").glob("*"))
    m.children.close()
