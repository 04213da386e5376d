"""pyqmail-send's scheduling: which recipient is tried when, and by how many workers at once.

The in-memory model of the queue (``Msg``, ``Rcpt``, ``Segment``, rebuilt from the state
records by ``load_msg``), qmail's retry schedule (``nextretry``), and ``Scheduler``: the due
recipients go from the heap to the ready queues, at most ``concurrencylocal`` local and
``concurrencyremote`` remote workers take them (a remote worker keeps one connection per
destination), and each outcome goes to ``Finisher._complete``. The protocol it serves is
described in ``pyqmail.send.manager``.

One destination (the key ``RemoteDelivery.key`` gives: a recipient domain's MX hosts, or an
``smtproutes`` relay) gets at most ``concurrencydestination`` of the remote workers, 5
unless set: the concurrency Postfix starts every destination at
(``initial_destination_concurrency``), a quarter of ``concurrencyremote``'s 20, so that a
destination that is dead or slow (a job there may hold its worker for ``timeoutconnect``, or
``timeoutremote`` for a greeting, per address) leaves at least three quarters of the slots
to the rest; a worker keeps its connection for the next job, so five connections carry a
busy destination's mail without a handshake each, and large receivers limit the connections
they take from one client anyway. A host that relays everything through one smarthost has
one destination: raise it there. When a delivery finds no connection to be had at all
(``unreachable``: no address answered, or the destination's DNS failed for now), the jobs
already waiting for that destination get the same temporary failure at once instead of
each paying the timeouts again (``_take_unreachable``).

A job that raises (a bug, ``MemoryError`` under the run script's ``softlimit``) ends as a
temporary failure naming the exception, and its slot is given back (``_job_failed``,
``_settle``): recipients never stay busy until pyqmail-send restarts.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope, QueueError
from pyqmail.queue.state import Attempt, Bounced, Record
from pyqmail.queue.store import Queue
from pyqmail.send.delivery import Result, named, one_line, split_address
from pyqmail.send.local import LocalDelivery
from pyqmail.send.remote import RemoteDelivery
from pyqmail.send.spawn import ChildLostError, Children, RemoteHandle
from pyqmail.wirelines import wire_lines

CHANSKIP = {"local": 10, "remote": 20}


def nextretry(birth: float, last: float, channel: str) -> float:
    """qmail-send's retry schedule."""
    n = math.isqrt(int(last - birth)) if last > birth else 0
    n += CHANSKIP[channel]
    return birth + n * n


def unreachable(result: Result) -> bool:
    """A remote delivery that made no connection to its destination at all: every
    address refused, timed out connecting, sent no greeting in ``timeoutremote``, or rests
    after such a timeout (tcpto, ``pyqmail.send.peers``: "not tried"); or the destination's
    own DNS failed for now (no answer, SERVFAIL: ``#4.4.3``, before any address was known).
    Remote delivery (``pyqmail.send.remoteopen``) gives the first kinds ``#4.4.1``, RFC
    3463's "no answer from host", the last ``#4.4.3``, "directory server failure"; neither
    comes with an SMTP reply (``diagnostic``: a server's own ``451 4.4.1`` is a reply). A
    domain whose name servers do not answer is common among the senders of spam a bounce
    goes back to: each of its waiting jobs would hold a slot for the resolver's whole
    lifetime (30 s) and fail the same way."""
    return result.kind == "temp" and result.status in ("4.4.1", "4.4.3") and not result.diagnostic


# -- in-memory model --------------------------------------------------------------------


@dataclass
class Rcpt:
    index: int
    address: str
    channel: str  # "local" | "remote"
    status: str = "pending"  # pending | busy | done | failed
    next_try: float = 0.0
    last_try: float = 0.0
    result: Result | None = None
    expired: bool = False


@dataclass
class Msg:
    env: Envelope
    rcpts: list[Rcpt]
    file: str = ""  # its file in mess/: the queue id, or the id of its segment
    span: tuple[int, int] | None = None  # where in the segment (None: a file of its own)
    bounced: bool = False
    bounce_id: str | None = None  # the DSN queued, its record not yet written (``_bounce``)
    has_state: bool = False  # state/<id> exists (or may): deleting needs the careful order
    lock: threading.Lock = field(default_factory=threading.Lock)
    body: bytes | None = None  # kept from the pickup read (BODY_CACHE bounds them all)
    dkim: bytes = b""  # DKIM-Signature fields made at pickup, put in front of every copy

    @property
    def finished(self) -> bool:
        return all(r.status in ("done", "failed") for r in self.rcpts)


def take_due(later: dict[str, float], now: float) -> set[str]:
    """Take out of ``later`` (name -> when it is tried again: ends that failed, files that
    could not be read) the names whose time has come."""
    names = {name for name, at in later.items() if at <= now}
    for name in names:
        del later[name]
    return names


def _result_from(record: Attempt) -> Result:
    kind = {"done": "ok", "failed": "perm"}.get(record.event, "temp")
    return Result(
        kind,  # type: ignore[arg-type]
        record.detail,
        record.status,
        record.remote,
        record.diag,
    )


def load_msg(env: Envelope, records: list[Record], control: Control, now: float) -> Msg:
    """Rebuild a message's delivery state from its state file records."""
    rcpts = [
        Rcpt(i, a, "local" if control.is_local(a) is not None else "remote", next_try=now)
        for i, a in enumerate(env.recipients)
    ]
    msg = Msg(env, rcpts, has_state=bool(records))
    for record in records:
        if isinstance(record, Bounced):
            msg.bounced = True
            continue
        if not isinstance(record, Attempt) or not 0 <= record.rcpt < len(rcpts):
            continue
        r = rcpts[record.rcpt]
        if r.status in ("done", "failed"):
            continue
        r.result = _result_from(record)
        r.last_try = record.time
        if record.event == "done":
            r.status = "done"
        elif record.event == "failed":
            r.status = "failed"
            r.expired = record.expired
        elif record.event == "deferred":
            r.next_try = max(now, nextretry(env.received, r.last_try, r.channel))
    return msg


@dataclass
class Segment:
    """The messages of one segment file in mess/ that have not ended yet."""

    live: set[str]
    stateful: set[str] = field(default_factory=set)  # ended messages that left state/<id>


class Scheduler:
    """Retries and slots; the attributes are the manager's (``Manager.__init__``)."""

    queue: Queue
    _qroot: str
    log: Callable[[str], None]
    control: Control
    local: LocalDelivery
    remote: RemoteDelivery
    children: Children
    lock: threading.Lock
    msgs: dict[str, Msg]
    heap: list[tuple[float, int, str, int]]
    _seq: int
    ready_local: deque[tuple[str, int]]
    ready_remote: dict[str, deque[tuple[str, list[int]]]]
    remote_workers: dict[str, int]
    busy_local: int
    busy_remote: int
    to_finish: set[str]
    finish_later: dict[str, float]
    segments: dict[str, Segment]
    segments_done: set[str]
    segments_later: dict[str, float]
    stopping: bool
    local_pool: ThreadPoolExecutor
    remote_pool: ThreadPoolExecutor
    body_bytes: int

    def wake(self) -> None:
        """Wake the main loop (``Manager.wake``)."""
        raise NotImplementedError

    def _complete(self, queue_id: str, index: int, result: Result) -> None:
        """Record one outcome (``Finisher._complete``)."""
        raise NotImplementedError

    def _p(self, sub: str, queue_id: str) -> str:
        """``<queue>/<sub>/<id>`` as a string: pathlib costs more than the syscall here."""
        return f"{self._qroot}/{sub}/{queue_id}"

    def _push(self, queue_id: str, r: Rcpt) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (r.next_try, self._seq, queue_id, r.index))

    def retry_all(self) -> None:
        """ALRM: every deferred recipient is due now. The heap is built again, one entry a
        pending recipient, rather than pushed to: a push left the recipient's old entry in
        the heap until its time came (hours), so a flush every minute over many deferred
        recipients piled up millions of stale entries."""
        now = time.time()
        with self.lock:
            self.heap = []
            for queue_id, msg in self.msgs.items():
                for r in msg.rcpts:
                    if r.status == "pending":
                        r.next_try = min(r.next_try, now)
                        self._seq += 1
                        self.heap.append((r.next_try, self._seq, queue_id, r.index))
            heapq.heapify(self.heap)

    def _collect_due(self, now: float) -> None:
        """Move due recipients from the heap to the ready queues (lock held)."""
        while self.heap and self.heap[0][0] <= now:
            when, _, queue_id, index = heapq.heappop(self.heap)
            msg = self.msgs.get(queue_id)
            if msg is None:
                continue
            r = msg.rcpts[index]
            if r.status != "pending" or r.next_try != when:
                continue
            r.status = "busy"
            if r.channel == "local":
                self.ready_local.append((queue_id, index))
                continue
            key = self.remote.key(r.address)
            batch = [index]
            for other in msg.rcpts:  # same message, same destination: one transaction
                if (
                    other.status == "pending"
                    and other.channel == "remote"
                    and self.remote.key(other.address) == key
                    and split_address(other.address)[1] == split_address(r.address)[1]
                ):
                    other.status = "busy"
                    batch.append(other.index)
            self.ready_remote.setdefault(key, deque()).append((queue_id, batch))

    def dispatch(self) -> None:
        if self.stopping:
            return
        with self.lock:
            self._collect_due(time.time())
            idle = self.control.concurrencylocal - self.busy_local
            local = [self.ready_local.popleft() for _ in range(min(idle, len(self.ready_local)))]
            self.busy_local += len(local)
            for key, jobs in self.ready_remote.items():
                self._start_remote(key, jobs)
        for queue_id, index in local:
            self._start_local(queue_id, index)

    def _start_remote(self, key: str, jobs: deque[tuple[str, list[int]]]) -> None:
        """Start workers for one destination's ready jobs (lock held): not more than it has
        jobs waiting, nor than ``concurrencydestination``, so that a destination that is
        dead or slow (each job paying a whole wait per address) leaves the other
        slots of ``concurrencyremote`` to the others."""
        cap = self.control.concurrencydestination
        while (
            jobs
            and self.busy_remote < self.control.concurrencyremote
            and len(jobs) > self.remote_workers.get(key, 0)
            and self.remote_workers.get(key, 0) < cap
        ):
            self.busy_remote += 1
            self.remote_workers[key] = self.remote_workers.get(key, 0) + 1
            try:
                self.remote_pool.submit(self._guard, self._remote_worker, key)
            except RuntimeError as exc:  # no thread to be had: the jobs wait for the next pass
                self.log(f"warning cannot start a remote worker for {one_line(key)}: {exc}")
                self._remote_slot_free(key)
                return

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a bug must not silently eat a delivery slot
            self.log(f"error delivery worker crashed: {named(exc)}")
            raise
        finally:
            self.wake()

    def _job_failed(self, kind: str, queue_id: str, exc: Exception, remote: str) -> Result:
        """The outcome of a job that raised (a bug, or ``MemoryError`` under the run
        script's ``softlimit``): a temporary failure naming the exception, logged. The
        recipients are retried on their schedule, expire and bounce like any other
        deferral, instead of staying busy until pyqmail-send restarts."""
        self.log(f"error {kind} delivery of {queue_id} failed: {named(exc)}")
        return Result.temp(f"{kind} delivery error: {named(exc)} (#4.3.0)", "4.3.0", remote=remote)

    def _settle(self, queue_id: str, index: int, result: Result) -> None:
        """``_complete``, and if even that raises, the recipient is put back to be retried
        on its schedule (not recorded: a duplicate later beats a loss)."""
        try:
            self._complete(queue_id, index, result)
        except Exception as exc:  # noqa: BLE001 - the recipient must leave "busy"
            self.log(f"error cannot record the outcome of {queue_id} {index}: {named(exc)}")
            with self.lock:
                msg = self.msgs.get(queue_id)
                r = None if msg is None else msg.rcpts[index]
                if msg is not None and r is not None and r.status == "busy":
                    r.status = "pending"
                    r.next_try = nextretry(msg.env.received, time.time(), r.channel)
                    self._push(queue_id, r)
            self.wake()

    def _forget(self, queue_id: str) -> None:
        """Drop a finished message (lock held)."""
        self._drop_body(self.msgs.pop(queue_id))

    def _drop_body(self, msg: Msg) -> None:
        """Give back the bytes kept from pickup (lock held)."""
        if msg.body is not None:
            self.body_bytes -= len(msg.body)
            msg.body = None

    def _read_body(self, queue_id: str) -> tuple[Envelope, bytes] | Result:
        msg = self.msgs.get(queue_id)
        body = None if msg is None else msg.body
        if msg is not None and body is not None:
            return msg.env, body  # verified when it was picked up; queue files never change
        if msg is None:
            return Result.temp(f"message {queue_id} is not in the queue (#4.3.0)", "4.3.0")
        try:
            stored = self.queue.read_stored("mess", msg.file, msg.span)
        except QueueError as exc:
            return Result.temp(f"cannot read queued message: {exc} (#4.3.0)", "4.3.0")
        return stored.env, stored.body

    def _outgoing(self, queue_id: str) -> tuple[Envelope, bytes] | Result:
        """The message as every delivery sends it: the DKIM-Signature fields recorded at
        pickup (``pyqmail.queue.state.Signed``), then the queued bytes in the form they were
        signed in (``pyqmail.wirelines``: long lines broken, as remote delivery would). Local
        copies carry them too: a Maildir holds what a remote recipient gets, and a
        ``.qmail`` forward leaves with a signature that still verifies."""
        read = self._read_body(queue_id)
        msg = self.msgs.get(queue_id)
        if isinstance(read, Result) or msg is None or not msg.dkim:
            return read
        return read[0], msg.dkim + wire_lines(read[1])

    def _start_local(self, queue_id: str, index: int) -> None:
        """Run one local job in its slot (``busy_local`` counts it already).

        The job goes to the local child without a thread waiting for it; the answer comes
        back in the link's thread (``_local_done``), which starts the next ready job in the
        same slot. Only when no child runs does a pool thread wait for one (``_local_wait``).
        """
        job: tuple[str, int] | None = (queue_id, index)
        while job is not None:
            queue_id, index = job
            try:
                ended = self._send_local(queue_id, index)
            except Exception as exc:  # noqa: BLE001 - a job's failure, not the slot's
                ended = self._job_failed("local", queue_id, exc, "local")
            if ended is None:
                return
            self._settle(queue_id, index, ended)
            job = self._next_local()
        self.wake()

    def _send_local(self, queue_id: str, index: int) -> Result | None:
        """Hand one local job to the child (or to a pool thread that waits for one): None;
        or the Result it ended with here (its message could not be read)."""
        rcpt = self.msgs[queue_id].rcpts[index]
        read = self._outgoing(queue_id)
        if isinstance(read, Result):
            return read
        env, body = read
        try:
            self.children.local_async(
                env, body, rcpt.address, self.local, self._on_local(queue_id, index)
            )
        except ChildLostError:
            self.local_pool.submit(self._guard, self._local_wait, queue_id, index)
        return None

    def _on_local(self, queue_id: str, index: int) -> Callable[[Result], None]:
        """The callback that takes one local job's outcome."""
        return lambda result: self._local_done(queue_id, index, result)

    def _local_done(self, queue_id: str, index: int, result: Result) -> None:
        """A local job's outcome (the link's thread): record it, go on with the next ready
        job in the same slot; the main loop is woken only when the slot is given back."""
        try:
            self._settle(queue_id, index, result)
        finally:
            job = self._next_local()
            if job is None:
                self.wake()
            else:
                self._start_local(*job)

    def _next_local(self) -> tuple[str, int] | None:
        """The next ready local job for a slot that just ended, or None (slot given back)."""
        with self.lock:
            if not self.stopping and self.ready_local:
                return self.ready_local.popleft()
            self.busy_local -= 1
            return None

    def _local_wait(self, queue_id: str, index: int) -> None:
        """A local job while no child runs: wait for one (``Children.local``) in a pool
        thread; then the slot goes on like any other."""
        try:
            rcpt = self.msgs[queue_id].rcpts[index]
            read = self._outgoing(queue_id)
            if isinstance(read, Result):
                result = read
            else:
                result = self.children.local(read[0], read[1], rcpt.address, self.local)
        except Exception as exc:  # noqa: BLE001 - a bug defers, it never loses mail
            result = self._job_failed("local", queue_id, exc, "local")
        self._local_done(queue_id, index, result)

    def _take_remote(self, key: str) -> tuple[str, list[int]] | None:
        with self.lock:
            jobs = self.ready_remote.get(key)
            if self.stopping or not jobs:
                return None
            return jobs.popleft()

    def _remote_worker(self, key: str) -> None:
        """Take jobs for one destination until none is ready, over one connection that the
        remote child keeps (and reopens when it broke). The slot is given back whatever
        happens to a job."""
        session = self.children.session()
        try:
            while (job := self._take_remote(key)) is not None:
                self._remote_job(session, key, *job)
        finally:
            try:
                session.close()
            finally:
                with self.lock:
                    self._remote_slot_free(key)

    def _remote_job(
        self, session: RemoteHandle, key: str, queue_id: str, indexes: list[int]
    ) -> None:
        """One message to one destination; when no connection could be made there, the
        jobs waiting for that destination are deferred with the same failure (below)."""
        try:
            read = self._outgoing(queue_id)
            if isinstance(read, Result):
                results = [read] * len(indexes)
            else:
                addresses = [self.msgs[queue_id].rcpts[i].address for i in indexes]
                results = session.deliver(key, read[0], read[1], addresses)
        except Exception as exc:  # noqa: BLE001 - a job's failure, not the slot's
            results = [self._job_failed("remote", queue_id, exc, key)] * len(indexes)
        waiting: list[tuple[str, list[int]]] = []
        try:
            waiting = self._take_unreachable(key, results)
        finally:
            for i, result in zip(indexes, results, strict=True):
                self._settle(queue_id, i, result)
        for other, others in waiting:
            for i in others:
                self._settle(other, i, results[0])

    def _take_unreachable(self, key: str, results: list[Result]) -> list[tuple[str, list[int]]]:
        """The jobs ready for ``key`` when its delivery found no connection to be had
        (``unreachable``), taken from the ready queue: each would pay the same timeouts
        on every address again, holding a slot for minutes, and fail the same way. They
        get that failure instead, as Postfix defers a dead destination's queue. Only the
        jobs ready now: one that becomes due later goes to remote delivery, whose memory
        of silent addresses (tcpto) fails it at once while they rest, and tries them
        again when they have."""
        if not results or not all(unreachable(r) for r in results):
            return []
        with self.lock:
            jobs = self.ready_remote.get(key)
            waiting = list(jobs) if jobs else []
            if jobs:
                jobs.clear()
        if waiting:
            self.log(
                f"status no connection to {one_line(key)}: {len(waiting)} more job(s) "
                f"deferred without an attempt: {one_line(results[0].detail)}"
            )
        return waiting

    def _remote_slot_free(self, key: str) -> None:
        """A remote worker of ``key`` ended (lock held)."""
        self.busy_remote -= 1
        self.remote_workers[key] -= 1
        if not self.remote_workers[key]:
            del self.remote_workers[key]
            if not self.ready_remote.get(key, True):
                del self.ready_remote[key]
