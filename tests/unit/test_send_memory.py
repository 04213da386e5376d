"""pyqmail-send's start-up and pickup hold a bounded number of message bytes, whatever the
size of the queue: a backlog of days (a remote site down, pyqmail-send stopped while
pyqmail-smtpd accepted) must not make the restart run out of memory, again and again."""

from __future__ import annotations

import io
import os
import tracemalloc
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from pyqmail.dkim.keys import Key
from pyqmail.queue.format import Envelope, Stored
from pyqmail.queue.state import Attempt, append_state
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.send import loader
from pyqmail.send.manager import Log, Manager
from tests.queue_util import commit

BOUND = 512 * 1024  # PICKUP_BATCH and BODY_CACHE in these tests
SIZE = 128 * 1024  # one message's body
COUNT = 40  # messages in mess/, and as many in new/


@pytest.fixture
def root(send_root: Path) -> Path:
    return send_root


def _segment(q: Queue) -> list[str]:
    """Three small messages committed together (one segment file in new/): their ids."""
    writers = [QueueWriter(q, "a@remote.test", ["user@mx.test"], defer=True) for _ in range(3)]
    for w in writers:
        w.write(b"Subject: s\r\n\r\nsegment\r\n")
    envs = commit(writers)
    assert all(isinstance(env, Envelope) for env in envs), envs
    return [env.queue_id for env in envs if isinstance(env, Envelope)]


def _queued(q: Queue, fill: bytes) -> list[str]:
    """``COUNT`` messages of ``SIZE`` bytes committed to new/: their ids."""
    envs = [q.enqueue("a@remote.test", ["user@mx.test"], fill * SIZE) for _ in range(COUNT)]
    return [env.queue_id for env in envs]


def _backlog(q: Queue) -> list[str]:
    """``COUNT`` messages and a segment in mess/ (one with a deferred record), as many
    and a segment in new/, and an orphan state file: the queue ids queued."""
    ids = _queued(q, b"m") + _segment(q)
    for name in q.ids("new"):
        os.rename(q.path("new", name), q.path("mess", name))
    append_state(q.path("state", ids[0]), Attempt("deferred", 0, 1.0, "4.2.2 full"))
    ids += _queued(q, b"n") + _segment(q)
    q.path("state", "1.2.3").write_bytes(b"")  # its message gone: removed at start
    return ids


def test_startup_and_pickup_of_a_backlog_hold_a_bounded_number_of_bytes(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "PICKUP_BATCH", BOUND)
    monkeypatch.setattr(loader, "BODY_CACHE", BOUND)
    q = Queue(root / "queue")
    ids = _backlog(q)
    total = 2 * COUNT * SIZE
    m = Manager(root, Log(io.StringIO()))
    tracemalloc.start()
    try:
        m.startup()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < total / 3, f"peak {peak} bytes for {total} bytes queued"
    # every message scheduled, exactly once, and nothing lost on the way
    assert sorted(m.msgs) == sorted(ids)
    assert Counter(queue_id for _, _, queue_id, _ in m.heap) == Counter(ids)
    assert q.ids("new") == []
    assert len(q.ids("mess")) == 2 * COUNT + 2
    assert len(m.segments) == 2  # one file each of three messages
    assert not q.path("state", "1.2.3").exists()
    assert q.path("state", ids[0]).exists()
    assert m.body_bytes <= BOUND
    assert not m.unread and not m.new_held


def test_pickup_takes_new_in_batches_and_a_large_file_alone(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch is signed (its signatures durable), moved and synced before the next
    one is read; a file larger than the bound still goes, in a batch of its own."""
    monkeypatch.setattr(loader, "PICKUP_BATCH", 100)
    batches: list[list[str]] = []
    real = loader.sign_batch

    def spy(
        loaded: Sequence[tuple[str, Sequence[Stored]]],
        keys: Mapping[str, Sequence[Key]],
        state_dir: Path,
        log: Callable[[str], None],
    ) -> tuple[dict[str, dict[str, bytes]], dict[str, str]]:
        batches.append([name for name, _ in loaded])
        assert all(os.path.exists(q.path("new", name)) for name, _ in loaded)
        return real(loaded, keys, state_dir, log)

    monkeypatch.setattr(loader, "sign_batch", spy)
    q = Queue(root / "queue")
    bodies = [b"a" * 40, b"b" * 40, b"c" * 300, b"d" * 40]
    ids = [q.enqueue("a@remote.test", ["user@mx.test"], body).queue_id for body in bodies]
    names = q.ids("new")
    m = Manager(root, Log(io.StringIO()))
    assert m.pickup() == 4
    assert batches == [names[:2], names[2:3], names[3:]]
    assert sorted(m.msgs) == sorted(ids)
    assert Counter(queue_id for _, _, queue_id, _ in m.heap) == Counter(ids)
    assert q.ids("new") == [] and len(q.ids("mess")) == 4
