"""Segment files: several messages committed together in one file (pyqmail.queue.writer), through
pyqmail-smtpd's group commit (pyqmail.queue.commit)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from pyqmail.queue import writeall
from pyqmail.queue import writer as queuemod
from pyqmail.queue.format import (
    Envelope,
    QueueError,
    encode_segment_trailer,
    parse_file,
    parse_segment,
)
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter, SegmentWriter
from tests.queue_util import commit, messages


def _held(queue: Queue, bodies: list[bytes]) -> list[QueueWriter]:
    out = []
    for n, body in enumerate(bodies):
        w = QueueWriter(queue, f"s{n}@a.test", [f"r{n}@b.test", "x@c.test"], defer=True)
        w.write(body)
        out.append(w)
    return out


def _segment(queue: Queue, bodies: list[bytes]) -> tuple[str, bytes, list[QueueWriter]]:
    writers = _held(queue, bodies)
    results = commit(writers)
    assert all(isinstance(r, Envelope) for r in results)
    (name,) = queue.ids("new")
    return name, (queue.root / "new" / name).read_bytes(), writers


def test_segment_round_trip(queue: Queue) -> None:
    bodies = [b"", b"one\r\n", b"END 1 2\r\n" * 50, bytes(range(256)) + b"\r\n"]
    name, data, writers = _segment(queue, bodies)
    assert data.startswith(b"PYQMAIL-SEGMENT 1\n")
    assert data.endswith(encode_segment_trailer(name, 4))
    stored = parse_file(data, "seg")
    assert [s.body for s in stored] == bodies
    assert [s.env.queue_id for s in stored] == [w.queue_id for w in writers]
    assert [s.env.recipients for s in stored] == [(f"r{n}@b.test", "x@c.test") for n in range(4)]
    for s in stored:  # each span is exactly one complete message file
        assert s.span is not None
        offset, length = s.span
        assert parse_file(data[offset : offset + length])[0].body == s.body


def test_messages_in_a_segment_hold_no_body_while_they_wait(queue: Queue) -> None:
    """Once written into the segment, a message waiting for its batch's commit keeps only
    its envelope in memory; the file has every byte."""
    bodies = [b"a" * 4000 + b"\r\n", b"b" * 100 + b"\r\n"]
    writers = _held(queue, bodies)
    for w in writers:
        w.finish()
    seg = SegmentWriter(queue)
    seg.add(writers)
    assert [sum(map(len, w.record())) for w in writers] == [0, 0]
    seg.seal()
    seg.sync_publish()
    queue.sync_new(queue.new_ticket())
    envs = seg.envelopes()
    assert [e.size for e in envs] == [len(b) for b in bodies]
    assert [e.queue_id for e in envs] == [w.queue_id for w in writers]
    stored = parse_file((queue.root / "new" / seg.segment_id).read_bytes(), "seg")
    assert [x.body for x in stored] == bodies


def test_every_truncation_of_a_segment_is_detected(queue: Queue) -> None:
    _, data, _ = _segment(queue, [b"a\r\n", b"bb\r\n", b"ccc\r\n"])
    for cut in range(len(data)):
        with pytest.raises(QueueError):
            parse_file(data[:cut], "torn")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d[:-2] + b"4\n", "wrong count"),  # the count says 4 records, there are 3
        (lambda d: d + b"x", "wrong count"),  # bytes after the trailer
        (lambda d: d.replace(b"\nEND ", b"\nEXD ", 1), "END marker"),  # a record's trailer
        (lambda d: d.replace(b"\n0000", b"\n0001", 1), "record 1"),  # a length line
        (lambda d: d.replace(b"SEGMENT 1", b"SEGMENT 2", 1), "bad magic"),
    ],
)
def test_corrupt_segments_are_refused(queue: Queue, change: object, message: str) -> None:
    _, data, _ = _segment(queue, [b"a\r\n", b"bb\r\n", b"ccc\r\n"])
    assert callable(change)
    with pytest.raises(QueueError, match=message):
        parse_file(change(data), "bad")


def test_segments_of_one_record_are_read_but_not_of_none(queue: Queue) -> None:
    """pyqmail-smtpd writes a segment of one when a loop pass finished one message."""
    _, data, _ = _segment(queue, [b"a\r\n", b"bb\r\n"])
    stored = parse_segment(data)
    first = stored[0].span
    assert first is not None
    one = data[: first[0] + first[1]] + encode_segment_trailer("x", 1)
    assert [s.body for s in parse_segment(one)] == [b"a\r\n"]
    with pytest.raises(QueueError, match="wrong count"):
        parse_segment(b"PYQMAIL-SEGMENT 1\n" + encode_segment_trailer("x", 0))


def test_short_writes_and_iov_max_pieces_still_write_everything(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writev = os.writev
    calls = []

    def dribble(fd: int, bufs: list[bytes]) -> int:
        calls.append(len(bufs))
        assert len(bufs) <= 3
        return real_writev(fd, [bytes(memoryview(bufs[0])[:7])])

    monkeypatch.setattr(writeall, "IOV_MAX", 3)
    monkeypatch.setattr(os, "writev", dribble)
    bodies = [b"x" * 100 + b"\r\n", b"y\r\n", b"z" * 30 + b"\r\n"]
    _, data, _ = _segment(queue, bodies)
    assert [s.body for s in parse_file(data)] == bodies
    assert len(calls) > len(data) // 7


def test_a_failed_segment_fails_its_messages_and_leaves_nothing(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while writing the segment: 451 for each of its messages; a streamed
    message of the same batch (a file of its own) is still committed."""
    streamed = QueueWriter(queue, "a@b.test", ["c@d.test"])
    streamed.write(b"big\r\n")
    held = _held(queue, [b"1\r\n", b"2\r\n", b"3\r\n"])

    def full(fd: int, bufs: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    results = commit([held[0], streamed, held[1], held[2]])
    assert isinstance(results[1], Envelope)
    for r in (results[0], results[2], results[3]):
        assert isinstance(r, QueueError) and "No space left on device" in str(r)
    assert queue.ids("new") == [streamed.queue_id]
    assert os.listdir(queue.path("tmp")) == []


@pytest.mark.parametrize(("vouched", "process_umask"), [(None, 0o077), (0o027, 0o027)])
def test_segment_mode_whatever_the_umask(
    tmp_path: Path, vouched: int | None, process_umask: int
) -> None:
    q = Queue(tmp_path / "queue", umask=vouched)
    q.create()
    old = os.umask(process_umask)
    try:
        name, _, _ = _segment(q, [b"a\r\n", b"b\r\n"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(q.path("new", name)).st_mode) == 0o600  # the owner's


def test_messages_lists_files_and_segments_in_order(queue: Queue) -> None:
    first = queue.enqueue("a@b.test", ["c@d.test"], b"alone\r\n")
    commit(_held(queue, [b"1\r\n", b"2\r\n"]))
    got = messages(queue, "new")
    assert [s.body for _, s in got] == [b"alone\r\n", b"1\r\n", b"2\r\n"]
    assert got[0][0] == first.queue_id and got[1][0] == got[2][0] != first.queue_id


def test_a_refused_link_of_an_unnamed_file_falls_back_to_named_files(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If /proc/self/fd cannot be linked from (odd /proc, a security module), that one
    batch gets its 451 and every later one uses a named tmp file."""
    monkeypatch.setitem(queuemod._TMPFILE, queue.dir_tmp, True)
    real_link = os.link

    def refuse(src: str, *args: object, **kwargs: object) -> None:
        if src.startswith("/proc/self/fd/"):
            raise OSError(errno.EACCES, "Permission denied")
        real_link(src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", refuse)
    results = commit(_held(queue, [b"1\r\n", b"2\r\n"]))
    assert all(isinstance(r, QueueError) and "Permission denied" in str(r) for r in results)
    assert queue.ids("new") == [] and os.listdir(queue.path("tmp")) == []
    assert queuemod._TMPFILE[queue.dir_tmp] is False
    results = commit(_held(queue, [b"3\r\n", b"4\r\n"]))
    assert all(isinstance(r, Envelope) for r in results)
    assert [s.body for _, s in messages(queue, "new")] == [b"3\r\n", b"4\r\n"]


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named tmp file"])
def test_a_close_that_fails_after_the_fsync_leaves_nothing_in_new(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    """The segment's fd fails to close (EIO: an NFS server) after its fsync, and, for an
    unnamed file, after its link into new/: its messages get 451, so the segment must not
    stay in new/ (it would be delivered, then sent again)."""
    monkeypatch.setitem(queuemod._TMPFILE, queue.dir_tmp, tmpfile)
    held = _held(queue, [b"1\r\n", b"2\r\n"])
    for w in held:
        w.finish()
    segment = SegmentWriter(queue)
    segment.add(held)
    segment.seal()
    linked: list[bool] = []
    real_close = os.close
    mine = segment._fd  # os.close is the process's: another test's garbage may close too

    def close(fd: int) -> None:
        real_close(fd)
        if fd == mine:
            linked.append(bool(queue.ids("new")))
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "close", close)
    with pytest.raises(QueueError, match="Input/output error"):
        segment.sync_publish()
    monkeypatch.setattr(os, "close", real_close)
    assert linked == [tmpfile]  # an unnamed file was in new/ when its close failed
    assert queue.ids("new") == [] and os.listdir(queue.path("tmp")) == []
