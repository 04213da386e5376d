"""Group commit (pyqmail.queue.commit, the path pyqmail-smtpd commits by), held writers
and the cached trigger FIFO."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from pathlib import Path

import pytest

from pyqmail.queue import store
from pyqmail.queue.format import Envelope, QueueError, QueueUnreadableError, parse_message
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from tests.queue_util import commit, messages


def _writers(queue: Queue, sizes: list[int]) -> list[QueueWriter]:
    """Every other writer held in memory, the others streaming into tmp/."""
    out = []
    for n, size in enumerate(sizes):
        w = QueueWriter(queue, f"s{n}@a.test", [f"r{n}@b.test"], defer=n % 2 == 1)
        w.write(b"x" * size + b"\r\n")
        out.append(w)
    return out


def test_batch_commits_every_message_durably_named(queue: Queue) -> None:
    """Streaming writers keep their own files; the held ones share one segment."""
    sizes = [0, 10, 4096, 70_000, 3, 7]
    writers = _writers(queue, sizes)
    assert [w.held for w in writers] == [False, True, False, True, False, True]
    results = commit(writers)
    assert all(isinstance(r, Envelope) for r in results)
    assert [r.queue_id for r in results if isinstance(r, Envelope)] == [w.queue_id for w in writers]
    assert os.listdir(queue.path("tmp")) == []
    names = queue.ids("new")
    streamed = {w.queue_id for w in writers if not w.held}
    assert streamed < set(names) and len(names) == len(streamed) + 1
    (segment,) = set(names) - streamed
    stored = queue.load("new", segment)
    assert [s.env.queue_id for s in stored] == [w.queue_id for w in writers if w.held]
    assert all(s.span is not None for s in stored)
    found = {s.env.queue_id: s for _, s in messages(queue, "new")}
    for n, (w, size) in enumerate(zip(writers, sizes, strict=True)):
        s = found[w.queue_id]
        assert s.env.sender == f"s{n}@a.test"
        assert s.body == b"x" * size + b"\r\n"
        assert s.env.size == size + 2
        assert queue.read_stored("new", segment if w.held else w.queue_id, s.span) == s
    with pytest.raises(QueueError, match="is a segment of 3 messages"):
        queue.read_stored("new", segment, None)


def test_a_lone_held_message_gets_a_file_of_its_own(queue: Queue) -> None:
    """Committed alone (``QueueWriter.commit``, as ``enqueue`` does), a held message is the
    plain format, named by its id. pyqmail-smtpd's group commit puts even a lone held
    message into a segment (of one record), named by the segment's id."""
    w = QueueWriter(queue, "a@b.test", ["c@d.test"], defer=True)
    w.write(b"x" * 6 + b"\r\n")
    result = w.commit()
    assert isinstance(result, Envelope)
    assert queue.ids("new") == [w.queue_id]
    assert queue.read_stored("new", w.queue_id, None).body == b"x" * 6 + b"\r\n"
    grouped = QueueWriter(queue, "a@b.test", ["c@d.test"], defer=True)
    grouped.write(b"y\r\n")
    (env,) = commit([grouped])
    assert isinstance(env, Envelope) and env.queue_id == grouped.queue_id
    (segment,) = set(queue.ids("new")) - {w.queue_id}
    assert [s.env.queue_id for s in queue.load("new", segment)] == [grouped.queue_id]


def test_held_writer_touches_no_disk_until_commit(queue: Queue) -> None:
    held = QueueWriter(queue, "a@b.test", ["c@d.test"], defer=True)
    held.write(b"hello\r\n")
    assert os.listdir(queue.path("tmp")) == []
    held.abort()
    assert os.listdir(queue.path("tmp")) == []
    spilled = QueueWriter(queue, "a@b.test", ["c@d.test"], defer=True)
    spilled.write(b"hello\r\n")
    spilled.spill()
    assert os.listdir(queue.path("tmp")) == [spilled.queue_id]
    env = spilled.commit()
    assert parse_message((queue.root / "new" / env.queue_id).read_bytes())[1] == b"hello\r\n"


def test_failure_of_one_message_fails_only_that_one(queue: Queue) -> None:
    good = QueueWriter(queue, "a@b.test", ["c@d.test"], None)
    bad = QueueWriter(queue, "a@b.test", ["c@d.test"], None)
    os.unlink(bad._tmp)  # its file is gone (an admin's clean-up): the rename fails, ENOENT
    results = commit([good, bad])
    assert isinstance(results[0], Envelope)
    assert isinstance(results[1], QueueError)
    assert f"cannot commit {bad.queue_id}" in str(results[1])
    assert queue.ids("new") == [good.queue_id]
    assert os.listdir(queue.path("tmp")) == []


def test_poke_keeps_the_fifo_open_and_survives_no_reader(queue: Queue) -> None:
    """A poke that finds no reader is skipped, and the next one, once pyqmail-send has
    opened the FIFO, reaches it: pokes used to be skipped for a second after an ENXIO,
    and a pyqmail-send that started within that second and had already scanned new/
    missed them (the message waited for some later poke or an ALRM)."""
    queue.poke()  # nobody listens: skipped silently
    fifo = str(queue.root / "lock" / "trigger")
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        queue.poke()
        queue.poke()
        assert os.read(rfd, 100) == b"!!"
    finally:
        os.close(rfd)
    queue.poke()  # the reader went away: EPIPE closes our end, no exception
    assert queue._poke_fd is None
    queue.close()


def test_a_queue_nobody_holds_closes_its_descriptors(tmp_path: Path) -> None:
    """A HUP that moves pyqmail-smtpd to another queue directory drops the old Queue:
    its new/ and FIFO descriptors must go with it, not stay open for the worker's life."""
    queue = Queue(tmp_path / "moved")
    queue.create()
    fifo = str(queue.root / "lock" / "trigger")
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        queue.poke()
        held = [queue.new_dir_fd(), queue._poke_fd]
        assert all(fd is not None and os.fstat(fd) for fd in held)
        del queue
        for fd in held:
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)  # type: ignore[arg-type]
    finally:
        os.close(rfd)


@pytest.mark.parametrize(
    ("vouched", "process_umask", "fchmods"),
    [
        (None, 0o077, 1),  # cron runs sendmail with umask 077: fixed by fchmod
        (None, 0o022, 1),  # unknown umask: always fixed
        (0o027, 0o027, 0),  # pyqmail-smtpd sets its own umask: open()'s mode survives
    ],
)
def test_queue_file_mode_whatever_the_umask(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    vouched: int | None,
    process_umask: int,
    fchmods: int,
) -> None:
    """The mode ``file_policy`` gives (here the queue's owner writes: 0600; the other writers
    are in test_queue_perms.py) survives any umask, with no fchmod when one is vouched for."""
    q = Queue(tmp_path / "queue", umask=vouched)
    q.create()
    calls: list[int] = []
    real_fchmod = os.fchmod
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: calls.append(mode) or real_fchmod(fd, mode))
    old = os.umask(process_umask)
    try:
        env = q.enqueue("root@h.test", ["postmaster@h.test"], b"Subject: x\r\n\r\nbody\r\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(q.path("new", env.queue_id)).st_mode) == 0o600
    assert len(calls) == fchmods


@pytest.mark.parametrize("sizes", [[10, 20], [10, 20, 30, 40]], ids=["files", "segment"])
def test_failed_directory_fsync_takes_the_message_back_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: list[int]
) -> None:
    """A 451 must not leave the message in new/ too (the client's retry would duplicate it)."""
    q = Queue(tmp_path / "queue")
    q.create()
    writers = _writers(q, sizes)

    def broken(ticket: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(q, "sync_new", broken)
    results = commit(writers)
    assert all(isinstance(r, QueueError) for r in results)
    assert "Input/output error" in str(results[0])
    assert os.listdir(q.path("new")) == []
    assert os.listdir(q.path("tmp")) == []


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_name_in_new_that_is_no_regular_file_is_refused_not_opened(
    queue: Queue, tmp_path: Path, kind: str
) -> None:
    """Every member of the queue's group may put a name into new/: a FIFO there must not
    block the reader's open forever (all delivery would stop), a symlink must not make it
    read another file. Both are refused as files that fail verification (the manager sets
    them aside in bad/), not as files that cannot be read now (it would read them again)."""
    path = queue.path("new", "18ee4a00000000a0.1.x")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        (tmp_path / "elsewhere").write_bytes(b"not a queue file")
        path.symlink_to(tmp_path / "elsewhere")
    for read in (
        lambda: queue.load("new", path.name),
        lambda: queue.read_stored("new", path.name, (0, 10)),
    ):
        with pytest.raises(QueueError, match=r"is not a regular file") as refused:
            read()
        assert not isinstance(refused.value, QueueUnreadableError)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.EMFILE])
def test_a_file_that_cannot_be_read_now_is_told_from_a_bad_one(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """EACCES (a wrong chown), EIO or EMFILE say nothing about the file: the reader gets a
    QueueUnreadableError with the errno (and leaves the file where it is), not the
    QueueError of a file that fails verification (which goes to bad/)."""
    w = QueueWriter(queue, "a@example.test", ["b@example.test"])
    w.write(b"Subject: s\r\n\r\nbody\r\n")
    env = w.commit()
    real_open = os.open

    def failing_open(path: str, *args: int, **kwargs: int) -> int:
        if str(path).endswith(env.queue_id):
            raise OSError(code, os.strerror(code))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    _refused_as_unreadable(queue, env.queue_id, code)


def _refused_as_unreadable(queue: Queue, name: str, code: int) -> None:
    for read in (
        lambda: queue.load("new", name),
        lambda: queue.read_stored("new", name, (0, 10)),
    ):
        with pytest.raises(QueueUnreadableError, match=os.strerror(code)) as failed:
            read()
        assert failed.value.errno == code


def test_an_error_reading_an_open_queue_file_is_no_verdict_either(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO comes from a read of the disk more often than from the open: the same
    QueueUnreadableError, for the whole file and for a message read again at its span."""
    w = QueueWriter(queue, "a@example.test", ["b@example.test"])
    w.write(b"Subject: s\r\n\r\nbody\r\n")
    env = w.commit()
    real_pread = os.pread

    class FailingFile(io.FileIO):
        def read(self, size: int = -1) -> bytes:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def failing_pread(fd: int, *args: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(env.queue_id):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pread(fd, *args)

    monkeypatch.setattr(store, "open", lambda fd, mode: FailingFile(fd, "r"), raising=False)
    monkeypatch.setattr(os, "pread", failing_pread)
    _refused_as_unreadable(queue, env.queue_id, errno.EIO)


def test_a_single_message_file_under_another_name_is_refused(queue: Queue) -> None:
    """A file of one message is named after its queue id: its state file and its end (the
    unlink of mess/<id>) go by that id, so a copy or a renamed file would be delivered
    again at every start. It is refused, naming the id to rename it to."""
    w = QueueWriter(queue, "a@example.test", ["b@example.test"])
    w.write(b"Subject: s\r\n\r\nbody\r\n")
    env = w.commit()
    os.rename(queue.path("new", env.queue_id), queue.path("new", "18ee4a00000000a0.7.copy"))
    named = f"holds {re.escape(env.queue_id)}: a queue file is named by its id"
    with pytest.raises(QueueError, match=named):
        queue.load("new", "18ee4a00000000a0.7.copy")


def test_a_segment_under_another_name_is_refused(queue: Queue) -> None:
    """A segment's trailer records its id: a copy under another name would schedule its
    messages a second time under the same queue ids (and its end lines go by the id)."""
    writers = [QueueWriter(queue, "a@example.test", ["b@example.test"], defer=True)]
    writers[0].write(b"Subject: s\r\n\r\nbody\r\n")
    commit(writers)
    (segment,) = queue.ids("new")
    assert len(queue.load("new", segment)) == 1
    os.link(queue.path("new", segment), queue.path("new", "18ee4a00000000a0.7.copy"))
    named = f"holds {re.escape(segment)}: a queue file is named by its id"
    with pytest.raises(QueueError, match=named):
        queue.load("new", "18ee4a00000000a0.7.copy")
