"""pyqmail-send and segment files: ending messages, and what happens when that fails."""

from __future__ import annotations

import errno
import io
import os
import time
from pathlib import Path

import pytest

from pyqmail.queue.format import QueueError
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.send import finisher
from pyqmail.send.manager import Log, Manager
from tests.queue_util import commit


@pytest.fixture
def root(send_root: Path) -> Path:
    return send_root


def _message(q: Queue, sender: str, recipient: str, *, defer: bool = True) -> QueueWriter:
    """One message; ``defer`` (held in memory) makes ``commit`` put it in a segment."""
    w = QueueWriter(q, sender, [recipient], defer=defer)
    w.write(b"Subject: s\r\n\r\nbody\r\n")
    return w


def _drain(m: Manager, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (m.msgs or m.segments) and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.01)
    assert not m.msgs and not m.segments, "messages still queued"


def test_a_failed_end_record_is_retried_and_the_segment_still_goes(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = Queue(root / "queue")
    writers = []
    for n in range(3):
        w = QueueWriter(q, "a@remote.test", ["user@mx.test"], defer=True)
        w.write(f"Subject: {n}\r\n\r\nbody\r\n".encode())
        writers.append(w)
    commit(writers)
    real_append_end = finisher.append_end
    failures = [1]

    def flaky(path: str, queue_id: str) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_append_end(path, queue_id)

    monkeypatch.setattr(finisher, "append_end", flaky)  # the finisher records ends
    out = io.StringIO()
    m = Manager(root, Log(out))
    assert m.pickup() == 3
    _drain(m)
    log = out.getvalue()
    assert "warning cannot record the end of" in log and "Input/output error" in log
    assert log.count("end msg ") == 3 and "end segment " in log
    assert q.ids("mess") == [] and q.ids("state") == []
    assert len(os.listdir(root.parent / "home" / "Maildir" / "new")) == 3


def test_a_bounce_that_cannot_be_queued_waits_before_it_is_tried_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue is full when a bounce is due: the message is tried again after
    ``FINISH_RETRY``, not at every pass of the main loop (which then spun at full speed,
    a warning per pass); meanwhile the loop may sleep, and then the bounce goes."""
    q = Queue(root / "queue")
    commit([_message(q, "a@remote.test", "nobody-here@mx.test")])
    real_enqueue = Queue.enqueue
    full = [True]

    def enqueue(self: Queue, *args: object, **kwargs: object) -> object:
        if full[0]:
            raise QueueError("cannot create a file in tmp/: No space left on device")
        return real_enqueue(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Queue, "enqueue", enqueue)
    out = io.StringIO()
    m = Manager(root, Log(out))
    assert m.pickup() == 1
    deadline = time.monotonic() + 10
    while not m.finish_later and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.01)
    for _ in range(50):  # passes of the main loop: none of them tries the bounce again
        m.finish()
    assert out.getvalue().count("warning cannot queue bounce") == 1
    assert finisher.FINISH_RETRY - 1 < m._sleep_time() <= finisher.FINISH_RETRY
    full[0] = False
    m.finish_later = dict.fromkeys(m.finish_later, 0.0)  # the wait is over
    _drain(m)
    assert out.getvalue().count("warning cannot queue bounce") == 1
    assert " bounce qp " in out.getvalue()


def test_a_bounce_whose_record_fails_is_queued_once(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DSN is queued, then its ``bounced`` record cannot be written (EIO, a full
    disk): the retry after ``FINISH_RETRY`` only writes the record, where it queued one
    more DSN each time."""
    q = Queue(root / "queue")
    commit([_message(q, "a@remote.test", "nobody-here@mx.test")])
    real_append_state = finisher.append_state
    failures = [2]

    def flaky(path: Path, record: object, durable: bool = True) -> None:
        if isinstance(record, finisher.Bounced) and failures[0]:
            failures[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append_state(path, record, durable)  # type: ignore[arg-type]

    monkeypatch.setattr(finisher, "append_state", flaky)
    out = io.StringIO()
    m = Manager(root, Log(out))
    assert m.pickup() == 1
    deadline = time.monotonic() + 10
    while m.msgs and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        m.finish_later = dict.fromkeys(m.finish_later, 0.0)  # no waiting for the retry
        time.sleep(0.01)
    assert not m.msgs and failures == [0]
    log = out.getvalue()
    assert log.count("warning cannot record bounce of") == 2
    assert log.count(" bounce qp ") == 1 and len(q.ids("new")) == 1  # one DSN, not three
