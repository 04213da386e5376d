"""The benchmark's message count (bench.queue_count): segments counted from their trailer."""

from __future__ import annotations

from pathlib import Path

from bench.queue_count import count
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from tests.queue_util import commit, messages


def test_count_reads_segment_trailers(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    queue.create()
    queue.enqueue("a@b.test", ["c@d.test"], b"alone\r\n")
    held = []
    for n, body in enumerate([b"1\r\n", b"2\r\n", b"3\r\n"]):
        w = QueueWriter(queue, f"s{n}@a.test", [f"r{n}@b.test", "x@c.test"], defer=True)
        w.write(body)
        held.append(w)
    commit(held)
    assert count(queue, "new") == 4 == len(messages(queue, "new"))
    name = next(n for n in queue.ids("new") if len(queue.load("new", n)) == 3)
    path = queue.path("new", name)
    path.write_bytes(path.read_bytes()[:-1])  # torn: counted as one, never as garbage
    assert count(queue, "new") == 2
