"""pyqmail-send's scheduler: the retry heap under ALRM (``Scheduler.retry_all``)."""

from __future__ import annotations

import io
import time
from pathlib import Path

from pyqmail.queue.store import Queue
from pyqmail.send.delivery import Result
from pyqmail.send.manager import Log, Manager


def _defer_what_is_due(m: Manager) -> int:
    """What ``dispatch`` takes from the heap, deferred as a remote worker would (without
    the network): each outcome goes through ``_complete``, which pushes the next try."""
    with m.lock:
        m._collect_due(time.time())
        jobs = [job for jobs in m.ready_remote.values() for job in jobs]
        m.ready_remote.clear()
    for queue_id, batch in jobs:
        for index in batch:
            m._complete(queue_id, index, Result.temp("no answer (#4.4.1)", "4.4.1"))
    return sum(len(batch) for _, batch in jobs)


def test_alrm_keeps_one_heap_entry_a_deferred_recipient(send_root: Path) -> None:
    q = Queue(send_root / "queue")
    for n in range(10):
        rcpts = [f"r{n}-{i}@remote.test" for i in range(100)]
        q.enqueue("a@remote.test", rcpts, b"Subject: hi\r\n\r\nbody\r\n")
    m = Manager(send_root, Log(io.StringIO()))
    try:
        assert m.pickup() == 10
        assert _defer_what_is_due(m) == 1000  # every recipient deferred for hours
        for _ in range(50):  # pyqmail-queue flush, again and again
            m.retry_all()
            assert _defer_what_is_due(m) == 1000
            assert len(m.heap) <= 1000
    finally:
        m.children.close()
