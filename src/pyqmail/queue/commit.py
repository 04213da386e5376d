"""The group commit: the one path by which pyqmail-smtpd makes messages durable.

The writers (``pyqmail.queue.writer``) own the steps of a commit, as public methods:
``QueueWriter.finish`` (complete the message), ``SegmentWriter.add`` and ``seal`` (held
messages into one segment file), ``sync_publish`` of either (fsync, close, link or rename
into new/), ``Queue.sync_new`` (fsync new/), ``unpublish`` (take a message back out when
that fsync fails) and ``envelope``/``envelopes`` (the committed messages). This module
puts them in order for a batch (``commit_batch``) and runs batches in a thread of their
own next to the event loop, or on the loop when every session waits for the batch
(``Committer``).

The durability order, per batch (the 250 after DATA is sent only after it):

1. every message complete and written (a segment: one writev per loop pass, then sealed);
2. each file fsynced and closed, then linked or renamed into new/;
3. new/ fsynced, once per queue directory for the whole batch;
4. the reader poked (best effort), then every client answered: 250 with its queue id,
   or 451 when any step of its file failed (nothing of it is left in tmp/ or new/ then).

One gap is known and accepted: a file is in new/ from its link until the fsync of new/,
and pyqmail-send, woken meanwhile by another worker's commit, may move it to mess/ then.
If that fsync then fails (an I/O error: a failing disk) or the commit raises (a bug), the
file cannot be taken back: its client gets 451 and the message is delivered too, so the
client's retry makes a duplicate. Never a loss; closing the gap would need a mark that
pyqmail-send waits for, written and fsynced after new/'s fsync (Postfix's queue manager
skips a queue file until its mode says it is ready): a third fsync for every batch, for a
failing disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue as queuemod
import threading
from collections.abc import Callable

from pyqmail.queue.format import Envelope, QueueError
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter, SegmentWriter

CommitResult = Envelope | QueueError
CommitCallback = Callable[[CommitResult], None]


Job = tuple[QueueWriter, CommitCallback]
Answer = tuple[CommitCallback, CommitResult]


@dataclasses.dataclass
class Batch:
    """What one commit makes durable in one go."""

    segments: list[tuple[SegmentWriter, list[CommitCallback]]]  # sealed, held messages
    files: list[Job]  # messages streamed into files of their own (large ones)

    def queues(self) -> list[Queue]:
        """The queues the batch goes into (one, unless a HUP changed the directory)."""
        found = {id(s.queue): s.queue for s, _ in self.segments}
        found.update((id(w.queue), w.queue) for w, _ in self.files)
        return list(found.values())

    def callbacks(self) -> list[CommitCallback]:
        """Every client waiting on this batch (each must be answered, even after a bug)."""
        return [cb for _, cbs in self.segments for cb in cbs] + [cb for _, cb in self.files]

    def abort(self) -> None:
        """Leave nothing of the batch in tmp/ or new/ (its clients are answered 451): a
        bug may strike after some of its files were linked into new/, and a message left
        there would be delivered and then sent again by its client."""
        for segment, _ in self.segments:
            segment.unpublish()
        for writer, _ in self.files:
            writer.unpublish()


def commit_batch(batch: Batch) -> tuple[list[Answer], list[Queue]]:
    """In the commit thread (or on the loop, when every session waits for it): every file
    fsynced and linked or renamed into new/, then each queue's new/ fsynced once (a HUP
    may have changed the queue directory, so the files are grouped by queue). Returns
    every client's answer and the queues to poke; a failed fsync of new/ takes that
    queue's files back out and answers them 451."""
    answers: list[Answer] = []
    done: dict[int, tuple[Queue, list[tuple[SegmentWriter, list[CommitCallback]]], list[Job]]]
    done = {}
    # before any link or rename: an fsync of new/ that fails after it fails the batch
    tickets = {id(q): q.new_ticket() for q in batch.queues()}
    for segment, callbacks in batch.segments:
        try:
            segment.sync_publish()
        except QueueError as exc:
            answers.extend((cb, exc) for cb in callbacks)
            continue
        done.setdefault(id(segment.queue), (segment.queue, [], []))[1].append((segment, callbacks))
    for writer, callback in batch.files:
        try:
            writer.sync_publish()
        except QueueError as exc:
            answers.append((callback, exc))
            continue
        done.setdefault(id(writer.queue), (writer.queue, [], []))[2].append((writer, callback))
    poke = []
    for queue, segments, files in done.values():
        try:
            queue.sync_new(tickets[id(queue)])
        except OSError as exc:  # answered 451: the clients will send them again
            error = QueueError(f"cannot commit: fsync of new/: {exc.strerror or exc}")
            for segment, callbacks in segments:
                segment.unpublish()
                answers.extend((cb, error) for cb in callbacks)
            for writer, callback in files:
                writer.unpublish()
                answers.append((callback, error))
            continue
        poke.append(queue)
        for segment, callbacks in segments:
            answers.extend(zip(callbacks, segment.envelopes(), strict=True))
        answers.extend((callback, writer.envelope()) for writer, callback in files)
    return answers, poke


class Committer:
    """Group commit: each worker makes its messages durable a batch at a time, in a thread
    of its own or, when nothing else could run meanwhile, on the loop itself.

    The loop thread does the cheap part. At the end of each pass over its ready sockets
    (``_hand_over``) it appends the messages that pass finished to the segment file it is
    filling (``SegmentWriter.add``: one writev into the page cache); while the commit thread
    is busy with the previous batch, later passes append to the same segment. As soon as
    the commit thread is free, the loop seals the segment and hands it over (``_start``).
    The commit thread does only what blocks: fsync and close the segment, link (or rename)
    it into new/, fsync(new/) (once per batch and queue directory), then wakes the loop once
    to answer every client (``_deliver``: 250, or 451 for all messages of a failed segment).
    Large messages that were streamed into files of their own ride in the same batch.

    When every session of the worker is waiting for this batch (``all_waiting``), the loop
    commits it itself instead (``_start``): it would only sleep until the thread woke it.
    That saves the hand-over and the way back (two wake-ups across threads, the GIL passed
    back and forth around each of the thread's syscalls), 7-14 % of the worker's CPU per
    message on the plain rows of ``bench/smtpd_load.py`` (bench/README.md). What waits
    meanwhile is only what was not there yet: a connection that arrives during the fsyncs
    is accepted after them (half a millisecond later at the median on the disk measured).
    A disk that stalls for seconds stalls the worker's loop too; every session of it is
    waiting for that commit either way, as a Postfix smtpd waits for its cleanup. (A
    session that has left does not count as waiting, even with its message in the batch:
    ``Server.left``.)

    Waiting for company (``delay``, from control/commitdelay): when no batch is in flight but
    other sessions of this worker are still on their way to the end of a message, the batch
    waits for them, at most ``delay`` seconds counted from its oldest message, and goes as
    soon as every session of the worker is waiting for a commit (``all_waiting``) since
    nobody else can join then. A lone message (or a worker whose every client is waiting)
    is never delayed; under load one create, two fsyncs, one link and one wake-up of the
    loop serve many messages instead of two or three. It is the group commit delay of
    databases (PostgreSQL's commit_delay with commit_siblings, MySQL's
    binlog_group_commit_sync_delay), bounded the same way; the 250 of a message can come
    up to ``delay`` later, which no SMTP client notices (their timeouts are minutes). The
    default, 10 ms, is about one session's round of commands under the benchmark's load on
    the development VM: with 5 ms the batches (3-4 messages) caught only part of the
    sessions and the gain came and went between runs; 10 and 20 ms gave steadily higher
    throughput and lower median latency (bench/README.md).

    Why this split: a batch is everything that finished while the previous one was on disk,
    in one file, so the disk work per message falls as the load rises; and the loop and the
    commit thread share the GIL, so every syscall the commit thread makes while the loop runs
    Python is a hand-over of the GIL and back (futex round trips: strace counts 17-20 per
    message under the plain one-message-per-session load), which is why that thread makes as
    few as it can. Fsyncs run one after the other in this one thread: a pool saved little
    wall time on the disks measured and cost more CPU than it saved.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        delay: float = 0.0,
        all_waiting: Callable[[], bool] = lambda: True,
        log: Callable[..., None],
    ) -> None:
        self.loop = loop
        self.log = log  # the daemon's key=value logger (a failed poke is worth a line)
        self.delay = delay  # seconds a batch may wait for more messages (see above)
        self.all_waiting = all_waiting  # True when no session could add a message now
        self.oldest = 0.0  # loop time the oldest message waiting for a commit came
        self.timer: asyncio.TimerHandle | None = None
        self.jobs: queuemod.SimpleQueue[Batch | None] = queuemod.SimpleQueue()
        self.pending: list[Job] = []  # finished in this pass
        self.filling: dict[int, tuple[SegmentWriter, list[CommitCallback]]] = {}  # per queue
        self.files: list[Job] = []
        self.busy = False  # a batch is being committed (by the thread, or the loop)
        self.thread = threading.Thread(target=self._run, name="commit", daemon=True)
        self.thread.start()

    def submit(self, writer: QueueWriter, callback: CommitCallback) -> None:
        """Queue a finished message (on the loop); its callback gets the result."""
        if not self.pending:
            self.loop.call_soon(self._hand_over)
            if not (self.filling or self.files):
                self.oldest = self.loop.time()
        self.pending.append((writer, callback))

    def _hand_over(self) -> None:
        jobs, self.pending = self.pending, []
        held: dict[int, list[Job]] = {}
        for job in jobs:
            if job[0].held:
                held.setdefault(id(job[0].queue), []).append(job)
            else:
                self.files.append(job)
        for key, group in held.items():
            entry = self.filling.get(key)
            try:
                if entry is None:
                    entry = self.filling[key] = (SegmentWriter(group[0][0].queue), [])
                entry[0].add([w for w, _ in group])
            except QueueError as exc:  # the segment removed itself: all its messages fail
                self.filling.pop(key, None)
                for w, _ in group:
                    w.abort()
                failed = ([] if entry is None else entry[1]) + [cb for _, cb in group]
                for callback in failed:
                    self._answer(callback, exc)
                continue
            entry[1].extend(cb for _, cb in group)
        self._start()

    def _start(self) -> None:
        """If no batch is being committed, seal what was filled and commit it (on the loop
        when every session waits for it, else in the thread), unless it should wait for
        more (see the class docstring). Called again when a message comes, a session
        ends, the wait is over and a batch is done."""
        if self.busy or not (self.filling or self.files):
            return
        everyone_waits = self.all_waiting()
        if self.delay > 0 and not everyone_waits:
            due = self.oldest + self.delay
            if self.loop.time() < due:
                if self.timer is None:
                    self.timer = self.loop.call_at(due, self._waited)
                return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        filling, self.filling = self.filling, {}
        batch = Batch([], self.files)
        self.files = []
        for segment, callbacks in filling.values():
            try:
                segment.seal()
            except QueueError as exc:
                for callback in callbacks:
                    self._answer(callback, exc)
                continue
            batch.segments.append((segment, callbacks))
        if batch.segments or batch.files:
            self.busy = True
            if everyone_waits:
                self._deliver(*self._commit(batch))
            else:
                self.jobs.put(batch)

    def _waited(self) -> None:
        self.timer = None
        self._start()

    def session_gone(self) -> None:
        """A session ended: maybe everyone left is waiting now."""
        if self.timer is not None:
            self._start()

    def stop(self, timeout: float) -> bool:
        """At exit, once no session is left: what was not committed is never answered,
        so it is dropped, its writers aborted (nothing is left in tmp/: a message streamed
        into a file of its own would stay there 36 hours, until pyqmail-send's clean-up;
        nobody was told 250 for it, so nothing acknowledged is lost); a batch in flight
        completes. False if the commit thread is still in it after ``timeout`` (a stalled
        disk): the caller must then leave the queue's descriptors open, which that thread
        may still use."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for writer, _ in self.pending:  # submitted, not yet handed over (``_hand_over``)
            writer.abort()
        self.pending = []
        for segment, _ in self.filling.values():
            segment.abort()
        for writer, _ in self.files:
            writer.abort()
        self.filling, self.files = {}, []
        self.jobs.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _run(self) -> None:
        while (batch := self.jobs.get()) is not None:
            self.loop.call_soon_threadsafe(self._deliver, *self._commit(batch))

    @staticmethod
    def _commit(batch: Batch) -> tuple[list[Answer], list[Queue]]:
        """``commit_batch``, on either thread; a bug in it still answers every client."""
        try:
            return commit_batch(batch)
        except Exception as exc:  # noqa: BLE001 - a bug must still answer every client
            batch.abort()
            error = QueueError(f"commit failed: {exc!r}")
            return [(cb, error) for cb in batch.callbacks()], []

    def _deliver(self, answers: list[Answer], queues: list[Queue]) -> None:
        """On the loop: wake pyqmail-send (from here, not the commit thread, whose every
        syscall would have to win the GIL back from the loop), answer the clients, and
        start the next batch with whatever was filled meanwhile."""
        self.busy = False
        for queue in queues:
            try:
                queue.poke()
            except OSError as exc:  # best effort: pyqmail-send also scans new/
                self.log("poke-fail", error=str(exc))
        for callback, result in answers:
            self._answer(callback, result)
        self._start()

    def _answer(self, callback: CommitCallback, result: CommitResult) -> None:
        """Every answer goes through here: one that fails (a bug in its session) is logged
        and the others are still given. They run inside whatever handed the messages over
        or started the commit, a session's end included, not a loop callback of their own,
        so an exception would otherwise leave the rest of the batch unanswered (and, in
        ``_start``, the batch itself dropped)."""
        try:
            callback(result)
        except Exception as exc:  # noqa: BLE001 - one session's bug must not mute the rest
            self.log("commit-answer-fail", error=repr(exc))
