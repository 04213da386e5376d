"""pyqmail-send keeps the bytes it read at pickup for the first delivery (Msg.body)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from pyqmail.queue.store import Queue
from pyqmail.send import loader as send
from pyqmail.send.manager import Log, Manager


@pytest.fixture
def root(send_root: Path) -> Path:
    return send_root


def _drain(m: Manager, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while m.msgs and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.01)
    assert not m.msgs, "messages still queued"


def test_first_delivery_uses_the_pickup_bytes_and_reads_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(root / "queue")
    env = q.enqueue("a@remote.test", ["user@mx.test"], b"Subject: hi\r\n\r\nbody\r\n")
    m = Manager(root, Log(io.StringIO()))
    assert m.pickup() == 1
    msg = m.msgs[env.queue_id]
    assert msg.body == b"Subject: hi\r\n\r\nbody\r\n"
    assert m.body_bytes == len(msg.body)
    reads: list[str] = []

    def no_read(sub: str, name: str, span: object) -> None:
        reads.append(name)
        raise AssertionError("the queue file was read again")

    monkeypatch.setattr(m.queue, "read_stored", no_read)
    _drain(m)
    assert reads == []
    assert m.body_bytes == 0
    [name] = os.listdir(root.parent / "home" / "Maildir" / "new")
    assert (root.parent / "home" / "Maildir" / "new" / name).read_bytes().endswith(b"body\n")


def test_the_cache_is_bounded_and_later_messages_are_read_from_disk(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(send, "BODY_CACHE", 100)
    q = Queue(root / "queue")
    small = q.enqueue("a@remote.test", ["user@mx.test"], b"x" * 60)
    big = q.enqueue("a@remote.test", ["user@mx.test"], b"y" * 60)
    m = Manager(root, Log(io.StringIO()))
    assert m.pickup() == 2
    assert m.msgs[small.queue_id].body is not None
    assert m.msgs[big.queue_id].body is None  # 120 > 100
    assert m.body_bytes == 60
    _drain(m)
    assert m.body_bytes == 0
    assert len(os.listdir(root.parent / "home" / "Maildir" / "new")) == 2


def test_a_deferred_message_gives_its_bytes_back(root: Path) -> None:
    """A home that does not exist (yet) defers; the message may wait for days."""
    (root / "users" / "mailboxes").write_text(f"user:{root.parent / 'not-yet'}\n")
    q = Queue(root / "queue")
    env = q.enqueue("a@remote.test", ["user@mx.test"], b"z" * 10)
    m = Manager(root, Log(io.StringIO()))
    m.pickup()
    assert m.body_bytes == 10
    deadline = time.monotonic() + 10
    while m.body_bytes and time.monotonic() < deadline:
        m.dispatch()
        time.sleep(0.01)
    assert m.body_bytes == 0
    msg = m.msgs[env.queue_id]
    assert msg.body is None
    assert msg.rcpts[0].status == "pending"
    assert "deferred" in str(m.log.stream.getvalue())
