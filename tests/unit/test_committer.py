"""pyqmail-smtpd's group commit (queue_commit.Committer) on a real event loop and a real queue."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pyqmail.log import log
from pyqmail.queue import writer as queuemod
from pyqmail.queue.commit import Committer
from pyqmail.queue.format import Envelope, QueueError
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from tests.queue_util import messages


@pytest.fixture
def q(tmp_path: Path) -> Queue:
    queue = Queue(tmp_path / "queue")
    queue.create()
    return queue


@pytest.fixture(params=[True, False], ids=["on the loop", "in the commit thread"])
def everyone_waits(request: pytest.FixtureRequest) -> bool:
    """Where the batches are committed: every session waits for them (the loop commits),
    or some session is still on its way (the commit thread does; ``delay`` 0 here)."""
    return bool(request.param)


def _writer(q: Queue, n: int, *, size: int = 4, held: bool = True) -> QueueWriter:
    w = QueueWriter(q, "a@b.test", [f"r{n}@c.test"], defer=held)
    w.write(b"x" * (size - 2) + b"\r\n")
    w.finish()
    return w


def _run(
    body: Callable[[Committer, Callable[[QueueWriter], asyncio.Future[object]]], Awaitable[None]],
    *,
    delay: float = 0.0,
    all_waiting: Callable[[], bool] = lambda: True,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        committer = Committer(loop, delay=delay, all_waiting=all_waiting, log=log)

        def submit(w: QueueWriter) -> asyncio.Future[object]:
            fut: asyncio.Future[object] = loop.create_future()
            committer.submit(w, fut.set_result)
            return fut

        try:
            await body(committer, submit)
        finally:
            committer.stop(5)

    asyncio.run(main())


def _fsync_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread of every fsync from now on (the loop runs in this one)."""
    names: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        names.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return names


def _files(q: Queue) -> list[int]:
    """Messages per file in new/, oldest file first."""
    return [len(q.load("new", name)) for name in q.ids("new")]


def test_messages_finished_in_one_loop_pass_share_one_segment(
    q: Queue, everyone_waits: bool
) -> None:
    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        first = [submit(_writer(q, n)) for n in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*first), 10)
        assert all(isinstance(r, Envelope) for r in results)
        assert isinstance(await asyncio.wait_for(submit(_writer(q, 3)), 10), Envelope)

    _run(body, all_waiting=lambda: everyone_waits)
    assert _files(q) == [3, 1]
    assert os.listdir(q.path("tmp")) == []


def test_passes_while_the_commit_thread_is_busy_fill_one_segment(
    q: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first message's fsync is slow; the four finished meanwhile, in two passes,
    wait in one segment and are committed together as soon as the thread is free.

    The slow fsync is held by the test, not slept (a sleep of 0.3 s, and 50 ms for the
    thread to get there, were guesses about a loaded machine's scheduling)."""
    real_fsync = os.fsync
    gate, release = threading.Event(), threading.Event()

    def slow_fsync(fd: int) -> None:
        if threading.current_thread().name == "commit" and not gate.is_set():
            gate.set()
            release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        futs = [submit(_writer(q, 0))]
        assert await asyncio.to_thread(gate.wait, 10), "the commit thread never reached fsync"
        futs += [submit(_writer(q, 1)), submit(_writer(q, 2))]
        await asyncio.sleep(0.05)
        futs += [submit(_writer(q, 3)), submit(_writer(q, 4))]
        await asyncio.sleep(0)
        assert not any(f.done() for f in futs)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert [r.recipients for r in results if isinstance(r, Envelope)] == [
            (f"r{n}@c.test",) for n in range(5)
        ]

    _run(body, all_waiting=lambda: False)  # the slow fsync is the thread's
    assert _files(q) == [1, 4]


def test_large_streamed_messages_ride_in_the_same_batch(q: Queue, everyone_waits: bool) -> None:
    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        futs = [submit(_writer(q, 0)), submit(_writer(q, 1, size=100, held=False))]
        futs.append(submit(_writer(q, 2)))
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert all(isinstance(r, Envelope) for r in results)

    _run(body, all_waiting=lambda: everyone_waits)
    assert sorted(_files(q)) == [1, 2]
    assert len(messages(q, "new")) == 3


def test_disk_full_while_filling_fails_that_segment_only(
    q: Queue, monkeypatch: pytest.MonkeyPatch, everyone_waits: bool
) -> None:
    real_writev = os.writev
    full = [True]

    def writev(fd: int, bufs: list[bytes]) -> int:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, bufs)

    monkeypatch.setattr(os, "writev", writev)

    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        results = await asyncio.wait_for(
            asyncio.gather(submit(_writer(q, 0)), submit(_writer(q, 1))), 10
        )
        assert all(isinstance(r, QueueError) and "No space" in str(r) for r in results)
        assert os.listdir(q.path("tmp")) == [] and q.ids("new") == []
        full[0] = False
        assert isinstance(await asyncio.wait_for(submit(_writer(q, 2)), 10), Envelope)

    _run(body, all_waiting=lambda: everyone_waits)
    assert _files(q) == [1]


def test_failed_fsync_of_new_answers_451_and_leaves_nothing(
    q: Queue, monkeypatch: pytest.MonkeyPatch, everyone_waits: bool
) -> None:
    def broken(ticket: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(q, "sync_new", broken)

    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        futs = [
            submit(_writer(q, 0)),
            submit(_writer(q, 1)),
            submit(_writer(q, 2, size=100, held=False)),
        ]
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert all(isinstance(r, QueueError) and "Input/output" in str(r) for r in results)

    _run(body, all_waiting=lambda: everyone_waits)
    assert q.ids("new") == [] and os.listdir(q.path("tmp")) == []


def test_a_failing_poke_still_answers_every_client(
    q: Queue,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    everyone_waits: bool,
) -> None:
    """The wake-up of pyqmail-send is best effort: its failure must not eat the 250s."""

    def broken() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(q, "poke", broken)

    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        futs = [submit(_writer(q, 0)), submit(_writer(q, 1))]
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert all(isinstance(r, Envelope) for r in results)

    _run(body, all_waiting=lambda: everyone_waits)
    assert "poke-fail" in capfd.readouterr().out


def test_a_bug_in_the_commit_still_answers_every_client(
    q: Queue, monkeypatch: pytest.MonkeyPatch, everyone_waits: bool
) -> None:
    def bug(self: queuemod.SegmentWriter) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(queuemod.SegmentWriter, "sync_publish", bug)

    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        futs = [submit(_writer(q, 0)), submit(_writer(q, 1))]
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert all(isinstance(r, QueueError) and "boom" in str(r) for r in results)

    _run(body, all_waiting=lambda: everyone_waits)
    assert q.ids("new") == [] and os.listdir(q.path("tmp")) == []


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named tmp file"])
def test_a_bug_after_linking_into_new_takes_the_messages_back_out(
    q: Queue, monkeypatch: pytest.MonkeyPatch, everyone_waits: bool, tmpfile: bool
) -> None:
    """The segment and the large message are already in new/ when the commit breaks (a
    bug, not an OSError, in the fsync of new/): their clients get 451, so nothing of them
    may stay in new/ to be delivered and then sent again."""
    monkeypatch.setitem(queuemod._TMPFILE, q.dir_tmp, tmpfile)
    in_new: list[int] = []

    def bug(ticket: int) -> None:
        in_new.append(len(q.ids("new")))
        raise RuntimeError("boom")

    monkeypatch.setattr(q, "sync_new", bug)

    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        futs = [submit(_writer(q, 0)), submit(_writer(q, 1, size=100, held=False))]
        futs.append(submit(_writer(q, 2)))
        results = await asyncio.wait_for(asyncio.gather(*futs), 10)
        assert all(isinstance(r, QueueError) and "boom" in str(r) for r in results)

    _run(body, all_waiting=lambda: everyone_waits)
    assert in_new == [2]  # the segment of two and the message of its own were linked
    assert q.ids("new") == [] and os.listdir(q.path("tmp")) == []


def test_a_failing_answer_does_not_mute_the_others(
    q: Queue, capfd: pytest.CaptureFixture[str], everyone_waits: bool
) -> None:
    """One session's answer raises (a bug in it): logged, and the rest of the batch is
    still answered; on the loop the answers run inside whoever started the commit."""

    def broken(_: object) -> None:
        raise RuntimeError("session bug")

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        first = submit(_writer(q, 0))
        c.submit(_writer(q, 1), broken)
        last = submit(_writer(q, 2))
        results = await asyncio.wait_for(asyncio.gather(first, last), 10)
        assert all(isinstance(r, Envelope) for r in results)

    _run(body, all_waiting=lambda: everyone_waits)
    assert "commit-answer-fail" in capfd.readouterr().out
    assert _files(q) == [3]


def test_a_failing_answer_to_a_failed_segment_does_not_mute_the_others(
    q: Queue, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Disk full while the loop fills the segment: its clients are answered 451 there, in
    ``_hand_over``; one of them raising must not leave the others unanswered nor stop the
    large message of the same pass from being committed."""
    real_writev = os.writev

    def full(fd: int, bufs: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def broken(_: object) -> None:
        raise RuntimeError("session bug")

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        monkeypatch.setattr(os, "writev", full)
        c.submit(_writer(q, 0), broken)
        other = submit(_writer(q, 1))
        large = submit(_writer(q, 2, size=100, held=False))
        result = await asyncio.wait_for(other, 5)
        assert isinstance(result, QueueError) and "No space" in str(result)
        monkeypatch.setattr(os, "writev", real_writev)
        assert isinstance(await asyncio.wait_for(large, 5), Envelope)

    _run(body, all_waiting=lambda: False)
    assert "commit-answer-fail" in capfd.readouterr().out
    assert _files(q) == [1] and os.listdir(q.path("tmp")) == []


def test_a_failing_answer_to_a_segment_that_cannot_be_sealed_does_not_drop_the_batch(
    q: Queue, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The segment's trailer cannot be written: its clients are answered 451 in
    ``_start``; one of them raising must not drop the rest of the batch (the other
    client's answer, the large message's commit, its tmp file and fd)."""
    real_seal = queuemod.SegmentWriter.seal

    def seal(self: queuemod.SegmentWriter) -> None:
        self.abort()
        raise QueueError(f"cannot write segment {self.segment_id}: No space left on device")

    def broken(_: object) -> None:
        raise RuntimeError("session bug")

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        monkeypatch.setattr(queuemod.SegmentWriter, "seal", seal)
        c.submit(_writer(q, 0), broken)
        other = submit(_writer(q, 1))
        large = submit(_writer(q, 2, size=100, held=False))
        result = await asyncio.wait_for(other, 5)
        assert isinstance(result, QueueError) and "No space" in str(result)
        assert isinstance(await asyncio.wait_for(large, 5), Envelope)
        monkeypatch.setattr(queuemod.SegmentWriter, "seal", real_seal)

    _run(body, all_waiting=lambda: False)
    assert "commit-answer-fail" in capfd.readouterr().out
    assert _files(q) == [1] and os.listdir(q.path("tmp")) == []


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named tmp file"])
def test_stop_drops_what_was_never_handed_over(
    q: Queue, monkeypatch: pytest.MonkeyPatch, tmpfile: bool
) -> None:
    """At exit nobody is left to answer: messages still being filled leave nothing behind.
    A segment being filled is an unnamed file where the file system allows (nothing in
    tmp/ at all), else a named one in tmp/."""
    monkeypatch.setitem(queuemod._TMPFILE, q.dir_tmp, tmpfile)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.2)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        submit(_writer(q, 0))
        await asyncio.sleep(0.05)  # the first batch is in the commit thread
        submit(_writer(q, 1))
        await asyncio.sleep(0)  # handed over to a segment being filled, not committed
        assert len(c.filling) == 1
        assert len(os.listdir(q.path("tmp"))) == (0 if tmpfile else 2)  # + the one in fsync

    _run(body, all_waiting=lambda: False)  # the slow fsync is the thread's
    assert os.listdir(q.path("tmp")) == []
    assert _files(q) == [1]


def test_stop_aborts_what_was_submitted_but_not_handed_over(q: Queue) -> None:
    """A message streamed into a file of its own and submitted in the loop pass that
    stops the worker (its hand-over not run yet) is never answered: ``stop`` removes its
    tmp file, which was dropped with the job and left in tmp/ for 36 hours."""

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        submit(_writer(q, 0, size=100, held=False))
        submit(_writer(q, 1))
        assert len(c.pending) == 2 and len(os.listdir(q.path("tmp"))) == 1
        assert c.stop(5) is True

    _run(body)
    assert os.listdir(q.path("tmp")) == [] and q.ids("new") == []


# --- waiting for company (control/commitdelay) ------------------------------------------


def test_a_batch_waits_for_sessions_still_on_their_way(q: Queue) -> None:
    """Other sessions are busy: the first message waits; when everyone is waiting for a
    commit (here: the flag flips and a session ends) the batch goes at once, as one file."""
    everyone_waiting = [False]

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        first = submit(_writer(q, 0))
        await asyncio.sleep(0.3)
        assert not first.done(), "committed although other sessions were on their way"
        second = submit(_writer(q, 1))
        await asyncio.sleep(0.1)
        assert not second.done()
        everyone_waiting[0] = True
        c.session_gone()
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert all(isinstance(r, Envelope) for r in results)

    _run(body, delay=60.0, all_waiting=lambda: everyone_waiting[0])
    assert _files(q) == [2]


def test_the_wait_is_bounded_from_the_oldest_message(q: Queue) -> None:
    """Nobody else ever finishes: the batch goes ``delay`` after its oldest message came;
    later messages join it without pushing the deadline back."""

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = submit(_writer(q, 0))
        await asyncio.sleep(0.2)
        second = submit(_writer(q, 1))
        await asyncio.sleep(0)
        assert c.timer is not None
        assert c.timer.when() == pytest.approx(started + 0.6, abs=0.05)
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert all(isinstance(r, Envelope) for r in results)
        assert loop.time() - started >= 0.59

    _run(body, delay=0.6, all_waiting=lambda: False)
    assert _files(q) == [2]


def test_no_wait_when_every_session_waits(q: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone message (its session is the only one, and it waits): committed in the same
    loop pass, by the loop itself (nothing else could run meanwhile), no timer set."""
    fsyncs = _fsync_threads(monkeypatch)

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        fut = submit(_writer(q, 0))
        await asyncio.sleep(0)
        assert fut.done() and not c.busy and c.timer is None
        assert isinstance(fut.result(), Envelope)

    _run(body, delay=60.0, all_waiting=lambda: True)
    assert _files(q) == [1]
    assert fsyncs and set(fsyncs) == {threading.current_thread().name}


def test_no_wait_with_commitdelay_0(q: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """commitdelay 0 while other sessions are on their way: the batch goes to the commit
    thread in the same loop pass, and the loop goes on serving them meanwhile."""
    fsyncs = _fsync_threads(monkeypatch)

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        fut = submit(_writer(q, 0))
        await asyncio.sleep(0)
        assert c.busy and c.timer is None
        assert isinstance(await asyncio.wait_for(fut, 10), Envelope)

    _run(body, delay=0.0, all_waiting=lambda: False)
    assert _files(q) == [1]
    assert fsyncs and set(fsyncs) == {"commit"}


def test_a_batch_goes_to_the_loop_once_everyone_waits(
    q: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions on their way: the first batch goes to the commit thread; when the last
    session is waiting too, the next batch is committed on the loop."""
    fsyncs = _fsync_threads(monkeypatch)
    everyone_waiting = [False]

    async def body(_: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        assert isinstance(await asyncio.wait_for(submit(_writer(q, 0)), 10), Envelope)
        assert set(fsyncs) == {"commit"}
        fsyncs.clear()
        everyone_waiting[0] = True
        assert isinstance(await asyncio.wait_for(submit(_writer(q, 1)), 10), Envelope)
        assert fsyncs and set(fsyncs) == {threading.current_thread().name}

    _run(body, all_waiting=lambda: everyone_waiting[0])
    assert _files(q) == [1, 1]


def test_a_busy_commit_thread_does_not_restart_the_wait(
    q: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait ran out while the thread was still busy: the batch goes as soon as the
    thread is free, not one more ``delay`` later."""
    real_fsync = os.fsync
    gate = threading.Event()

    def slow_fsync(fd: int) -> None:
        if threading.current_thread().name == "commit" and not gate.is_set():
            gate.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        first = submit(_writer(q, 0))
        await asyncio.sleep(0.5)  # waited 0.2 s, then went to the (stuck) thread
        assert c.busy and not first.done()
        second = submit(_writer(q, 1))
        await asyncio.sleep(0.5)  # its own wait is over too; the thread is still stuck
        assert c.timer is None and not second.done()
        gate.set()
        await asyncio.wait_for(first, 10)  # answered in _deliver, which starts the next
        assert c.timer is None, "must not wait a whole delay again"
        assert c.busy or second.done()
        await asyncio.wait_for(second, 10)

    _run(body, delay=0.2, all_waiting=lambda: False)
    assert _files(q) == [1, 1]


def test_stop_cancels_the_wait(q: Queue) -> None:
    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        fut = submit(_writer(q, 0))
        await asyncio.sleep(0.05)
        assert c.timer is not None and not fut.done()
        c.stop(5)
        assert c.timer is None
        await asyncio.sleep(0.1)
        assert not fut.done(), "nobody is left to answer at exit"

    _run(body, delay=60.0, all_waiting=lambda: False)
    assert _files(q) == []
    assert os.listdir(q.path("tmp")) == []


def test_stop_says_when_a_commit_is_still_on_the_disk(
    q: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled fsync outlasts the grace: ``stop`` says so, and the worker then leaves the
    queue's descriptors open (the thread may still link through new/'s); once the disk
    answers, the batch completes and the next ``stop`` says it is done."""
    stalled, entered = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        entered.set()
        stalled.wait(10)
        real_fsync(fd)

    async def body(c: Committer, submit: Callable[[QueueWriter], asyncio.Future[object]]) -> None:
        monkeypatch.setattr(os, "fsync", fsync)
        fut = submit(_writer(q, 0))
        assert await asyncio.to_thread(entered.wait, 10)
        assert c.stop(0.1) is False
        stalled.set()
        assert isinstance(await asyncio.wait_for(fut, 10), Envelope)
        assert c.stop(5) is True

    _run(body, all_waiting=lambda: False)
    assert _files(q) == [1]
