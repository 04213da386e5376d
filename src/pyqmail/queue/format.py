"""The on-disk format of queued messages: message files, segment files, queue ids.

Message file (``new/<id>``, ``mess/<id>``, or a record of a segment), all ASCII lines ending
in LF::

    PYQMAIL-QUEUE 1
    id <queue id>
    time <unix seconds, float>
    from <sender address, possibly empty for the null sender>
    to <recipient address>            (one line per recipient, at least one)
    <meta key> <value>                (optional lines: client, helo, auth, tls, ...)
    <empty line>
    <message bytes, CRLF line ends, not dot-stuffed>
    END <queue id> <message size as 20 decimal digits>\\n

The trailer has a fixed length once the id is known, so a reader finds it without
searching the message, and the size it records lets the writer stream the message to
disk as it arrives (bounded memory) and still make a torn file detectable.

Segment file: several messages committed together in one file (``pyqmail.queue.writer``'s
``SegmentWriter``; the group commit puts everything that finished while the previous batch
was on disk into one). A segment is named by its own id (made like a queue id; it never
equals one) and holds one or more records, each a complete message file as above::

    PYQMAIL-SEGMENT 1
    <record length as 20 decimal digits>    (then LF and the record; repeated)
    END-SEGMENT <segment id> <record count as 20 decimal digits>\\n

A reader verifies every record and the count (``parse_file``) and never delivers a file
that fails: a segment that fails is quarantined whole. The messages of a segment keep their
own queue ids (logged by pyqmail-smtpd, used in ``state/``).

Addresses never contain CR, LF or NUL (the SMTP core rejects them); ``encode_header``
checks again, so nothing can break the line-oriented header.

This module does no I/O: the writer (``pyqmail.queue.writer``) and the reader
(``pyqmail.queue.store``) both build on it.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MAGIC = b"PYQMAIL-QUEUE 1\n"
SEGMENT_MAGIC = b"PYQMAIL-SEGMENT 1\n"
_SEGMENT_END = b"END-SEGMENT "
_LENGTH = 21  # a record's length line: 20 digits and LF
_FORBIDDEN = frozenset(b"\r\n\x00")
_RESERVED = frozenset({"id", "time", "from"})
_counter = itertools.count()
_pid = os.getpid()


def _after_fork() -> None:
    global _pid, _counter  # noqa: PLW0603 - per-process state, reset in a forked child
    _pid = os.getpid()
    _counter = itertools.count()


os.register_at_fork(after_in_child=_after_fork)


class QueueError(Exception):
    """The queue could not take or give a message; nothing half-written was left."""


class QueueUnreadableError(QueueError):
    """A queue file could not be read now (EMFILE, EIO, EACCES after a wrong chown): not
    proof that the file is bad, so the reader leaves it where it is and reads it again
    later, rather than set it aside in ``bad/`` as it does a file that fails
    verification."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class Envelope:
    """What the queue knows about one message besides its bytes."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    size: int
    received: float
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stored:
    """One message as read from a queue file: its own file, or a record of a segment.

    ``span`` is (offset, length) of the record in its segment, None for a file of its own;
    ``Queue.read_stored`` reads just that record again later."""

    env: Envelope
    body: bytes
    span: tuple[int, int] | None = None


def new_queue_id() -> str:
    """Unique across processes and hosts sharing nothing: time, pid, counter, randomness.

    The randomness only separates hosts sharing a queue by mistake; it comes from
    ``random`` (seeded from the OS at start and again in each forked child), not a
    getrandom() call per message."""
    return f"{time.time_ns():x}.{_pid:x}.{next(_counter):x}{random.getrandbits(24):06x}"


def _check_field(name: str, value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    if _FORBIDDEN.intersection(raw):
        raise QueueError(f"{name} contains CR, LF or NUL: {value!r}")
    return raw


def encode_header(
    queue_id: str, sender: str, recipients: Sequence[str], received: float, meta: Mapping[str, str]
) -> bytes:
    """The header block of a queue file, up to and including its empty line."""
    if not recipients:
        raise QueueError("a message needs at least one recipient")
    lines = [MAGIC, b"id " + _check_field("queue id", queue_id) + b"\n"]
    lines.append(f"time {received:.6f}\n".encode())
    lines.append(b"from " + _check_field("sender", sender) + b"\n")
    lines.extend(b"to " + _check_field("recipient", r) + b"\n" for r in recipients)
    for key, value in meta.items():
        if not key.isidentifier():
            raise QueueError(f"meta key must be an identifier: {key!r}")
        if key in _RESERVED:
            raise QueueError(f"meta key {key!r} is reserved")
        lines.append(key.encode() + b" " + _check_field(f"meta {key}", value) + b"\n")
    lines.append(b"\n")
    return b"".join(lines)


def encode_trailer(queue_id: str, size: int) -> bytes:
    return f"END {queue_id} {size:020d}\n".encode("utf-8", "surrogateescape")


def parse_message(data: bytes, origin: str = "<queue file>") -> tuple[Envelope, bytes]:
    """Split a complete queue file into envelope and message; raise QueueError if torn."""
    if not data.startswith(MAGIC):
        raise QueueError(f"{origin}: not a pyqmail queue file (bad magic)")
    head_end = data.find(b"\n\n")
    if head_end < 0:
        raise QueueError(f"{origin}: header not terminated")
    fields: dict[str, str] = {}
    recipients: list[str] = []
    meta: dict[str, str] = {}
    for line in data[len(MAGIC) : head_end].split(b"\n"):
        key, _, value = line.decode("utf-8", "surrogateescape").partition(" ")
        if key == "to":
            recipients.append(value)
        elif key in _RESERVED:
            fields[key] = value
        else:
            meta[key] = value
    missing = {"id", "time", "from"} - fields.keys()
    if missing:
        raise QueueError(f"{origin}: header lacks {', '.join(sorted(missing))}")
    if not recipients:
        raise QueueError(f"{origin}: no recipients")
    try:
        received = float(fields["time"])
    except ValueError as exc:
        raise QueueError(f"{origin}: bad time in header") from exc
    body_start = head_end + 2
    size = len(data) - body_start - len(encode_trailer(fields["id"], 0))
    if size < 0 or not data.endswith(encode_trailer(fields["id"], size)):
        raise QueueError(f"{origin}: truncated or corrupt (END marker or size mismatch)")
    env = Envelope(fields["id"], fields["from"], tuple(recipients), size, received, meta)
    return env, data[body_start : body_start + size]


def encode_segment_trailer(segment_id: str, count: int) -> bytes:
    return f"END-SEGMENT {segment_id} {count:020d}\n".encode("utf-8", "surrogateescape")


def parse_segment(data: bytes, origin: str = "<segment>", name: str | None = None) -> list[Stored]:
    """Every record of a complete segment file; raise QueueError if any part is torn, or
    if ``name`` (the file's name) is given and is not the id its trailer records."""
    if not data.startswith(SEGMENT_MAGIC):
        raise QueueError(f"{origin}: not a pyqmail segment (bad magic)")
    pos = len(SEGMENT_MAGIC)
    out: list[Stored] = []
    while not data.startswith(_SEGMENT_END, pos):
        head = data[pos : pos + _LENGTH]
        if len(head) < _LENGTH or head[-1:] != b"\n" or not head[:-1].isdigit():
            raise QueueError(f"{origin}: record {len(out) + 1}: bad length line at byte {pos}")
        start = pos + _LENGTH
        end = start + int(head[:-1])
        if end > len(data):
            raise QueueError(f"{origin}: record {len(out) + 1} truncated")
        env, body = parse_message(data[start:end], f"{origin} record {len(out) + 1}")
        out.append(Stored(env, body, (start, end - start)))
        pos = end
    fields = data[pos:].split(b" ")
    if (
        len(fields) != 3
        or not fields[2].endswith(b"\n")
        or not fields[2][:-1].isdigit()
        or int(fields[2][:-1]) != len(out)
        or not out
    ):
        raise QueueError(f"{origin}: segment trailer missing, torn or with a wrong count")
    if name is not None and fields[1] != name.encode(errors="replace"):
        raise _misnamed(origin, fields[1].decode(errors="replace"))
    return out


def _misnamed(origin: str, queue_id: str) -> QueueError:
    """A queue file not named by its id: a copy, or a file brought back from bad/ under
    another name. Its state files and its end (the unlink of mess/<id>, the end lines of
    state/<segment id>) go by the id, so it would be delivered again at every start."""
    return QueueError(
        f"{origin} holds {queue_id}: a queue file is named by its id"
        " (rename it to that id to queue it again)"
    )


def parse_file(data: bytes, origin: str = "<queue file>", name: str | None = None) -> list[Stored]:
    """The messages of a queue file, whichever of the two formats it has; with ``name``
    (the file's name), a file not named by its id (the message's, or the segment's) fails
    verification too."""
    if data.startswith(SEGMENT_MAGIC):
        return parse_segment(data, origin, name)
    env, body = parse_message(data, origin)
    if name is not None and env.queue_id != name:
        raise _misnamed(origin, env.queue_id)
    return [Stored(env, body)]


def id_order(name: str) -> tuple[int, str]:
    """Sort key of a queue file's name: ids begin with the time in hex nanoseconds, so
    this is oldest first; a name that is not an id sorts first."""
    head = name.split(".", 1)[0]
    try:
        return int(head, 16), name
    except ValueError:
        return 0, name
