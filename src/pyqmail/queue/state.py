"""Delivery state records: what pyqmail-send has done with the messages in ``mess/``.

``state/<id>`` belongs to pyqmail-send (``state/`` is its alone, see "Permissions" in
``pyqmail.queue.store``) and holds one JSON object per line, appended, never rewritten::

    {"ev":"done","rcpt":0,"t":1700000000.0,"detail":"..."}
    {"ev":"failed","rcpt":1,"t":...,"detail":"...","status":"5.1.1","remote":"...",
     "diag":"smtp; 550 ...","expired":false}
    {"ev":"deferred","rcpt":2,"t":...,"detail":"...","status":"4.4.1","remote":"...",
     "diag":"..."}
    {"ev":"bounced","t":...,"bounce":"<queue id of the DSN, or empty when dropped>"}
    {"ev":"end","id":"<queue id>"}       (only in state/<segment id>)
    {"ev":"dkim","id":"<queue id>","h":"DKIM-Signature: ...\r\n..."}

``dkim`` (``Signed``) holds the DKIM-Signature fields pyqmail-send made for a message when it
picked it up: every delivery puts them in front of the message, so a retry and a restart
send the same bytes and nothing is signed twice. It is written, and synced, before the
queue file enters ``mess/``, in ``state/<file in mess/>``: the message's own state file, or
for a message of a segment the segment's (one file and one sync for all its messages).

Each kind of line is one record type (``Attempt``, ``Bounced``, ``Ended``, ``Signed``) with
``to_json`` and ``from_json``, so the writer (pyqmail-send) and the readers (pyqmail-send on start,
pyqmail-queue) share one definition and the queue tool need not import the daemon. ``rcpt``
indexes the ``to`` lines of the queue file; ``t`` is unix seconds.

Reading is lenient the way a crash requires: a missing file means nothing has happened yet,
a torn last line (no LF) is ignored, and so is any line that is not a record of a known
kind (not JSON, an unknown ``ev``, a ``rcpt`` that is not an integer, a ``t`` that is not a
number). What a record means for delivery, and when each is written, is pyqmail-send's
(``pyqmail.send.manager``); how the files fit the queue's states: ``README.md`` here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyqmail.queue.dirsync import DirSync
from pyqmail.queue.writeall import write_all

Event = Literal["done", "failed", "deferred"]
_EVENTS: dict[str, Event] = {"done": "done", "failed": "failed", "deferred": "deferred"}
STATE_FILE = 0o640  # in state/, which only pyqmail-send enters


def _number(value: object) -> float | None:
    """A JSON number (or a numeric string, as ``float`` takes it); None if it is neither."""
    if not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _text(obj: Mapping[str, Any], key: str, default: str = "") -> str:
    return str(obj.get(key, default))


@dataclass(frozen=True)
class Attempt:
    """The outcome of delivering to one recipient: ``done`` and ``failed`` are final (qmail's
    DONE: never tried again), ``deferred`` is advisory (the last error and the retry
    schedule). ``status``, ``remote`` and ``diag`` are written for failures only, and
    ``expired`` (a temporary failure past queuelifetime) for ``failed`` only."""

    event: Event
    rcpt: int  # index among the message's recipients
    time: float
    detail: str = ""
    status: str = ""  # RFC 3463 enhanced status, e.g. 5.1.1
    remote: str = "local"  # the host that answered
    diag: str = ""  # DSN Diagnostic-Code, e.g. "smtp; 550 5.1.1 unknown user"
    expired: bool = False

    def to_json(self) -> dict[str, object]:
        """The line's object, its keys in the order pyqmail has always written them."""
        obj: dict[str, object] = {
            "ev": self.event,
            "rcpt": self.rcpt,
            "t": self.time,
            "detail": self.detail,
        }
        if self.event != "done":
            obj |= {"status": self.status, "remote": self.remote, "diag": self.diag}
        if self.event == "failed":
            obj["expired"] = self.expired
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Attempt | None:
        """The attempt a line records, or None if it is not a valid one."""
        ev = obj.get("ev")
        event = _EVENTS.get(ev) if isinstance(ev, str) else None
        rcpt = obj.get("rcpt")
        when = _number(obj.get("t", 0.0))
        if event is None or not isinstance(rcpt, int) or when is None:
            return None
        return cls(
            event,
            rcpt,
            when,
            _text(obj, "detail"),
            _text(obj, "status"),
            _text(obj, "remote", "local"),
            _text(obj, "diag"),
            bool(obj.get("expired", False)),
        )


@dataclass(frozen=True)
class Bounced:
    """The failed recipients were reported: the DSN went into the queue as ``bounce``, or
    was dropped (empty: a failed double bounce, as qmail drops it)."""

    time: float
    bounce: str = ""

    def to_json(self) -> dict[str, object]:
        """The line's object."""
        return {"ev": "bounced", "t": self.time, "bounce": self.bounce}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Bounced:
        """Any ``bounced`` line counts (the bounce was made), whatever else it holds."""
        return cls(_number(obj.get("t", 0.0)) or 0.0, _text(obj, "bounce"))


@dataclass(frozen=True)
class Ended:
    """A message of a segment has left the queue (in ``state/<segment id>``: the segment
    file stays until every message in it has ended)."""

    queue_id: str

    def to_json(self) -> dict[str, object]:
        """The line's object."""
        return {"ev": "end", "id": self.queue_id}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Ended | None:
        """The ended message, or None if the line names none."""
        queue_id = obj.get("id")
        return cls(queue_id) if isinstance(queue_id, str) else None


@dataclass(frozen=True)
class Signed:
    """The DKIM-Signature fields made for message ``queue_id`` at pickup (ASCII, CRLF)."""

    queue_id: str
    headers: bytes

    def to_json(self) -> dict[str, object]:
        """The line's object."""
        return {"ev": "dkim", "id": self.queue_id, "h": self.headers.decode("ascii")}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Signed | None:
        """The signature fields, or None if the line is not a whole record of them."""
        queue_id, headers = obj.get("id"), obj.get("h")
        if not isinstance(queue_id, str) or not isinstance(headers, str):
            return None
        if not headers.isascii() or not headers.endswith("\r\n"):
            return None
        return cls(queue_id, headers.encode("ascii"))


Record = Attempt | Bounced | Ended | Signed


def from_json(obj: object) -> Record | None:
    """The record of one decoded line, or None if it is no record of a known kind."""
    if not isinstance(obj, dict):
        return None
    ev = obj.get("ev")
    if ev == "bounced":
        return Bounced.from_json(obj)
    if ev == "end":
        return Ended.from_json(obj)
    if ev == "dkim":
        return Signed.from_json(obj)
    return Attempt.from_json(obj)


def encode(record: Record) -> bytes:
    """One line of a state file (ASCII: anything else is escaped)."""
    return json.dumps(record.to_json(), ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def read_state(path: Path) -> list[Record]:
    """The records of a state file (complete lines only); [] if it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n")[:-1]:  # the part after the last LF is torn or empty
        try:
            record = from_json(json.loads(line))
        except ValueError:
            continue
        if record is not None:
            records.append(record)
    return records


def ended_messages(path: Path) -> set[str]:
    """The queue ids recorded as ended in a segment's ``state/<segment id>``."""
    return {r.queue_id for r in read_state(path) if isinstance(r, Ended)}


def signatures(path: Path) -> dict[str, bytes]:
    """Queue id -> the DKIM-Signature fields recorded for it in ``path`` (``Signed``)."""
    return {r.queue_id: r.headers for r in read_state(path) if isinstance(r, Signed)}


def write_signed(path: str | os.PathLike[str], records: list[Signed]) -> None:
    """Start a state file with the signatures of the messages of one queue file, and
    fdatasync it; the caller syncs ``state/`` once for the whole pickup batch. A file of
    that name can only be a leftover of an earlier pickup that did not complete (the
    queue file is still in ``new/``): it is unlinked and created anew, so that the
    caller's fsync of ``state/`` always has this name to write (a file rewritten in place
    would leave it nothing to write, and an earlier failure of that fsync unseen:
    ``pyqmail.queue.dirsync``). A file that could not be written and synced whole is
    unlinked again, so none is left holding part of its records."""
    data = b"".join(encode(r) for r in records)
    with contextlib.suppress(FileNotFoundError):  # created anew, never rewritten in place
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, STATE_FILE)
    try:
        try:
            write_all(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _append_line(fd: int, line: bytes) -> None:
    """Append one record on a line of its own. After a power loss a state file may end in
    a torn record or in NULs (its size reached the disk, its last block did not); a record
    appended right after them would be read back as part of that garbage and dropped, a
    ``done`` among them (then delivered again)."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        line = b"\n" + line
    write_all(fd, line)


def append_end(path: str | os.PathLike[str], queue_id: str) -> None:
    """Record that a message of a segment has ended. No fsync, exactly like the unlink that
    ends a message of its own: a power loss can lose it, and the message is delivered
    again (a duplicate, never a loss)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, STATE_FILE)
    try:
        _append_line(fd, encode(Ended(queue_id)))
    finally:
        os.close(fd)


def append_state(path: Path, record: Attempt | Bounced, durable: bool = True) -> None:
    """Append a record; ``durable``: fdatasync it before returning (the first record of a
    file is always made durable, with its name in ``state/``). A final record is appended
    only after what it records is itself durable, so after a crash a recipient recorded
    done is never delivered again.

    A file this call created is unlinked again when it cannot be made durable: the next
    call then creates it anew and syncs ``state/`` again. Kept, it would be found and
    appended to without that sync, whose earlier failure Linux reports only once (a later
    fsync succeeds without writing the lost entry: ``pyqmail.queue.dirsync``). That sync
    is shared with the other threads that create state files (``DirSync``): one that
    failed in another thread after this file was created fails this call too."""
    line = encode(record)
    created = not path.exists()
    if created:  # before the create: a failed fsync of state/ after it fails this call
        state_dir = DirSync.of(str(path.parent))
        ticket = state_dir.ticket()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, STATE_FILE)
    try:
        try:
            _append_line(fd, line)
            if durable or created:
                os.fdatasync(fd) if not created else os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            state_dir.sync(ticket)
    except OSError:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
