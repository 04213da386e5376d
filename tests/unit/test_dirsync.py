"""DirSync: the group fsync of a directory (a Maildir's new/, the queue's new/) among the
threads that link into it, and what a failed one means for each of them."""

from __future__ import annotations

import errno
import gc
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyqmail.queue import store
from pyqmail.queue.dirsync import DirSync
from pyqmail.queue.format import QueueError
from pyqmail.queue.store import Queue
from pyqmail.send import local
from pyqmail.send.local import maildir_deliver


def test_every_sync_waits_for_an_fsync_that_started_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The covering rule, checked on every call: the fsync a caller returns after began
    after the caller asked (its link happened before), and it had completed."""
    d = DirSync(str(tmp_path))
    log: list[tuple[str, int, float]] = []  # (what, thread, time)
    lock = threading.Lock()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        with lock:
            log.append(("start", threading.get_ident(), time.monotonic()))
        time.sleep(0.01)
        real_fsync(fd)
        with lock:
            log.append(("end", threading.get_ident(), time.monotonic()))

    monkeypatch.setattr(local.os, "fsync", slow_fsync)
    asked: dict[int, list[tuple[float, float]]] = {}

    def worker() -> None:
        for _ in range(5):
            t0 = time.monotonic()
            d.sync(d.ticket())
            asked.setdefault(threading.get_ident(), []).append((t0, time.monotonic()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fsyncs = []
    starts = [x for x in log if x[0] == "start"]
    ends = [x for x in log if x[0] == "end"]
    for (_, tid, s), (_, tid2, e) in zip(starts, ends, strict=True):
        assert tid == tid2, "two fsyncs overlapped"
        fsyncs.append((s, e))
    for calls in asked.values():
        for t0, t1 in calls:
            assert any(t0 <= s and e <= t1 for s, e in fsyncs), (t0, t1)
    assert d.fsyncs == len(fsyncs)
    assert len(fsyncs) < 40, "40 calls from 8 threads must share fsyncs"


def _waiters(d: DirSync, count: int) -> None:
    """Until ``count`` threads wait in ``d`` (CPython's Condition keeps its waiters)."""
    deadline = time.monotonic() + 10
    while len(d.cond._waiters) < count:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the threads never waited"
        time.sleep(0.005)


def _fails_second(first_done: threading.Event) -> Callable[[], None]:
    """An fsync whose first call blocks until ``first_done`` and succeeds, whose second
    call fails with EIO, and whose later calls succeed: what Linux does once a failed
    fsync has reported its error (the lost changes are not written again)."""
    calls = [0]

    def fsync() -> None:
        calls[0] += 1
        if calls[0] == 1:
            assert first_done.wait(10)
        elif calls[0] == 2:
            raise OSError(errno.EIO, "Input/output error")

    return fsync


def _fails_once(matches: Callable[[int], bool]) -> Callable[[int], None]:
    """An ``os.fsync`` that fails with EIO the first time it is given a descriptor that
    ``matches``, and is the real one otherwise."""
    real_fsync = os.fsync
    failed = [False]

    def fsync(fd: int) -> None:
        if not failed[0] and matches(fd):
            failed[0] = True
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    return fsync


def test_a_failed_fsync_fails_every_call_it_was_for_and_none_of_them_tries_again(
    tmp_path: Path,
) -> None:
    """Two deliveries whose links a failed fsync was to make durable: both fail. Before,
    only the thread that ran it did; the other ran an fsync of its own, which Linux
    answers with 0 after the error was reported once, and its mail counted as delivered
    though a power loss could take its link away."""
    release = threading.Event()
    d, fsync = DirSync(str(tmp_path)), _fails_second(release)
    outcome: dict[str, str] = {}

    def call(who: str) -> None:
        try:
            d.sync(d.ticket(open_fd=False), fsync)
            outcome[who] = "synced"
        except OSError as exc:
            outcome[who] = f"errno {exc.errno}"

    first = threading.Thread(target=call, args=("first",))
    first.start()
    _waiters_or_running(d)
    pair = [threading.Thread(target=call, args=(who,)) for who in ("a", "b")]
    for t in pair:
        t.start()
    _waiters(d, 2)  # both joined the run that waits for the first fsync to end
    release.set()
    for t in [first, *pair]:
        t.join(10)
    assert outcome == {"first": "synced", "a": f"errno {errno.EIO}", "b": f"errno {errno.EIO}"}
    assert (d.fsyncs, d.failures) == (2, 1)
    d.sync(d.ticket(open_fd=False), fsync)  # a later call is a new run
    assert (d.fsyncs, d.failures) == (3, 1)


def _waiters_or_running(d: DirSync) -> None:
    deadline = time.monotonic() + 10
    while not d.running:
        assert time.monotonic() < deadline, "the first fsync never started"
        time.sleep(0.005)


def test_a_failed_fsync_alone_is_raised_and_the_next_call_runs_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = DirSync(str(tmp_path))
    calls = []
    real_fsync = os.fsync

    def flaky(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(local.os, "fsync", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        d.sync(d.ticket())
    assert not d.running and d.failures == 1
    d.sync(d.ticket())
    assert d.fsyncs == 2 and len(calls) == 2


def test_queue_commits_that_a_failed_fsync_of_new_was_for_are_all_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyqmail-send commits a forward (the local link's thread) and a bounce (its main
    loop) through one Queue, whose new/ descriptor stays open. When the fsync of new/
    that was to make two commits durable fails, both are refused and taken back out of
    new/; before, the second ran its own fsync on the same descriptor, got 0, and its
    message counted as queued."""
    q = Queue(tmp_path / "queue")
    q.create()
    release = threading.Event()
    fsync_new = _fails_second(release)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd == q.new_dir_fd():
            fsync_new()
        else:
            real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    outcome: dict[str, str] = {}

    def commit(who: str) -> None:
        try:
            q.enqueue("a@example.test", ["b@example.test"], f"Subject: {who}\n\nbody\n".encode())
            outcome[who] = "queued"
        except QueueError as exc:
            outcome[who] = str(exc)

    first = threading.Thread(target=commit, args=("first",))
    first.start()
    _waiters_or_running(q._new_sync)
    pair = [threading.Thread(target=commit, args=(who,)) for who in ("forward", "bounce")]
    for t in pair:
        t.start()
    _waiters(q._new_sync, 2)
    release.set()
    for t in [first, *pair]:
        t.join(10)
    assert outcome["first"] == "queued"
    assert "Input/output error" in outcome["forward"]
    assert "Input/output error" in outcome["bounce"]
    assert len(q.ids("new")) == 1  # the first message only: the other two were taken back


def test_a_failure_between_a_link_and_its_sync_fails_that_sync(tmp_path: Path) -> None:
    """The entry was made before another caller's fsync, which failed; its own sync then
    runs an fsync that succeeds (Linux: the error was reported once), and must fail all
    the same: the ticket, taken before the link, says a failure came after it."""
    calls = [0]

    def fsync() -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(errno.EIO, "Input/output error")

    d = DirSync(str(tmp_path))
    ticket = d.ticket()  # before our link
    with pytest.raises(OSError):
        d.sync(d.ticket(), fsync)  # someone else's commit: its fsync fails
    with pytest.raises(OSError, match="Input/output error") as failed:
        d.sync(ticket, fsync)
    assert failed.value.errno == errno.EIO
    assert calls[0] == 2  # our own fsync ran and succeeded: it is not believed
    d.sync(d.ticket(), fsync)  # a link made after the failure: synced as usual


def test_a_forward_renamed_before_a_bounces_failed_fsync_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyqmail-send: the forward (the local link's thread) is renamed into new/, then the
    bounce (the main loop) fsyncs new/ and that fails, then the forward fsyncs new/ on the
    same kept descriptor, which Linux answers with 0. The forward is refused and taken
    back out of new/; before, it counted as queued and its recipient as done."""
    q = Queue(tmp_path / "queue")
    q.create()
    renamed, bounced = threading.Event(), threading.Event()
    real_sync_new = q.sync_new
    forward_thread: list[int] = []

    def sync_new(ticket: int) -> None:
        if threading.get_ident() in forward_thread:
            renamed.set()  # the forward's file is in new/ now
            assert bounced.wait(10)
        real_sync_new(ticket)

    monkeypatch.setattr(q, "sync_new", sync_new)
    monkeypatch.setattr(store.os, "fsync", _fails_once(lambda fd: fd == q.new_dir_fd()))
    outcome: dict[str, str] = {}

    def forward() -> None:
        forward_thread.append(threading.get_ident())
        try:
            q.enqueue("a@example.test", ["c@example.test"], b"Subject: fwd\n\nbody\n")
            outcome["forward"] = "queued"
        except QueueError as exc:
            outcome["forward"] = str(exc)

    t = threading.Thread(target=forward)
    t.start()
    assert renamed.wait(10)
    with pytest.raises(QueueError, match="Input/output error"):
        q.enqueue("", ["a@example.test"], b"Subject: bounce\n\nbody\n")
    bounced.set()
    t.join(10)
    assert "Input/output error" in outcome["forward"]
    assert q.ids("new") == []


def test_a_maildir_delivery_linked_before_a_failed_fsync_of_new_is_not_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivery A links its file into new/; delivery B's fsync of new/ fails; A's own
    fsync then succeeds. A must fail (pyqmail-send defers it: at worst a duplicate), not
    report a delivery that a power loss could take away."""
    md = tmp_path / "Maildir"
    maildir_deliver(md, b"Subject: first\n\nbody\n")  # creates the Maildir
    linked, failed = threading.Event(), threading.Event()
    a_thread: list[int] = []
    real_unlink = os.unlink

    def unlink(path: str) -> None:  # A's tmp name goes right after its link
        real_unlink(path)
        if threading.get_ident() in a_thread:
            linked.set()
            assert failed.wait(10)

    monkeypatch.setattr(local.os, "unlink", unlink)
    outcome: dict[str, str] = {}

    def deliver_a() -> None:
        a_thread.append(threading.get_ident())
        try:
            maildir_deliver(md, b"Subject: a\n\nbody\n")
            outcome["a"] = "delivered"
        except OSError as exc:
            outcome["a"] = f"errno {exc.errno}"

    t = threading.Thread(target=deliver_a)
    t.start()
    assert linked.wait(10)
    monkeypatch.setattr(
        local.os, "fsync", _fails_once(lambda fd: stat.S_ISDIR(os.fstat(fd).st_mode))
    )
    with pytest.raises(OSError, match="Input/output error"):
        maildir_deliver(md, b"Subject: b\n\nbody\n")
    failed.set()
    t.join(10)
    assert outcome == {"a": f"errno {errno.EIO}"}


def test_a_queue_whose_fsync_of_new_failed_is_still_freed_with_its_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure a DirSync keeps for later callers must not keep its traceback: its
    frames hold the queue (through the fsync it ran), so after one failed fsync the old
    Queue of a HUP would keep new/ open until the cyclic collector ran."""
    q = Queue(tmp_path / "queue")
    q.create()
    held = q.new_dir_fd()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd == held:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    try:
        q.enqueue("a@example.test", ["b@example.test"], b"Subject: x\n\nbody\n")
    except QueueError:
        pass
    else:
        pytest.fail("the commit did not fail")
    gc.disable()
    try:
        del q
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(held)
    finally:
        gc.enable()


def test_the_fsyncs_go_through_a_descriptor_opened_at_the_first_ticket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened before the link, so that it reports a failure of another process's fsync
    of the same directory (an IMAP server's, another delivery agent's) that happened
    after the link; closed when the last caller lets the DirSync go."""
    d = DirSync.of(str(tmp_path))
    ticket = d.ticket()
    fd = d.fd
    assert fd is not None and os.path.samestat(os.fstat(fd), os.stat(tmp_path))
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(n: int) -> None:
        synced.append(n)
        real_fsync(n)

    monkeypatch.setattr(local.os, "fsync", fsync)
    d.sync(ticket)
    assert synced == [fd]
    del d
    gc.collect()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DirSync(str(tmp_path / "gone")).ticket()


def test_one_object_per_directory_while_in_use(tmp_path: Path) -> None:
    a = DirSync.of(str(tmp_path))
    assert DirSync.of(str(tmp_path)) is a
    assert DirSync.of(str(tmp_path / "other")) is not a


def test_concurrent_deliveries_share_new_fsyncs_and_all_land(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    names: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(10):
            name = maildir_deliver(md, f"Subject: {n}-{i}\n\nbody\n".encode())
            with lock:
                names.append(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(os.listdir(md / "new")) == sorted(names)
    assert len(set(names)) == 60
    assert os.listdir(md / "tmp") == []
