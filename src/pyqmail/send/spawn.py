"""Privilege separation of pyqmail-send: the delivery children and their spawners.

qmail splits delivery into mutually untrusting programs (qmail-rspawn/qmail-remote as
``qmailr``, qmail-lspawn/qmail-local as the mailbox owner) so that the code parsing remote
servers' replies cannot touch the queue or a mailbox. pyqmail-send does the same with
processes:

==================  ===================  ================================================
process             runs as              may
==================  ===================  ================================================
queue manager       ``--user``           queue (new/ mess/ state/ bounces, forwards)
                    (pyqmails)
remote spawner      ``--remote-user``    fork remote children
remote child        (pyqmailr)           SMTP out; reads ``control/clientcert.pem`` (through
                                         its group) and ``control/tlshosts/*.pem`` (public)
local spawner       ``--local-user``     fork local children
local child         (pyqmailv)           write the Maildirs; read users/, alias/, ``.qmail``
==================  ===================  ================================================

Started as root, ``pyqmail-send`` forks the two spawners first; each drops to its user for
good (``pyqmail.privs``), then the manager drops to its own. Nothing else of the control
directory is read by a child: the manager sends the loaded control files (``Control``, with
the relays' passwords of ``smtproutes-auth``, which stays readable by the manager alone) over
the channel, at start and after each HUP. A child never sees the queue: each job carries the
message's bytes, and its answer is a result (or, for a local delivery that forwards, what to
forward: the manager queues it). The frames are described in ``pyqmail.send.child``; the
manager checks every field of an answer (``parse_result``) and trusts nothing else from it.

A spawner is single-threaded and does one thing: fork a child, pass the manager its end of a
new socket pair (``SCM_RIGHTS`` over the spawner's control socket), wait for the child to
end, fork the next one (at most one a second). A child serves many jobs at once (a thread
each, as many as ``concurrencylocal``/``concurrencyremote`` let the manager start). When a
child dies (kill -9), every job it had in flight comes back to the manager as a temporary
failure (retried on the usual schedule; a delivery that was done but not yet answered is
delivered again: a duplicate, never a loss) and the manager takes the next child's socket.
When a spawner dies, the manager stops (as on TERM) and exits 111 for supervise to restart
it. Children and spawners die with their parent (``PR_SET_PDEATHSIG``) and end by themselves
when the manager closes their socket.

Not started as root (tests, or ``--user`` equal to the running user), the children are still
separate processes, under the same uid.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import json
import os
import pickle
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from pyqmail.control.send import Control
from pyqmail.privs import Identity, become
from pyqmail.queue.format import Envelope
from pyqmail.send import child
from pyqmail.send.child import (
    MAX_DETAIL,
    MAX_REPLY,
    ChannelClosedError,
    FrameReader,
    send_frame,
)
from pyqmail.send.delivery import Result, named, split_address
from pyqmail.send.local import Forward, LocalDelivery
from pyqmail.send.mx import Resolver

KINDS = ("remote", "local")
CHILD_WAIT = 10.0  # seconds a job waits for a child that is being restarted
RESPAWN_PAUSE = 1.0  # a child that lived less than this is not restarted sooner
PR_SET_PDEATHSIG = 1
_RESULT_KEYS = ("kind", "detail", "status", "remote", "diagnostic", "tls", "verified")


class ChildLostError(Exception):
    """No child answered (it died, or its spawner did)."""


def _pdeathsig(parent: int) -> None:
    """Die with SIGKILL when the parent dies; exit now if it already did."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def _only_fds(keep: int) -> None:
    """Close every inherited descriptor but stdin/out/err and ``keep``; the objects that
    held them are frozen (``gc.freeze``) so that no finalizer closes a reused number."""
    gc.freeze()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def _quiet_signals() -> None:
    """Signals meant for the manager (a terminal's ^C, stray HUP/ALRM) do not stop children."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)


def _say(text: str) -> None:
    """A line on stderr without Python's stream objects (their locks may be held)."""
    with contextlib.suppress(OSError):
        os.write(2, f"pyqmail-send: {text}\n".encode(errors="replace"))


def _spawner(
    ctl: socket.socket, kind: str, who: Identity | None, resolver: Resolver | None, manager: int
) -> None:
    """The spawner's life (in the forked process): drop, then fork children until the
    manager closes the control socket."""
    _only_fds(ctl.fileno())
    _quiet_signals()
    if who is not None:
        become(who)
    _pdeathsig(manager)
    me = os.getpid()
    while True:
        mine, theirs = socket.socketpair()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            ctl.close()
            mine.close()
            _child(theirs, kind, resolver, me)
        theirs.close()
        try:
            socket.send_fds(ctl, [str(pid).encode()], [mine.fileno()])
        except OSError:
            return
        finally:
            mine.close()
        if not _wait_child(ctl, pid):
            return
        if time.monotonic() - started < RESPAWN_PAUSE:
            time.sleep(RESPAWN_PAUSE)


def _child(sock: socket.socket, kind: str, resolver: Resolver | None, spawner: int) -> NoReturn:
    """A delivery child's life (in the process the spawner forked): serve, then leave."""
    try:
        _pdeathsig(spawner)
        child.serve(sock, kind, resolver)
    except BaseException as exc:  # noqa: BLE001 - report, then leave without cleanup
        _say(f"{kind} delivery child failed: {type(exc).__name__}: {exc}")
        os._exit(111)
    os._exit(0)


def _wait_child(ctl: socket.socket, pid: int) -> bool:
    """Wait for the child to end (True: start another) or the manager to go (False)."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([ctl.fileno(), pidfd], [], [])
        if ctl.fileno() not in ready:  # the manager first: no new child once it is going
            os.waitpid(pid, 0)
            return True
        # the manager is gone or stopping: the child's socket is closed too, it ends soon
        ready, _, _ = select.select([pidfd], [], [], 30.0)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return False
    finally:
        os.close(pidfd)


def start_spawner(kind: str, who: Identity | None, resolver: Resolver | None) -> Spawner:
    """Fork the spawner of ``kind`` children (call it while this process has one thread)."""
    ours, theirs = socket.socketpair()
    manager = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            _spawner(theirs, kind, who, resolver, manager)
        except BaseException as exc:  # noqa: BLE001 - report, then leave without cleanup
            _say(f"{kind} spawner failed: {type(exc).__name__}: {exc}")
            os._exit(111)
        os._exit(0)
    theirs.close()
    return Spawner(kind, pid, ours)


@dataclass
class Spawner:
    """The manager's view of one spawner: its pid and its control socket."""

    kind: str
    pid: int
    ctl: socket.socket


# -- the manager's side -----------------------------------------------------------------


def parse_result(raw: object) -> Result:
    """A child's result, checked field by field; ValueError when anything is off."""
    if not isinstance(raw, dict) or set(raw) != set(_RESULT_KEYS):
        raise ValueError("result with unexpected fields")
    values = [raw[k] for k in _RESULT_KEYS]
    if not all(isinstance(v, str) for v in values):
        raise ValueError("result field is not a string")
    if values[0] not in ("ok", "temp", "perm"):
        raise ValueError(f"result kind {values[0]!r}")
    return Result(*(v[:MAX_DETAIL] for v in values))


def parse_forward(raw: object) -> Forward:
    """A child's forward request, checked; ValueError when anything is off."""
    if not isinstance(raw, dict) or set(raw) != {"to", "delivered_to", "done", "source"}:
        raise ValueError("forward with unexpected fields")
    to, done = raw["to"], raw["done"]
    strings = [raw["delivered_to"], raw["source"]]
    if not (isinstance(to, list) and isinstance(done, list)) or not to:
        raise ValueError("forward without recipients")
    if not all(isinstance(s, str) for s in [*to, *done, *strings]):
        raise ValueError("forward field is not a string")
    if any(len(s) > MAX_DETAIL for s in [*to, raw["delivered_to"]]):
        raise ValueError("forward address too long")
    done = [d[:MAX_DETAIL] for d in done]
    return Forward(tuple(to), raw["delivered_to"], tuple(done), raw["source"][:MAX_DETAIL])


@dataclass
class _Call:
    """A job sent to a child: its answer (None: the child was lost) goes to ``then`` in
    the link's thread, or, for a caller that waits, to ``reply`` and ``done``."""

    done: threading.Event | None = None  # only a caller that waits has one (``Link.call``)
    reply: dict[str, Any] | None = None
    then: Callable[[dict[str, Any] | None], None] | None = None

    def answer(self, reply: dict[str, Any] | None) -> None:
        self.reply = reply
        if self.then is None:
            if self.done is not None:
                self.done.set()
            return
        try:
            self.then(reply)
        except Exception:  # noqa: BLE001 - the link's thread must keep reading answers
            traceback.print_exc()


def _fail(calls: list[_Call]) -> int:
    """Answer calls whose child was lost (no lock held: an answer may start a new job)."""
    for call in calls:
        call.answer(None)
    return len(calls)


class Link:
    """The manager's end of one kind of child, across the child's restarts.

    A thread takes each new child's socket from the spawner, sends it the control files,
    then reads its answers and hands each to the thread waiting for it; when the child's
    socket closes, every call still waiting gets ChildLostError.
    """

    def __init__(
        self,
        spawner: Spawner,
        log: Callable[[str], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.kind = spawner.kind
        self.spawner = spawner
        self.log = log
        self.on_lost = on_lost
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.pid = 0
        self.lost = False
        self.closing = False
        self.calls: dict[int, _Call] = {}
        self.ids = itertools.count(1)
        self.control: Control | None = None
        self.thread = threading.Thread(target=self._run, name=f"{self.kind}-link", daemon=True)

    def start(self, control: Control) -> None:
        self.control = control
        self.thread.start()

    def configure(self, control: Control) -> None:
        """New control files (HUP): for the running child and the next ones."""
        with self.cond:
            self.control = control
            sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                self._send(sock, {"op": "config", "control": control})

    def _send(self, sock: socket.socket, request: dict[str, Any]) -> None:
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            send_frame(sock, data)

    def _run(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.spawner.ctl, 64, 1)
            except OSError:
                data, fds = b"", []
            if not fds:
                break
            sock = socket.socket(fileno=fds[0])
            if self.closing:  # a child started as we stopped: let it end at once
                sock.close()
                break
            self.pid = int(data) if data.isdigit() else 0
            try:
                self._serve(sock)
            finally:
                sock.close()
        with self.cond:
            self.lost = True
            calls = self._take_calls()
        _fail(calls)
        if not self.closing:
            self.log(f"error {self.kind} spawner {self.spawner.pid} is gone")
            self.on_lost(self.kind)

    def _serve(self, sock: socket.socket) -> None:
        """Configure a new child, then read its answers until its socket closes."""
        with self.cond:
            control = self.control
        try:
            self._send(sock, {"op": "config", "control": control})
        except OSError:
            return
        with self.cond:
            self.sock = sock
            self.cond.notify_all()
        self.log(f"status {self.kind} delivery child started, pid {self.pid}")
        reader = FrameReader(sock)
        try:
            while True:
                self._answered(json.loads(reader.read(MAX_REPLY)))
        except (ChannelClosedError, OSError, ValueError) as exc:
            why = f": {exc}" if isinstance(exc, ValueError) else ""
            with self.cond:
                self.sock = None
                calls = self._take_calls()
            lost = _fail(calls)
            if not self.closing:
                self.log(
                    f"warning {self.kind} delivery child {self.pid} ended{why}; "
                    f"{lost} job(s) in flight deferred"
                )
        finally:
            reader.close()

    def _answered(self, reply: object) -> None:
        """Hand an answer to the call waiting for it; ValueError if none is."""
        number = reply.get("id") if isinstance(reply, dict) else None
        with self.cond:
            call = self.calls.pop(number, None) if isinstance(number, int) else None
        if call is None or not isinstance(reply, dict):
            raise ValueError("answer to no question")
        call.answer(reply)

    def _take_calls(self) -> list[_Call]:
        """Every call still waiting for an answer, forgotten here (cond held)."""
        calls, self.calls = self.calls, {}
        return list(calls.values())

    def submit(
        self, request: dict[str, Any], then: Callable[[dict[str, Any] | None], None]
    ) -> None:
        """Send a job without waiting (no thread waits per job): ``then`` gets the answer in
        the link's thread, None if the child is lost first. ChildLostError, at once, when no
        child runs now or the job could not be sent (``call`` then; ``then`` is not run). One
        outcome a job: whoever takes the call from ``calls`` answers it, so a send to a child
        that died meanwhile (the link's thread failed the call) raises nothing, else the
        caller would run the job again though its deferral had already freed the slot."""
        with self.cond:
            sock = self.sock
            if sock is None:
                raise ChildLostError(f"no {self.kind} delivery child")
            number = next(self.ids)
            self.calls[number] = _Call(then=then)
        try:
            self._send(sock, {**request, "id": number})
        except Exception as exc:  # noqa: BLE001 - MemoryError too: not sent, the call taken back
            with self.cond:
                if self.calls.pop(number, None) is None:
                    return  # the link's thread took the call: it answers it (None)
            raise ChildLostError(f"{self.kind} delivery child unreachable: {named(exc)}") from None

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a job to the child and wait for its answer; ChildLostError if none comes."""
        deadline = time.monotonic() + CHILD_WAIT
        with self.cond:
            while self.sock is None and not self.lost and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            sock = self.sock
            if sock is None:
                raise ChildLostError(f"no {self.kind} delivery child")
            number = next(self.ids)
            done = threading.Event()
            call = self.calls[number] = _Call(done=done)
        try:
            self._send(sock, {**request, "id": number})
        except Exception as exc:  # noqa: BLE001 - as in ``submit``: a call left would leak
            with self.cond:
                self.calls.pop(number, None)
            raise ChildLostError(f"{self.kind} delivery child unreachable: {named(exc)}") from None
        done.wait()
        if call.reply is None:
            raise ChildLostError(f"{self.kind} delivery child {self.pid} died")
        return call.reply

    def post(self, request: dict[str, Any]) -> None:
        """Send without waiting for an answer (closing a connection)."""
        with self.cond:
            sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                self._send(sock, request)

    def close(self) -> None:
        """Close the child's socket and the spawner's: both end by themselves."""
        with self.cond:
            self.closing = True
            sock = self.sock
            self.cond.notify_all()
        # The spawner's socket first: a spawner that saw its child end before it saw the
        # manager go would fork a new child nobody closes (the manager then waited for it).
        with contextlib.suppress(OSError):
            self.spawner.ctl.shutdown(socket.SHUT_RDWR)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10) if self.thread.is_alive() else None
        self.spawner.ctl.close()


def _wait_pid(pid: int, timeout: float) -> None:
    """Reap ``pid``, waiting up to ``timeout`` seconds (then leave it to init)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _local_result(
    reply: dict[str, Any] | None, env: Envelope, message: bytes, forwarder: LocalDelivery
) -> Result:
    """A local child's answer as a Result (a forward is queued here, by the manager)."""
    try:
        if reply is None:
            raise ChildLostError("local delivery child died")  # noqa: TRY301
        if "forward" in reply:
            return forwarder.forward(env, message, parse_forward(reply["forward"]))
        raw = reply.get("results")
        if not isinstance(raw, list) or len(raw) != 1:
            raise ValueError("wrong number of results")  # noqa: TRY301
        return parse_result(raw[0])
    except (ChildLostError, ValueError) as exc:
        return Result.temp(f"local delivery child: {exc} (#4.3.0)", "4.3.0")


class RemoteHandle:
    """One connection kept by the child for one of the manager's remote workers."""

    def __init__(self, children: Children, sid: int) -> None:
        self.children = children
        self.sid = sid

    def deliver(
        self, key: str, env: Envelope, message: bytes, recipients: list[str]
    ) -> list[Result]:
        domain = split_address(recipients[0])[1]
        request = {
            "op": "remote",
            "sid": self.sid,
            "key": key,
            "domain": domain,
            "env": env,
            "message": message,
            "rcpts": recipients,
        }
        try:
            reply = self.children.links["remote"].call(request)
            raw = reply.get("results")
            if not isinstance(raw, list) or len(raw) != len(recipients):
                raise ValueError("wrong number of results")  # noqa: TRY301
            return [parse_result(r) for r in raw]
        except (ChildLostError, ValueError) as exc:
            error = Result.temp(f"remote delivery child: {exc} (#4.3.0)", "4.3.0", remote=key)
            return [error] * len(recipients)

    def close(self) -> None:
        self.children.links["remote"].post({"op": "close", "sid": self.sid})


class Children:
    """The manager's delivery children: one Link per kind."""

    def __init__(self, spawners: list[Spawner]) -> None:
        self.spawners = spawners
        self.links: dict[str, Link] = {}
        self.sids = itertools.count(1)
        self.lost: list[str] = []

    @classmethod
    def start(
        cls,
        resolver: Resolver | None = None,
        users: dict[str, Identity | None] | None = None,
    ) -> Children:
        """Fork the spawners (each becomes ``users[kind]`` when given)."""
        users = users or {}
        return cls([start_spawner(kind, users.get(kind), resolver) for kind in KINDS])

    def connect(
        self, control: Control, log: Callable[[str], None], wake: Callable[[], None]
    ) -> None:
        """Start taking children from the spawners (after the manager dropped privileges)."""

        def on_lost(kind: str) -> None:
            self.lost.append(kind)
            wake()

        for spawner in self.spawners:
            self.links[spawner.kind] = Link(spawner, log, on_lost)
            self.links[spawner.kind].start(control)

    def configure(self, control: Control) -> None:
        for link in self.links.values():
            link.configure(control)

    def local(
        self, env: Envelope, message: bytes, recipient: str, forwarder: LocalDelivery
    ) -> Result:
        """Deliver to a local recipient in the local child, waiting for it (up to
        CHILD_WAIT for a child being restarted); forwards are queued here."""
        request = {"op": "local", "env": env, "message": message, "rcpt": recipient}
        try:
            reply: dict[str, Any] | None = self.links["local"].call(request)
        except ChildLostError as exc:
            return Result.temp(f"local delivery child: {exc} (#4.3.0)", "4.3.0")
        return _local_result(reply, env, message, forwarder)

    def local_async(
        self,
        env: Envelope,
        message: bytes,
        recipient: str,
        forwarder: LocalDelivery,
        then: Callable[[Result], None],
    ) -> None:
        """Send a local delivery to the child; ``then`` gets its Result in the link's
        thread. ChildLostError at once when no child runs (then use ``local``)."""
        request = {"op": "local", "env": env, "message": message, "rcpt": recipient}
        self.links["local"].submit(
            request, lambda reply: then(_local_result(reply, env, message, forwarder))
        )

    def session(self) -> RemoteHandle:
        return RemoteHandle(self, next(self.sids))

    def close(self) -> None:
        """Stop taking jobs; children and spawners end by themselves (reaped here)."""
        for link in self.links.values():
            link.close()
        for spawner in self.spawners:
            if spawner.kind not in self.links:
                spawner.ctl.close()
        for spawner in self.spawners:
            _wait_pid(spawner.pid, 5.0)


def stop_children(children: Children) -> None:
    """``Children.close`` for ``weakref.finalize`` (a manager dropped without ``close``)."""
    with contextlib.suppress(Exception):
        children.close()
