"""A delivery child: the process that runs local or remote deliveries for the queue manager.

It has one stream socket to the manager (``pyqmail.send.spawn`` made it) and nothing of the
queue: the manager sends it the control files' contents and each job with the message's
bytes; it answers each job with the outcome. Many jobs run at once, one thread each
(threads are kept for the next job).

Frames (both directions): a 4-byte big-endian length, then the payload. Manager -> child:
a pickle (the manager is the more privileged side; the child trusts it) of a dict:

- ``{"op": "config", "control": Control}``: use these control files from now on (first
  frame, and again after a HUP);
- ``{"op": "local", "id": n, "env": Envelope, "message": bytes, "rcpt": address}``;
- ``{"op": "remote", "id": n, "sid": s, "key": k, "domain": d, "env": Envelope, "message":
  bytes, "rcpts": [address, ...]}``: ``sid`` names the connection the manager's worker
  keeps for one destination ``k`` (opened, or reopened when broken, for the job's domain);
- ``{"op": "close", "sid": s}``: QUIT that connection.

Child -> manager: JSON (the manager trusts nothing the child says: ``pyqmail.send.spawn``
checks every field), ``{"id": n, "results": [Result fields, ...]}`` or, for a local
delivery that forwards, ``{"id": n, "forward": {"to": [...], "delivered_to": ..., "done":
[...], "source": ...}}`` (the manager writes the queue, see ``LocalDelivery.forward``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import queue
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from pyqmail.control.send import Control
from pyqmail.send.delivery import Result, named
from pyqmail.send.local import Forward, LocalDelivery
from pyqmail.send.mx import Resolver
from pyqmail.send.remote import RemoteDelivery, RemoteSession

HEADER = struct.Struct("!I")
MAX_REPLY = 64 << 20  # bytes of one answer the manager accepts from a child
MAX_DETAIL = 4000  # characters of one result field (a server's reply may be 64 KiB)
# Result's fields in order, read once: dataclasses.asdict deep-copies every value, one of
# the child's larger costs per delivery.
_RESULT_FIELDS = tuple(f.name for f in fields(Result))


class ChannelClosedError(Exception):
    """The other end closed the socket (or sent a frame that is cut short)."""


class FrameReader:
    """Reads frames from a stream socket through one buffer.

    A frame is a length and a payload; reading them with two ``recv`` calls each cost two
    system calls per job and per answer. Through a buffer, the frames the other side wrote
    while this side was busy arrive with one ``recv``."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb", buffering=1 << 16)

    def _exact(self, size: int) -> bytes:
        data: bytes | None = self.file.read(size)
        if data is None or len(data) < size:
            raise ChannelClosedError
        return data

    def read(self, limit: int | None = None) -> bytes:
        """One frame's payload; ChannelClosedError at EOF or when it exceeds ``limit``."""
        (size,) = HEADER.unpack(self._exact(HEADER.size))
        if limit is not None and size > limit:
            raise ChannelClosedError
        return self._exact(size)

    def close(self) -> None:
        """Drop the buffer's hold on the socket (until then ``sock.close()`` keeps the
        descriptor open)."""
        self.file.close()


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(HEADER.pack(len(payload)) + payload)


class _Workers:
    """The child's threads: each job runs in one, and a thread that finished a job waits
    for the next instead of ending (starting a thread per job cost more than a local
    delivery's own work). A job that finds no idle thread starts one, so as many jobs run
    at once as the manager sends: its concurrency limits bound the threads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.jobs: queue.SimpleQueue[tuple[Callable[[dict[str, Any]], None], dict[str, Any]]]
        self.jobs = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def submit(self, worker: Callable[[dict[str, Any]], None], request: dict[str, Any]) -> None:
        with self.lock:
            start = self.idle == 0
            if not start:
                self.idle -= 1
        if start:
            threading.Thread(target=self._run, name=self.name, daemon=True).start()
        self.jobs.put((worker, request))

    def _run(self) -> None:
        while True:
            worker, request = self.jobs.get()
            worker(request)
            with self.lock:
                self.idle += 1


def result_fields(result: Result) -> dict[str, str]:
    """A Result as the JSON the manager parses back (``spawn.parse_result``); each field cut
    to ``MAX_DETAIL`` so that an answer for many recipients stays far below ``MAX_REPLY``."""
    return {name: str(getattr(result, name))[:MAX_DETAIL] for name in _RESULT_FIELDS}


class Child:
    """The child's side of one channel: reads jobs, runs each in a thread, answers."""

    def __init__(self, sock: socket.socket, kind: str, resolver: Resolver | None) -> None:
        self.sock = sock
        self.kind = kind
        self.resolver = resolver
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.local: LocalDelivery | None = None
        self.remote: RemoteDelivery | None = None
        self.sessions: dict[int, RemoteSession] = {}
        self.workers = _Workers(f"{kind}-job")

    def serve(self) -> None:
        """Until the manager closes the channel: take each frame, start its job."""
        reader = FrameReader(self.sock)
        while True:
            try:
                request: dict[str, Any] = pickle.loads(reader.read())  # noqa: S301 - from the manager
            except (ChannelClosedError, OSError):
                reader.close()
                return
            op = request["op"]
            if op == "config":
                self._configure(request["control"])
                continue
            worker = {"local": self._local, "remote": self._remote, "close": self._close}[op]
            self.workers.submit(functools.partial(self._job, worker), request)

    def _job(self, worker: Callable[[dict[str, Any]], None], request: dict[str, Any]) -> None:
        """Run one job. A job that raises is answered all the same, as a temporary failure
        naming the exception: the manager's worker waits for the answer (``Link.call``)
        with its recipients busy, and without one it would wait until this child died.
        When not even that answer can be made, the child dies now, which the manager
        answers for every job in flight (deferred)."""
        try:
            worker(request)
        except Exception as exc:  # noqa: BLE001 - every job is answered
            if request.get("op") == "close":
                return
            try:
                self._failed(request, exc)
            except BaseException:  # noqa: BLE001 - the manager must not wait forever
                with contextlib.suppress(OSError):
                    os.write(2, f"pyqmail-send: {self.kind} job failed: {named(exc)}\n".encode())
                os._exit(111)

    def _failed(self, request: dict[str, Any], exc: Exception) -> None:
        """Answer a job that raised: a temporary failure for each of its recipients (none
        when the request does not even say which: the manager defers such an answer)."""
        rcpts = request.get("rcpts")
        count = 1 if request.get("op") == "local" else len(rcpts) if isinstance(rcpts, list) else 0
        error = Result.temp(f"{self.kind} delivery child error: {named(exc)} (#4.3.0)", "4.3.0")
        self._answer({"id": request.get("id"), "results": [result_fields(error)] * count})

    def _configure(self, control: Control) -> None:
        with self.lock:
            if self.kind == "local":
                self.local = LocalDelivery(control, None)
            else:
                self.remote = RemoteDelivery(control, self.resolver)

    def _answer(self, reply: dict[str, Any]) -> None:
        data = json.dumps(reply, ensure_ascii=True, separators=(",", ":")).encode()
        with self.send_lock:
            try:
                send_frame(self.sock, data)
            except OSError:
                os._exit(0)  # the manager is gone; nothing to answer to

    def _local(self, request: dict[str, Any]) -> None:
        local = self.local
        if local is None:
            step: Result | Forward = Result.temp("local delivery child has no configuration")
        else:
            try:
                step = local.deliver_mailboxes(request["env"], request["message"], request["rcpt"])
            except Exception as exc:  # noqa: BLE001 - a bug defers, it never loses mail
                step = Result.temp(f"local delivery error: {exc} (#4.3.0)", "4.3.0")
        if isinstance(step, Forward):
            forward = {
                "to": list(step.recipients),
                "delivered_to": step.delivered_to,
                "done": list(step.done),
                "source": step.source,
            }
            self._answer({"id": request["id"], "forward": forward})
        else:
            self._answer({"id": request["id"], "results": [result_fields(step)]})

    def _session(self, sid: int, domain: str) -> RemoteSession | None:
        """The connection ``sid`` (a new one when it is missing or broken)."""
        with self.lock:
            session = self.sessions.get(sid)
            remote = self.remote
        if session is not None and session.broken is None:
            return session
        if session is not None:
            session.close()
        if remote is None:
            return None
        session = remote.session(domain)
        with self.lock:
            self.sessions[sid] = session
        return session

    def _remote(self, request: dict[str, Any]) -> None:
        rcpts: list[str] = request["rcpts"]
        session = self._session(request["sid"], request["domain"])
        if session is None:
            results = [Result.temp("remote delivery child has no configuration")] * len(rcpts)
        else:
            try:
                results = session.deliver(request["env"], request["message"], rcpts)
            except Exception as exc:  # noqa: BLE001 - a bug defers, it never loses mail
                session.close()
                with self.lock:
                    self.sessions.pop(request["sid"], None)
                error = Result.temp(f"remote delivery error: {exc}", "4.0.0", remote=request["key"])
                results = [error] * len(rcpts)
        self._answer({"id": request["id"], "results": [result_fields(r) for r in results]})

    def _close(self, request: dict[str, Any]) -> None:
        with self.lock:
            session = self.sessions.pop(request["sid"], None)
        if session is not None:
            session.close()


def serve(sock: socket.socket, kind: str, resolver: Resolver | None) -> None:
    """Run a delivery child on ``sock`` until the manager closes it."""
    Child(sock, kind, resolver).serve()
