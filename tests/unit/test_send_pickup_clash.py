"""pyqmail-send's pickup and files of new/ it must not take: a valid file carrying a name
or queue id already in use (any member of the queue's group can list new/ and write one),
and a file too large to read. Neither replaces nor crashes anything: it goes to bad/, and
bad/ never loses a file either."""

from __future__ import annotations

import io
import os
import resource
import time
from pathlib import Path

import pytest

from pyqmail.queue import store
from pyqmail.queue.format import (
    SEGMENT_MAGIC,
    encode_header,
    encode_segment_trailer,
    encode_trailer,
)
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.send.manager import Log, Manager
from tests.queue_util import commit


@pytest.fixture
def root(send_root: Path) -> Path:
    return send_root


def _writer(q: Queue, recipients: int = 1, *, defer: bool = False) -> QueueWriter:
    w = QueueWriter(q, "a@remote.test", ["user@mx.test"] * recipients, defer=defer)
    w.write(b"Subject: original\r\n\r\nbody\r\n")
    return w


def _impostor(queue_id: str) -> bytes:
    """A valid queue file of one message, one recipient, with the id ``queue_id``."""
    body = b"Subject: impostor\r\n\r\nbody\r\n"
    head = encode_header(queue_id, "evil@remote.test", ["user@mx.test"], time.time(), {})
    return head + body + encode_trailer(queue_id, len(body))


def _segment_of(segment_id: str, record: bytes) -> bytes:
    return SEGMENT_MAGIC + b"%020d\n" % len(record) + record + encode_segment_trailer(segment_id, 1)


def _drain(m: Manager, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (m.msgs or m.segments) and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.01)
    assert not m.msgs and not m.segments, "messages still queued"


def _bodies(root: Path) -> list[bytes]:
    new = root.parent / "home" / "Maildir" / "new"
    return sorted((new / name).read_bytes() for name in os.listdir(new))


def _bad(q: Queue) -> list[bytes]:
    return sorted(q.path("bad", name).read_bytes() for name in q.ids("bad"))


def test_an_impostor_of_a_picked_up_message_goes_to_bad(root: Path) -> None:
    """It carried the id of a message already in mess/ (two recipients, still pending):
    renamed over mess/<id> it replaced the acknowledged message, and with one recipient
    the heap entries of the original indexed out of range (IndexError, main loop)."""
    q = Queue(root / "queue")
    (env,) = commit([_writer(q, 2)])
    assert not isinstance(env, Exception)
    out = io.StringIO()
    m = Manager(root, Log(out))
    assert m.pickup() == 1
    q.path("new", env.queue_id).write_bytes(_impostor(env.queue_id))
    assert m.pickup() == 0
    assert b"Subject: original" in q.path("mess", env.queue_id).read_bytes()
    assert f"quarantined {env.queue_id} to bad/" in out.getvalue()
    assert f"mess/{env.queue_id} exists" in out.getvalue()
    _drain(m)
    assert all(b"Subject: original" in b for b in _bodies(root)) and len(_bodies(root)) == 2
    assert len(_bad(q)) == 1 and b"Subject: impostor" in _bad(q)[0]


def _segment(q: Queue) -> tuple[str, list[str]]:
    """Commit two messages into one segment: its name and its messages' ids."""
    before = set(q.ids("new"))
    envs = commit([_writer(q, defer=True), _writer(q, defer=True)])
    (name,) = set(q.ids("new")) - before
    return name, [e.queue_id for e in envs if not isinstance(e, Exception)]


@pytest.mark.parametrize("which", ["segment", "message"])
def test_an_impostor_named_after_a_segment_or_its_message_goes_to_bad(
    root: Path, which: str
) -> None:
    """Named after a segment it replaced every message of it; named after one of its
    messages it replaced that message in memory, and the segment never ended."""
    q = Queue(root / "queue")
    name, ids = _segment(q)
    out = io.StringIO()
    m = Manager(root, Log(out))
    assert m.pickup() == 2
    target = name if which == "segment" else ids[0]
    q.path("new", target).write_bytes(_impostor(target))
    assert m.pickup() == 0
    assert f"{target}, a queue id already in use" in out.getvalue() or "exists" in out.getvalue()
    _drain(m)
    assert len(_bodies(root)) == 2 and all(b"Subject: original" in b for b in _bodies(root))
    assert len(_bad(q)) == 1 and b"Subject: impostor" in _bad(q)[0]
    assert q.ids("mess") == [] and q.ids("state") == []


def test_a_segment_holding_an_id_in_use_goes_to_bad(root: Path) -> None:
    """A segment (any name) whose record carries the id of a message of another segment
    in mess/: its message would have replaced that one in memory."""
    q = Queue(root / "queue")
    _, ids = _segment(q)
    out = io.StringIO()
    m = Manager(root, Log(out))
    assert m.pickup() == 2
    q.path("new", "18ee4a00000000a0.9.1").write_bytes(
        _segment_of("18ee4a00000000a0.9.1", _impostor(ids[1]))
    )
    assert m.pickup() == 0
    assert f"holds {ids[1]}, a queue id already in use" in out.getvalue()
    _drain(m)
    assert len(_bodies(root)) == 2 and all(b"Subject: original" in b for b in _bodies(root))


def test_two_files_of_one_pickup_with_one_id_the_second_goes_to_bad(root: Path) -> None:
    """Both still in new/: the impostor (sorted later) does not replace the first."""
    q = Queue(root / "queue")
    (env,) = commit([_writer(q)])
    assert not isinstance(env, Exception)
    later = "ffffffffffffffff.1.1"
    q.path("new", later).write_bytes(_segment_of(later, _impostor(env.queue_id)))
    out = io.StringIO()
    m = Manager(root, Log(out))
    assert m.pickup() == 1
    assert f"quarantined {later} to bad/" in out.getvalue()
    _drain(m)
    assert len(_bodies(root)) == 1 and b"Subject: original" in _bodies(root)[0]


def test_quarantine_never_replaces_a_file_in_bad(root: Path) -> None:
    q = Queue(root / "queue")
    q.path("bad", "x").write_bytes(b"first")
    q.path("new", "x").write_bytes(b"second")
    assert q.quarantine("new", "x") == q.path("bad", "x.1")
    q.path("new", "x").write_bytes(b"third")
    assert q.quarantine("new", "x") == q.path("bad", "x.2")
    assert _bad(q) == [b"first", b"second", b"third"] and q.ids("new") == []


def test_a_huge_file_in_new_goes_to_bad_unread(root: Path) -> None:
    """A sparse file past ``MAX_QUEUE_FILE`` (no disk used): read whole, it made
    pyqmail-send die of MemoryError at every start. The address space is bounded here
    so that reading it fails at once rather than take the machine's memory."""
    q = Queue(root / "queue")
    (env,) = commit([_writer(q)])
    assert not isinstance(env, Exception)
    huge = q.path("new", "18ee4a00000000a0.9.2")
    with huge.open("wb") as f:
        f.truncate(2 * 1024 * 1024 * 1024 + 1)
    out = io.StringIO()
    m = Manager(root, Log(out))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    vm = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1])
    resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + 1024 * 1024 * 1024, hard))
    try:
        assert m.pickup() == 1
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert "is larger than 2147483648 bytes" in out.getvalue()
    assert q.ids("bad") == [huge.name] and q.ids("new") == []
    _drain(m)
    assert len(_bodies(root)) == 1


def test_a_file_that_grows_while_read_is_read_only_to_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store, "MAX_QUEUE_FILE", 50)
    monkeypatch.setattr(store, "PIECE", 7)
    assert store._read_bounded(io.BytesIO(b"x" * 40), 10) == b"x" * 40
    assert store._read_bounded(io.BytesIO(b"x" * 51), 10) is None
    assert store._read_bounded(io.BytesIO(b"x" * 50), 60) is None  # its size says so
