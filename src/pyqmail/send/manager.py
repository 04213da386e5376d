"""pyqmail-send: the queue manager (qmail-send), driving local and remote delivery.

Pickup protocol (new/ -> mess/): on start, on ALRM, and whenever the trigger FIFO is poked,
every file in ``new/`` is verified (``parse_file``: header and END trailer of each message,
and a segment's record count; a torn file goes to ``bad/``), renamed into ``mess/``, and
``mess/`` then ``new/`` are fsynced once per batch before any delivery of those messages
starts. A crash before the fsyncs leaves the file in ``new/`` (or already in ``mess/``):
either way it is picked up again; nothing was delivered yet. Once both are fsynced the name
is gone from ``new/`` for good, so a message cannot come back there after it was delivered.

The pickup is also what takes a message away from pyqmail-smtpd: ``mess/`` and ``state/``
are pyqmail-send's alone (mode 0700; see "Permissions" in ``pyqmail.queue.store``). A file
pyqmail-smtpd wrote stays its own (pyqmail-send cannot chown it), but from ``mess/`` on no
path leads to it.

Delivery state (``state/<id>``, owned by pyqmail-send): one JSON object per line, appended::

    {"ev": "done", "rcpt": 0, "t": 1700000000.0, "detail": "..."}
    {"ev": "failed", "rcpt": 1, "t": ..., "status": "5.1.1", "detail": "...", "remote": "...",
     "diag": "smtp; 550 ...", "expired": false}
    {"ev": "deferred", "rcpt": 2, "t": ..., "status": "4.4.1", "detail": "...", "remote": "..."}
    {"ev": "bounced", "t": ..., "bounce": "<queue id of the DSN, or empty when dropped>"}

``rcpt`` indexes the ``to`` lines of the queue file. A missing state file means nothing has
happened yet. Durability protocol: a ``done``/``failed``/``bounced`` line is appended only
after the delivery (Maildir fsync, remote 250, or DSN enqueue) is itself durable, and the
append is fdatasync'ed (the first append also fsyncs ``state/``) before anyone relies on it.
So after kill -9: a recipient recorded done is never delivered again; one that is not is
delivered again (a possible duplicate, never a loss). ``deferred`` lines are advisory (last
error and retry schedule for ``pyqmail-queue``); a torn last line (no LF) is ignored.

When every recipient is done or failed: the DSN is queued if anything failed (see
``pyqmail.send.bounce``) and ``bounced`` recorded; then ``mess/<id>`` is unlinked,
``mess/`` fsynced, and only then ``state/<id>`` unlinked (a state file without its message is
removed on start).

Segments (several messages in one file ``mess/<segment id>``, see ``pyqmail.queue.store``): a
finished message of a segment cannot be unlinked on its own, so its end is recorded instead
as a line ``{"ev": "end", "id": "<queue id>"}`` appended to ``state/<segment id>``, and on
start the messages listed there are skipped. That line is written without fsync, exactly
like the unlink that ends a message of its own: after kill -9 it is in the page cache; a
power loss can lose it, and then the message is delivered again (a duplicate, never a loss).
When every message of a segment has ended, ``mess/<segment id>`` is unlinked, ``mess/``
fsynced, and then the state files of its messages and ``state/<segment id>`` are unlinked.
The last recipient of a message that failed nowhere gets no ``done`` line: removing
``mess/<id>`` records it (a crash in between delivers it again: a duplicate, as for any
delivered-but-unrecorded recipient). A message that never needed a state file (every
recipient done at the first attempt, or only its last one pending) is unlinked by the worker
that finished it, without an fsync: a crash that undoes the unlink only causes duplicates.

Scheduling: each recipient is retried on qmail's schedule, ``birth + (sqrt(last - birth) +
c)^2`` seconds with c = 10 (local) or 20 (remote), until ``queuelifetime``; after that a
temporary failure becomes permanent (bounce, Status 4.4.7). At most ``concurrencylocal``
local deliveries and ``concurrencyremote`` SMTP connections run at once; a remote worker
keeps its connection and takes the next ready job for the same destination.

Signals: ALRM retries every deferred recipient now (and rescans ``new/``), HUP reloads the
control files, TERM stops starting deliveries, waits for those in flight, exits 0.
``--check`` loads the configuration (control files, clientcert.pem, tlshosts pins, queue
layout) and exits 0 or 111 without touching the queue (used before ``svc -h``/``svc -t``).
The process holds an exclusive lock on ``<queue>/lock/sendpid`` (which holds its pid);
``pyqmail-queue flush`` sends ALRM to that pid.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import heapq
import math
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyqmail.privs import Identity, PrivilegeError, become, resolve
from pyqmail.queue.format import Envelope, QueueError, Stored
from pyqmail.queue.state import (
    Attempt,
    Bounced,
    Record,
    append_end,
    append_state,
    ended_messages,
    read_state,
)
from pyqmail.queue.store import PIDFILE, Queue, fsync_dir
from pyqmail.send.bounce import Failure, bounce_target, make_dsn
from pyqmail.send.delivery import Control, ControlError, Result, one_line, split_address
from pyqmail.send.local import LocalDelivery
from pyqmail.send.mx import Resolver
from pyqmail.send.remote import RemoteDelivery
from pyqmail.send.spawn import Children, stop_children
from pyqmail.tls import TLSConfigError, client_context

CHANSKIP = {"local": 10, "remote": 20}
CLEAN_TMP_EVERY = 3600.0
BODY_CACHE = 16 * 1024 * 1024  # bytes of messages kept from pickup for their first delivery
MAX_SLEEP = 60.0


def nextretry(birth: float, last: float, channel: str) -> float:
    """qmail-send's retry schedule."""
    n = math.isqrt(int(last - birth)) if last > birth else 0
    n += CHANSKIP[channel]
    return birth + n * n


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
    has_state: bool = False  # state/<id> exists (or may): deleting needs the careful order
    lock: threading.Lock = field(default_factory=threading.Lock)
    body: bytes | None = None  # kept from the pickup read (BODY_CACHE bounds them all)

    @property
    def finished(self) -> bool:
        return all(r.status in ("done", "failed") for r in self.rcpts)


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


# -- the manager ------------------------------------------------------------------------


class Log:
    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()


class Manager:
    def __init__(
        self,
        root: Path,
        log: Log | None = None,
        resolver: Resolver | None = None,
        children: Children | None = None,
    ) -> None:
        """``children``: the delivery children's spawners, forked by ``main`` before it
        dropped privileges; started here (same uid) when not given."""
        self.root = root
        self.queue = Queue(root / "queue")
        self.queue.check()
        self._qroot = str(self.queue.root)
        self.log = log or Log()
        self.control = Control.load(root)
        self.resolver = resolver
        self._deliverers()
        self.lock = threading.Lock()
        self.msgs: dict[str, Msg] = {}
        self.heap: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self.ready_local: deque[tuple[str, int]] = deque()
        self.ready_remote: dict[str, deque[tuple[str, list[int]]]] = {}
        self.remote_workers: dict[str, int] = {}
        self.busy_local = 0
        self.busy_remote = 0
        self.to_finish: set[str] = set()
        self.segments: dict[str, Segment] = {}
        self.segments_done: set[str] = set()  # every message ended: remove the file
        self.stopping = False
        self.status = 0  # exit status of run()
        self.flags: set[str] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # threads are made on demand; the limits are enforced by busy_* so HUP can change them
        self.local_pool = ThreadPoolExecutor(1000, "local")
        self.remote_pool = ThreadPoolExecutor(1000, "remote")
        self._last_clean = 0.0
        self.body_bytes = 0  # held in Msg.body, at most BODY_CACHE
        self.children = children or Children.start(resolver)
        self.children.connect(self.control, self.log, self.wake)
        weakref.finalize(self, stop_children, self.children)

    def _p(self, sub: str, queue_id: str) -> str:
        """``<queue>/<sub>/<id>`` as a string: pathlib costs more than the syscall here."""
        return f"{self._qroot}/{sub}/{queue_id}"

    def _deliverers(self) -> None:
        self.local = LocalDelivery(self.control, self.queue)
        self.remote = RemoteDelivery(self.control, self.resolver)

    # -- waking ---------------------------------------------------------------------
    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._wake_w, b"\0")

    def _signal(self, signum: int, frame: object) -> None:
        del frame
        names = {int(signal.SIGALRM): "alrm", int(signal.SIGHUP): "hup"}
        self.flags.add(names.get(signum, "term"))

    # -- loading --------------------------------------------------------------------
    def startup(self) -> None:
        self._clean_tmp()
        keep: set[str] = set()  # state files that belong to something in mess/
        loaded: list[tuple[str, list[Stored], set[str]]] = []
        for name in self.queue.ids("mess"):
            try:
                stored = self.queue.load("mess", name)
            except QueueError as exc:
                self._quarantine("mess", name, exc)
                continue
            ended = set()
            if stored[0].span is not None:
                ended = ended_messages(Path(self._p("state", name)))
            keep.add(name)
            keep.update(s.env.queue_id for s in stored)
            loaded.append((name, stored, ended))
        for name in self.queue.ids("state"):
            if name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(self.queue.path("state", name))
                self.log(f"status removed orphan state {name}")
        for name, stored, ended in loaded:
            live = [s for s in stored if s.env.queue_id not in ended]
            if stored[0].span is not None:
                segment = Segment({s.env.queue_id for s in live})
                # an ended message may have left a state file: remove it with the segment
                segment.stateful = {s.env.queue_id for s in stored} - segment.live
                self.segments[name] = segment
                if not live:
                    self.segments_done.add(name)
            for s in live:
                records = read_state(Path(self._p("state", s.env.queue_id)))
                self._add(name, s, records)
        self.pickup()

    def _quarantine(self, sub: str, name: str, exc: QueueError) -> None:
        if not self.queue.path(sub, name).exists():
            return  # gone meanwhile (or unreadable for another reason: logged by the caller)
        with contextlib.suppress(OSError):
            self.queue.quarantine(sub, name)
        if sub == "mess":
            with contextlib.suppress(OSError):
                os.unlink(self.queue.path("state", name))
        self.log(f"warning quarantined {name} to bad/: {one_line(str(exc))}")

    def _clean_tmp(self) -> None:
        """Remove what crashed writers left in tmp/ (qmail-send does this too)."""
        self._last_clean = time.monotonic()
        try:
            removed = self.queue.clean_tmp()
        except OSError as exc:
            self.log(f"warning cannot clean {self.queue.path('tmp')}: {exc}")
            return
        if removed:
            self.log(f"status cleaned {len(removed)} stale tmp files")

    def _add(self, name: str, stored: Stored, records: list[Record]) -> Msg:
        """Schedule one message of ``mess/<name>`` with the progress its records show."""
        env = stored.env
        queue_id = env.queue_id
        msg = load_msg(env, records, self.control, time.time())
        msg.file, msg.span = name, stored.span
        with self.lock:
            self.msgs[queue_id] = msg
            for r in msg.rcpts:
                if r.status == "pending":
                    self._push(queue_id, r)
            if msg.finished:
                self.to_finish.add(queue_id)
        return msg

    def pickup(self) -> int:
        """Move verified files from new/ to mess/ and schedule their messages."""
        moved: list[tuple[str, list[Stored]]] = []
        count = 0
        for name in self.queue.ids("new"):
            try:
                stored = self.queue.load("new", name)
            except QueueError as exc:
                self._quarantine("new", name, exc)
                continue
            try:
                os.rename(self._p("new", name), self._p("mess", name))
            except OSError as exc:
                self.log(f"warning cannot move {name} to mess/: {exc}")
                continue
            moved.append((name, stored))
            for s in stored:
                env = s.env
                count += 1
                self.log(
                    f"new msg {env.queue_id} from=<{one_line(env.sender)}> "
                    f"rcpts={len(env.recipients)} size={env.size}"
                    + (f" segment={name}" if s.span is not None else "")
                )
        if moved:
            fsync_dir(self.queue.path("mess"))
            fsync_dir(self.queue.path("new"))
            for name, stored in moved:
                if stored[0].span is not None:
                    with self.lock:
                        self.segments[name] = Segment({s.env.queue_id for s in stored})
                for s in stored:
                    # a message just picked up from new/ cannot have a state file yet
                    msg = self._add(name, s, [])
                    with self.lock:  # the first delivery need not read the file again
                        if self.body_bytes + len(s.body) <= BODY_CACHE:
                            msg.body = s.body
                            self.body_bytes += len(s.body)
        return count

    def _push(self, queue_id: str, r: Rcpt) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (r.next_try, self._seq, queue_id, r.index))

    # -- dispatch -------------------------------------------------------------------
    def retry_all(self) -> None:
        now = time.time()
        with self.lock:
            for queue_id, msg in self.msgs.items():
                for r in msg.rcpts:
                    if r.status == "pending" and r.next_try > now:
                        r.next_try = now
                        self._push(queue_id, r)

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
            for _ in range(min(idle, len(self.ready_local))):
                self.busy_local += 1
                self.local_pool.submit(self._guard, self._local_worker)
            for key, jobs in self.ready_remote.items():
                while (
                    jobs
                    and self.busy_remote < self.control.concurrencyremote
                    and len(jobs) > self.remote_workers.get(key, 0)
                ):
                    self.busy_remote += 1
                    self.remote_workers[key] = self.remote_workers.get(key, 0) + 1
                    self.remote_pool.submit(self._guard, self._remote_worker, key)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a bug must not silently eat a delivery slot
            self.log(f"error delivery worker crashed: {type(exc).__name__}: {one_line(str(exc))}")
            raise
        finally:
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

    def _local_worker(self) -> None:
        """Take local jobs until none is ready (one of concurrencylocal workers)."""
        try:
            while True:
                with self.lock:
                    if self.stopping or not self.ready_local:
                        return
                    queue_id, index = self.ready_local.popleft()
                self._local_job(queue_id, index)
        finally:
            with self.lock:
                self.busy_local -= 1

    def _local_job(self, queue_id: str, index: int) -> None:
        rcpt = self.msgs[queue_id].rcpts[index]
        read = self._read_body(queue_id)
        if isinstance(read, Result):
            result = read
        else:
            try:
                result = self.children.local(read[0], read[1], rcpt.address, self.local)
            except Exception as exc:  # noqa: BLE001 - a bug defers, it never loses mail
                result = Result.temp(f"local delivery error: {exc} (#4.3.0)", "4.3.0")
        self._complete(queue_id, index, result)

    def _take_remote(self, key: str) -> tuple[str, list[int]] | None:
        with self.lock:
            jobs = self.ready_remote.get(key)
            if self.stopping or not jobs:
                return None
            return jobs.popleft()

    def _remote_worker(self, key: str) -> None:
        """Take jobs for one destination until none is ready, over one connection that the
        remote child keeps (and reopens when it broke)."""
        session = self.children.session()
        try:
            while (job := self._take_remote(key)) is not None:
                queue_id, indexes = job
                msg = self.msgs[queue_id]
                addresses = [msg.rcpts[i].address for i in indexes]
                read = self._read_body(queue_id)
                if isinstance(read, Result):
                    results = [read] * len(indexes)
                else:
                    results = session.deliver(key, read[0], read[1], addresses)
                for i, result in zip(indexes, results, strict=True):
                    self._complete(queue_id, i, result)
        finally:
            session.close()
            with self.lock:
                self.busy_remote -= 1
                self.remote_workers[key] -= 1
                if not self.remote_workers[key]:
                    del self.remote_workers[key]
                    if not self.ready_remote.get(key, True):
                        del self.ready_remote[key]

    # -- completion -----------------------------------------------------------------
    def _complete(self, queue_id: str, index: int, result: Result) -> None:
        msg = self.msgs[queue_id]
        r = msg.rcpts[index]
        now = time.time()
        expired = False
        if result.kind == "temp" and now >= msg.env.received + self.control.queuelifetime:
            expired = True
        event = {"ok": "done", "perm": "failed", "temp": "deferred"}[result.kind]
        if expired:
            event = "failed"
        record = Attempt(
            event,  # type: ignore[arg-type]
            index,
            round(now, 3),
            one_line(result.detail, 1000),
            result.status,
            result.remote,
            result.diagnostic,
            expired,
        )
        with self.lock:  # the last recipient of a clean message needs no record: see finish()
            last = event == "done" and all(o.status == "done" for o in msg.rcpts if o is not r)
        state_error = ""
        if not last:
            with msg.lock:
                msg.has_state = True
                try:
                    append_state(
                        Path(self._p("state", queue_id)), record, durable=event != "deferred"
                    )
                except OSError as exc:
                    state_error = str(exc)
        self.log(
            f"delivery {queue_id} {index} to=<{one_line(r.address)}> "
            f"result={'expired' if expired else event} host={one_line(result.remote)} "
            f"tls={result.tls} verified={result.verified} detail={one_line(result.detail)}"
        )
        clean = wake = False
        with self.lock:
            r.last_try = now
            r.result = result
            if state_error:
                # not recorded: treat as not done (a duplicate later beats a loss)
                self.log(f"warning cannot record state of {queue_id}: {state_error}")
                r.status = "pending"
                r.next_try = nextretry(msg.env.received, now, r.channel)
                self._push(queue_id, r)
                wake = True
            elif event == "deferred":
                r.status = "pending"
                r.next_try = nextretry(msg.env.received, now, r.channel)
                self._push(queue_id, r)
                wake = True  # the main loop's sleep may now be too long
                self._drop_body(msg)  # it may wait for days: read it again then
            else:
                r.status = event
                r.expired = expired
                if msg.finished:
                    if msg.has_state or any(o.status == "failed" for o in msg.rcpts):
                        self.to_finish.add(queue_id)
                        wake = True
                    else:
                        self._forget(queue_id)  # clean and stateless: finished right here
                        clean = True
        if clean:
            self._delete_clean(queue_id, msg)
        if wake:
            self.wake()

    def _delete_clean(self, queue_id: str, msg: Msg) -> None:
        """Remove a message delivered everywhere that has no state file.

        No fsync: if a crash undoes the unlink, the message is delivered again (nothing
        was recorded done), which is the same window qmail has. Runs in the worker, so
        the main loop never waits on the file system for it. A message of a segment is
        ended by a line in the segment's state file instead (``_end_in_segment``).
        """
        if not self._end_message(queue_id, msg):
            with self.lock:  # let finish() retry the careful way
                msg.has_state = True
                self.msgs[queue_id] = msg
                self.to_finish.add(queue_id)
            self.wake()
            return
        self.log(f"end msg {queue_id}")

    def _remove_mess(self, name: str) -> bool:
        """Unlink mess/<name> (a message's file or a segment); False, logged, if it stays."""
        try:
            os.unlink(self._p("mess", name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log(f"warning cannot remove mess/{name}: {exc}")
            return False
        return True

    def _end_message(self, queue_id: str, msg: Msg) -> bool:
        """A finished message leaves the queue: its file goes, or, in a segment, its end is
        recorded. False, logged, if that failed (the message stays and is tried again)."""
        if msg.span is None:
            return self._remove_mess(queue_id)
        try:
            self._end_in_segment(queue_id, msg)
        except OSError as exc:
            self.log(f"warning cannot record the end of {queue_id} in state/{msg.file}: {exc}")
            return False
        return True

    def _end_in_segment(self, queue_id: str, msg: Msg) -> None:
        """Record the end of a message that lives in a segment (any thread); once every
        message of the segment has ended, ``finish`` removes the file."""
        append_end(self._p("state", msg.file), queue_id)
        with self.lock:
            segment = self.segments[msg.file]
            segment.live.discard(queue_id)
            if msg.has_state:
                segment.stateful.add(queue_id)
            if segment.live:
                return
            self.segments_done.add(msg.file)
        self.wake()

    def finish(self) -> None:
        """Bounce and delete messages whose recipients are all done or failed; remove
        segments whose messages have all ended."""
        with self.lock:
            ids, self.to_finish = sorted(self.to_finish), set()
        unlinked: list[str] = []
        ended: list[str] = []  # messages of segments: their state files stay for now
        for queue_id in ids:
            msg = self.msgs[queue_id]
            failures = [
                Failure(r.address, r.result or Result.perm("failed"), r.last_try, r.expired)
                for r in msg.rcpts
                if r.status == "failed"
            ]
            if failures and not msg.bounced and not self._bounce(queue_id, msg, failures):
                with self.lock:  # try again at the next loop
                    self.to_finish.add(queue_id)
                continue
            if self._end_message(queue_id, msg):
                (unlinked if msg.span is None else ended).append(queue_id)
        for queue_id in ended:
            with self.lock:
                self._forget(queue_id)
            self.log(f"end msg {queue_id}")
        with self.lock:
            segments, self.segments_done = sorted(self.segments_done), set()
        removed = [name for name in segments if self._remove_mess(name)]
        if unlinked or removed:
            fsync_dir(self.queue.path("mess"))
        for queue_id in unlinked:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.queue.path("state", queue_id))
            with self.lock:
                self._forget(queue_id)
            self.log(f"end msg {queue_id}")
        for name in removed:
            with self.lock:
                segment = self.segments.pop(name)
            for queue_id in sorted(segment.stateful):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.queue.path("state", queue_id))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.queue.path("state", name))
            self.log(f"end segment {name}")

    def _bounce(self, queue_id: str, msg: Msg, failures: list[Failure]) -> bool:
        target = bounce_target(msg.env, self.control)
        bounce_id = ""
        if target is None:
            why = (
                "a failed double bounce"
                if msg.env.sender
                else "doublebounceto is empty: double bounce"
            )
            self.log(f"bounce msg {queue_id} dropped: {why} (qmail drops these)")
        else:
            read = self._read_body(queue_id)
            if isinstance(read, Result):
                self.log(f"warning cannot bounce {queue_id}: {read.detail}")
                return False
            dsn = make_dsn(msg.env, read[1], failures, target=target, control=self.control)
            try:
                bounce_env = self.queue.enqueue(
                    target.sender, [target.recipient], dsn, {"bounce_of": queue_id}
                )
            except QueueError as exc:
                self.log(f"warning cannot queue bounce for {queue_id}: {exc}")
                return False
            bounce_id = bounce_env.queue_id
            kind = "double bounce" if target.double else "bounce"
            self.log(f"bounce msg {queue_id} {kind} qp {bounce_id} to=<{target.recipient}>")
        try:
            with msg.lock:
                append_state(
                    self.queue.path("state", queue_id),
                    Bounced(round(time.time(), 3), bounce_id),
                )
        except OSError as exc:
            self.log(f"warning cannot record bounce of {queue_id}: {exc}")
            return False
        msg.bounced = True
        return True

    # -- main loop ------------------------------------------------------------------
    def _sleep_time(self) -> float:
        with self.lock:
            if self.to_finish:
                return 0.0
            if not self.heap:
                return MAX_SLEEP
            return max(0.0, min(MAX_SLEEP, self.heap[0][0] - time.time()))

    def _handle_flags(self) -> None:
        flags, self.flags = self.flags, set()
        if self.children.lost and not self.stopping:
            self.stopping = True
            self.status = 111
            kinds = ", ".join(self.children.lost)
            self.log(f"error {kinds} spawner lost: finishing deliveries in flight, then exiting")
        if "term" in flags and not self.stopping:
            self.stopping = True
            self.log("status TERM: finishing deliveries in flight, then exiting")
        if "hup" in flags:
            try:
                self.control = Control.load(self.root)
                self._deliverers()
                self.children.configure(self.control)
                self.log("status HUP: control files reloaded")
            except ControlError as exc:
                self.log(f"warning HUP: keeping the old control files: {exc}")
        if "alrm" in flags:
            self.log("status ALRM: retrying every deferred recipient now")
            self.pickup()
            self.retry_all()

    def run(self) -> int:
        trigger = self.queue.root / "lock" / "trigger"
        try:
            fifo = os.open(trigger, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            keep = os.open(trigger, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # no EOF spin
        except OSError as exc:
            raise SystemExit(
                f"pyqmail-send: cannot open trigger {trigger}: {exc.strerror}"
            ) from None
        for signum in (signal.SIGALRM, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signal)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.log(f"status pyqmail-send started, pid {os.getpid()}, root {self.root}")
        self.startup()
        try:
            while True:
                self._handle_flags()
                if self.stopping:
                    with self.lock:
                        idle = self.busy_local == 0 and self.busy_remote == 0
                    if idle:
                        self.finish()
                        break
                else:
                    self.finish()
                    self.dispatch()
                    if time.monotonic() - self._last_clean > CLEAN_TMP_EVERY:
                        self._clean_tmp()
                timeout = 1.0 if self.stopping else self._sleep_time()
                if self.flags or (self.children.lost and not self.stopping):
                    timeout = 0.0
                ready, _, _ = select.select([fifo, self._wake_r], [], [], timeout)
                if self._wake_r in ready:
                    _drain(self._wake_r)
                if fifo in ready:
                    _drain(fifo)
                    if not self.stopping:
                        self.pickup()
        finally:
            self.local_pool.shutdown(wait=True)
            self.remote_pool.shutdown(wait=True)
            self.children.close()
            os.close(fifo)
            os.close(keep)
        self.log("status pyqmail-send exiting")
        return self.status


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while len(os.read(fd, 65536)) == 65536:
            pass


# -- process set-up ---------------------------------------------------------------------


def drop_privileges(user: str | None) -> None:
    """Become ``user`` (when root); refuse to handle mail as root unless asked explicitly."""
    if user is None:
        if os.geteuid() == 0:
            raise SystemExit(
                "pyqmail-send: refusing to run as root; pass --user pyqmails (or --user root "
                "to insist)"
            )
        return
    who = _identity(user, "--user")
    if os.geteuid() == 0 and who.uid == 0:
        sys.stderr.write("pyqmail-send: warning: delivering mail as root (--user root)\n")
        return
    try:
        become(who)
    except PrivilegeError as exc:
        raise SystemExit(f"pyqmail-send: {exc}") from None


def _identity(spec: str, option: str) -> Identity:
    """``spec`` resolved (a name or uid:gid); exits naming the option when it is unknown."""
    try:
        who = resolve(spec, option)
    except PrivilegeError as exc:
        raise SystemExit(f"pyqmail-send: {exc}") from None
    if os.geteuid() != 0 and who.uid != os.geteuid():
        raise SystemExit(f"pyqmail-send: {option} {spec} needs root; running as uid {os.geteuid()}")
    return who


def child_users(args: argparse.Namespace) -> dict[str, Identity | None]:
    """Who the remote and local delivery children run as: their options, else ``--user``
    (None: stay as started, when no user is named and we are not root)."""
    default = args.user
    users: dict[str, Identity | None] = {}
    for kind, given in (("remote", args.remote_user), ("local", args.local_user)):
        spec = given or default
        option = f"--{kind}-user" if given else "--user"
        users[kind] = None if spec is None else _identity(spec, option)
    return users


def lock_pidfile(queue_root: Path) -> int:
    """Exclusive lock on lock/sendpid holding our pid; exits if another instance runs."""
    path = queue_root / PIDFILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SystemExit(f"pyqmail-send: cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise SystemExit(
                f"pyqmail-send: another pyqmail-send is running on {queue_root} (pid {other})"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_config(root: Path) -> int:
    """``--check``: load what pyqmail-send reads, touch nothing; 0 = usable, 111 = not.

    The queue layout, the control files (``Control.load``), ``control/clientcert.pem`` and
    every ``control/tlshosts/*.pem`` pin (each loaded into a TLS context as a delivery
    would). Every problem is printed on stderr, one line each.
    """
    problems: list[str] = []
    try:
        Queue(root / "queue").check()
    except QueueError as exc:
        problems.append(str(exc))
    try:
        control = Control.load(root)
    except ControlError as exc:
        problems.append(str(exc))
        control = None
    control_dir = root / "control"
    clientcert = control_dir / "clientcert.pem"
    tls_files = [clientcert] if clientcert.exists() else []
    tls_files += sorted((control_dir / "tlshosts").glob("*.pem"))
    for path in tls_files:
        try:
            if path == clientcert:
                client_context(verify=False, certfile=path)
            else:
                client_context(verify=True, cafile=path)
        except TLSConfigError as exc:
            problems.append(str(exc))
    for problem in problems:
        sys.stderr.write(f"pyqmail-send: {problem}\n")
    if problems or control is None:
        return 111
    sys.stdout.write(
        f"pyqmail-send: configuration of {root} OK: me {control.me}, "
        f"{len(control.locals)} local domain(s), {len(control.routes)} route(s), "
        f"{len(tls_files)} TLS file(s)\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pyqmail-send", description="queue manager: local and remote delivery"
    )
    parser.add_argument("--root", default="/var/qmail", help="qmail root (default /var/qmail)")
    parser.add_argument("--user", help="user of the queue manager when started as root (pyqmails)")
    parser.add_argument(
        "--remote-user",
        help="user of the remote delivery child (pyqmailr; default: --user); NAME or UID:GID",
    )
    parser.add_argument(
        "--local-user",
        help="user of the local delivery child, owner of the mailboxes (pyqmailv; default: "
        "--user); NAME or UID:GID",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="load the control files, clientcert.pem and the tlshosts pins (as --user when "
        "given), check the queue layout, then exit: 0 = usable, 111 = not (reasons on stderr)",
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.check:
        if args.user is not None:
            drop_privileges(args.user)  # the files must be readable by the delivery user
        return check_config(root)
    if args.user is None and os.geteuid() == 0:
        drop_privileges(None)  # refuses
    children = Children.start(None, child_users(args))  # forked while still root
    try:
        drop_privileges(args.user)
        try:
            manager = Manager(root, children=children)
        except (ControlError, QueueError) as exc:
            sys.stderr.write(f"pyqmail-send: {exc}\n")
            return 111
        pid_fd = lock_pidfile(manager.queue.root)
        try:
            return manager.run()
        finally:
            os.close(pid_fd)
    finally:
        children.close()


if __name__ == "__main__":
    sys.exit(main())
