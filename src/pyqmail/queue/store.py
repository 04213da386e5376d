"""The on-disk mail queue shared by pyqmail-smtpd (writer) and pyqmail-send (reader).

Layout under the queue root (``/var/qmail/queue`` by default)::

    tmp/      messages being written; never read by anyone but their writer
    new/      committed messages that pyqmail-send has not picked up yet
    mess/     messages pyqmail-send has picked up
    state/    per-message delivery progress, one file per message in mess/
    lock/trigger   a FIFO; writers poke it after each commit so the reader wakes at once

Message file format (``new/<id>`` and ``mess/<id>``), all ASCII lines ending in LF::

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

Segment files. Messages committed together that were held in memory go into one file
(``SegmentWriter``; pyqmail-smtpd's group commit puts everything that finished while the
previous batch was on disk into one), so that a batch costs one create, one fsync and one
rename instead of one each per message. A segment is named by its
own id (made like a queue id; it never equals one) and holds one or more records, each a
complete message file as above::

    PYQMAIL-SEGMENT 1
    <record length as 20 decimal digits>    (then LF and the record; repeated)
    END-SEGMENT <segment id> <record count as 20 decimal digits>\n

A reader verifies every record and the count (``parse_file``); a segment that fails is
quarantined whole. The messages of a segment keep their own queue ids (logged by
pyqmail-smtpd, used in ``state/``); pyqmail-send tracks which of them are finished and
removes the segment when all are (see ``pyqmail.send.manager``). Messages streamed to disk because
they were large, and those queued by ``enqueue`` (the sendmail injector, bounces), are
single files.

Durability protocol of ``enqueue`` and of the group commit (``pyqmail.queue.commit``; the
250 after DATA is sent only after it returns), the same for a single message file and a
segment:

1. ``tmp/<id>`` is created with O_EXCL, the whole file is written, then ``fsync(file)``;
2. ``rename(tmp/<id>, new/<id>)``, then ``fsync(new/)`` (once for a whole batch);
3. the trigger FIFO is poked (best effort: a reader also scans ``new/`` on start and on ALRM).

A segment is an unnamed file in tmp/ (O_TMPFILE) where the file system allows it, and
step 2 is then ``linkat`` into ``new/<id>`` instead of the rename (see ``SegmentWriter``).

A crash before step 2 leaves only a tmp file, which ``clean_tmp`` removes later, or an
unnamed one, which the file system frees; it was never acknowledged. A crash after step 2
leaves a complete message. Readers still check the header and the ``END`` trailer
(``parse_message``) and never deliver a file that fails them: a torn file can only come
from a disk lying about fsync, and is moved to ``bad/`` for the admin, not delivered.

Any OSError during enqueue (ENOSPC, EIO, EDQUOT, ...) removes the tmp file and raises
``QueueError``; the SMTP layer answers ``451 4.3.0`` and nothing is left in the queue. A
failure writing a segment fails every message in it (each client gets its 451).

Permissions: mutually untrusting programs (qmail's model). pyqmail-send's user owns the
queue; pyqmail-smtpd's user shares only the group ``pyqmail`` with it. The group may put
files into ``tmp/`` and ``new/``, and never enters the rest (``LAYOUT``)::

    queue/   0750 owner:pyqmail  (the group reaches tmp/, new/ and lock/ through it)
    tmp/     3730 owner:pyqmail  setgid + sticky, group -wx: create and rename, never list
    new/     3770 owner:pyqmail  setgid + sticky: the group cannot unlink or rename others'
                                 files; it can list them, because a writer must fsync new/
                                 and a directory opens (for fsync too) only with read access
    mess/ state/ bad/   0700     pyqmail-send's alone: picked-up messages and their progress
    lock/    0750 owner:pyqmail  trigger FIFO 0620 (the group pokes it), sendpid

A queue file is readable by pyqmail-send and by its writer only (``Queue.file_policy``):
the queue's owner (bounces) writes it 0600; root (``pyqmail-sendmail`` from cron) writes it
0600 and hands it to the owner (fchown); anyone else (pyqmail-smtpd) writes it 0640, and
the owner reads it through the group. So pyqmail-smtpd cannot read a bounce or an injected
message even by name, and cannot read its own messages once pyqmail-send has moved them
into ``mess/``: that rests on the directory, not on the file's mode, since the owner of a
file can always chmod it. (A file pyqmail-smtpd wrote stays open to pyqmail-smtpd through
any descriptor or hard link it kept: it wrote those bytes itself.) A group member other
than pyqmail-smtpd that injects mail writes 0640 too, and pyqmail-smtpd could read that
file for as long as it waits in ``new/`` (until the next pickup); root's and pyqmail-send's
files it can only see the names of there.

Addresses never contain CR, LF or NUL (the SMTP core rejects them); ``enqueue`` checks
again, so nothing can break the line-oriented header.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"PYQMAIL-QUEUE 1\n"
SEGMENT_MAGIC = b"PYQMAIL-SEGMENT 1\n"
_SEGMENT_END = b"END-SEGMENT "
_LENGTH = 21  # a record's length line: 20 digits and LF
try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (OSError, ValueError):  # pragma: no cover - Linux has it
    IOV_MAX = 1024
# The mode of each queue directory (see "Permissions" above); the role pyqmail_control
# creates the same (a unit test compares the two).
ROOT_MODE = 0o750
LAYOUT = {
    "tmp": 0o3730,
    "new": 0o3770,
    "mess": 0o700,
    "state": 0o700,
    "bad": 0o700,
    "lock": 0o750,
}
SUBDIRS = tuple(LAYOUT)
SHARED_FILE = 0o640  # written by a member of the group: the owner reads it through the group
PRIVATE_FILE = 0o600  # written by (or for) the queue's owner
TRIGGER = "lock/trigger"
POKE_RETRY = 1.0  # seconds between attempts to open the trigger FIFO when nobody listens
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


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def parse_segment(data: bytes, origin: str = "<segment>") -> list[Stored]:
    """Every record of a complete segment file; raise QueueError if any part is torn."""
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
    return out


def parse_file(data: bytes, origin: str = "<queue file>") -> list[Stored]:
    """The messages of a queue file, whichever of the two formats it has."""
    if data.startswith(SEGMENT_MAGIC):
        return parse_segment(data, origin)
    env, body = parse_message(data, origin)
    return [Stored(env, body)]


def _writev_all(fd: int, parts: list[bytes]) -> None:
    """Write every buffer, in IOV_MAX pieces, resuming after short writes."""
    bufs: list[bytes | memoryview] = list(parts)
    i = 0
    while i < len(bufs):
        done = os.writev(fd, bufs[i : i + IOV_MAX])
        while i < len(bufs) and done >= len(bufs[i]):
            done -= len(bufs[i])
            i += 1
        if done:
            bufs[i] = memoryview(bufs[i])[done:]


class QueueWriter:
    """One message on its way into the queue: stream it in, then commit or abort.

    Use as a context manager; leaving the block without ``commit`` aborts.

    With ``defer=True`` nothing touches the disk before the commit: the message is kept in
    memory (the caller bounds its size and calls ``spill`` to switch to streaming), and the
    commit creates ``tmp/<id>`` and writes it in one go. The durability protocol is the same.
    """

    def __init__(
        self,
        queue: Queue,
        sender: str,
        recipients: Sequence[str],
        meta: Mapping[str, str] | None = None,
        *,
        defer: bool = False,
    ) -> None:
        self.queue = queue
        self.queue_id = new_queue_id()
        self.sender = sender
        self.recipients = tuple(recipients)
        self.meta = dict(meta or {})
        self.received = time.time()
        self.size = 0
        self._committed = False
        self._completed = False
        self._created = False
        self._fd: int | None = None
        header = encode_header(self.queue_id, sender, self.recipients, self.received, self.meta)
        self._tmp = f"{queue.dir_tmp}/{self.queue_id}"
        self._held: list[bytes] | None = [header]
        if not defer:
            self.spill()

    @property
    def held(self) -> bool:
        """True while the message is only in memory (deferred and not spilled)."""
        return self._held is not None

    def _create(self) -> int:
        mode, owner = self.queue.file_policy()
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as exc:
            self._held = None
            raise QueueError(f"cannot create {self._tmp}: {exc.strerror}") from exc
        self._created = True
        self._fd = fd
        try:
            self.queue.set_owner_mode(fd, mode, owner)
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot set the mode of {self._tmp}: {exc.strerror}") from exc
        return fd

    def spill(self) -> None:
        """Create the tmp file and write what is held; from now on writes go to disk."""
        held, self._held = self._held, None
        if held is None:
            return
        self._create()
        self._write(b"".join(held))

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise QueueError(f"writer for {self.queue_id} is already closed")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot write {self._tmp}: {exc.strerror}") from exc

    def write(self, chunk: bytes) -> None:
        """Append message bytes (CRLF line ends, already un-dot-stuffed)."""
        if self._held is not None:
            self._held.append(chunk)
        else:
            self._write(chunk)
        self.size += len(chunk)

    # The commit in public steps, so that the group commit (``pyqmail.queue.commit``) can
    # share one fsync(new/) among many messages; each message still goes
    # write -> fsync -> rename -> fsync(new/).

    def finish(self) -> None:
        """Step 1a: complete the message with its trailer (idempotent).

        A streaming writer writes it to its file; a held one keeps it in memory, for
        ``commit`` to write out in one go, or for the group commit to put into a segment
        (``SegmentWriter.add``). pyqmail-smtpd calls it in its loop thread, so the commit
        thread is left only the disk work."""
        if self._completed:
            return
        self._completed = True
        trailer = encode_trailer(self.queue_id, self.size)
        if self._held is not None:
            self._held.append(trailer)
        else:
            self._write(trailer)

    def record(self) -> list[bytes]:
        """The complete message file of a finished held writer, as buffers."""
        if self._held is None or not self._completed:
            raise QueueError(f"writer for {self.queue_id} is not a finished held message")
        return self._held

    def drop_record(self) -> None:
        """The record is in a segment file now: let its bytes go (the commit that follows
        needs only the envelope), so messages waiting for their batch hold no body."""
        if self._held is not None:
            self._held = []

    def _sync(self) -> None:
        """Step 1b: fsync and close."""
        fd, self._fd = self._fd, None
        if fd is None:
            raise QueueError(f"writer for {self.queue_id} is already closed")
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot commit {self.queue_id}: {exc.strerror or exc}") from exc

    def _publish(self) -> None:
        """Step 2: rename into new/ (its fsync follows, once per batch)."""
        try:
            os.rename(self._tmp, f"{self.queue.dir_new}/{self.queue_id}")
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot commit {self.queue_id}: {exc.strerror or exc}") from exc

    def sync_publish(self) -> None:
        """Steps 1b and 2 of a file of its own: fsync, close, rename into new/ (the caller
        fsyncs new/ once per batch, then takes the ``envelope``). A failure raises
        QueueError and leaves nothing in tmp/."""
        self._sync()
        self._publish()

    def envelope(self) -> Envelope:
        """Once published and new/ is fsynced: the committed message's envelope (from now
        on leaving the writer does not remove the file)."""
        self._committed = True
        return Envelope(
            self.queue_id, self.sender, self.recipients, self.size, self.received, self.meta
        )

    def unpublish(self) -> None:
        """The rename happened but new/ could not be fsynced: the message is refused, so
        take it back out of new/ (best effort) rather than deliver it and its retry."""
        self.abort()
        with contextlib.suppress(OSError):
            os.unlink(f"{self.queue.dir_new}/{self.queue_id}")

    def commit(self) -> Envelope:
        """Trailer, fsync, rename into new/, fsync new/, poke the reader. Then reply 250."""
        self.finish()
        self.spill()
        self._sync()
        self._publish()
        try:
            self.queue.sync_new()
        except OSError as exc:
            self.unpublish()
            raise QueueError(f"cannot commit {self.queue_id}: {exc.strerror or exc}") from exc
        env = self.envelope()
        self.queue.poke()
        return env

    def abort(self) -> None:
        """Drop the tmp file (or the held bytes); safe to call more than once."""
        self._held = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if not self._committed and self._created:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)

    def __enter__(self) -> QueueWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()


_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})
_NO_LINK = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.EXDEV, errno.EOPNOTSUPP})
_TMPFILE: dict[str, bool] = {}  # per tmp/ directory: O_TMPFILE and /proc/self/fd work


def _tmpfile_ok(directory: str) -> bool:
    ok = _TMPFILE.get(directory)
    if ok is None:
        ok = _TMPFILE[directory] = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
    return ok


class SegmentWriter:
    """One segment file on its way into the queue, filled in steps, then committed.

    pyqmail-smtpd fills it in its loop thread (``add``: one writev per pass, into the page
    cache) for as long as its commit thread is busy with the previous batch, then ``seal``s
    it; the commit thread only does ``sync_publish`` (fsync, close, link or rename into new/)
    and the shared fsync(new/). Any failure raises QueueError and fails every message in it;
    ``abort`` leaves nothing behind.
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.segment_id = new_queue_id()
        self.tmp: str | None = None  # its name in tmp/; None while it is an unnamed file
        self.writers: list[QueueWriter] = []
        self._parts: list[bytes] = [SEGMENT_MAGIC]
        self._published = False
        self._fd: int | None = None
        mode, owner = queue.file_policy()
        if _tmpfile_ok(queue.dir_tmp):
            # An unnamed file (O_TMPFILE), linked into new/ once complete: creating it does
            # not lock tmp/, which another worker's rename(tmp/x, new/x) may hold for as
            # long as a third process's fsync(new/) holds new/ (ext4 without a journal
            # holds a directory's lock for its fsync's I/O). Nothing to clean after a crash.
            try:
                self._fd = os.open(queue.dir_tmp, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, mode)
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE:
                    raise QueueError(
                        f"cannot create a file in {queue.dir_tmp}: {exc.strerror}"
                    ) from exc
                _TMPFILE[queue.dir_tmp] = False
        if self._fd is None:
            self.tmp = f"{queue.dir_tmp}/{self.segment_id}"
            try:
                self._fd = os.open(
                    self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode
                )
            except OSError as exc:
                raise QueueError(f"cannot create {self.tmp}: {exc.strerror}") from exc
        try:
            queue.set_owner_mode(self._fd, mode, owner)  # see QueueWriter._create
        except OSError as exc:
            self.abort()
            raise QueueError(
                f"cannot set the mode of a file in {queue.dir_tmp}: {exc.strerror}"
            ) from exc

    def _flush(self, parts: list[bytes]) -> None:
        if self._fd is None:
            raise QueueError(f"segment {self.segment_id} is already closed")
        try:
            _writev_all(self._fd, parts)
        except OSError as exc:
            self.abort()
            raise QueueError(
                f"cannot write segment {self.segment_id}: {exc.strerror or exc}"
            ) from exc

    def add(self, writers: Sequence[QueueWriter]) -> None:
        """Append finished held messages (one writev for all of them)."""
        parts, self._parts = self._parts, []
        for w in writers:
            record = w.record()
            parts.append(b"%020d\n" % sum(map(len, record)))
            parts.extend(record)
        self._flush(parts)
        for w in writers:
            w.drop_record()
        self.writers.extend(writers)

    def seal(self) -> None:
        """Write the trailer: no message can be added any more."""
        if not self.writers:
            raise QueueError(f"segment {self.segment_id} has no messages")
        self._flush([encode_segment_trailer(self.segment_id, len(self.writers))])

    def sync_publish(self) -> None:
        """fsync, close, link or rename into new/ (the caller fsyncs new/ once per batch)."""
        fd, self._fd = self._fd, None
        if fd is None:
            raise QueueError(f"segment {self.segment_id} is already closed")
        target = f"{self.queue.dir_new}/{self.segment_id}"
        try:
            try:
                os.fsync(fd)
                if self.tmp is None:
                    self._link(fd)
            finally:
                os.close(fd)
            if self.tmp is not None:
                os.rename(self.tmp, target)
        except OSError as exc:
            self.abort()
            raise QueueError(
                f"cannot commit segment {self.segment_id}: {exc.strerror or exc}"
            ) from exc
        self._published = True

    def _link(self, fd: int) -> None:
        """Give the unnamed file its name in new/: linkat(AT_SYMLINK_FOLLOW) through
        /proc/self/fd (os.link without a dir_fd would call link(), which does not follow).
        Where that is refused (an unusual /proc, a security module), this segment fails
        (its clients get 451 and send again) and later ones use named tmp files."""
        try:
            os.link(
                f"/proc/self/fd/{fd}",
                self.segment_id,
                dst_dir_fd=self.queue.new_dir_fd(),
                follow_symlinks=True,
            )
        except OSError as exc:
            if exc.errno in _NO_LINK:
                _TMPFILE[self.queue.dir_tmp] = False
            raise

    def envelopes(self) -> list[Envelope]:
        """Once published and new/ is fsynced: the envelope of each message, in order."""
        return [w.envelope() for w in self.writers]

    def unpublish(self) -> None:
        """new/ could not be fsynced: take the segment back out (see QueueWriter.unpublish)."""
        if self._published:
            with contextlib.suppress(OSError):
                os.unlink(f"{self.queue.dir_new}/{self.segment_id}")
            self._published = False
        self.abort()

    def abort(self) -> None:
        """Close and remove the tmp file and drop the messages' bytes (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self._published and self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
        for w in self.writers:
            w.abort()


class Queue:
    """A queue directory. Safe for many writer processes and one reader."""

    def __init__(self, root: str | os.PathLike[str], *, umask: int | None = None) -> None:
        self.root = Path(root)
        self.dir_tmp = str(self.root / "tmp")
        self.dir_new = str(self.root / "new")
        self._trigger = str(self.root / TRIGGER)
        self._poke_fd: int | None = None
        self._poke_retry = 0.0  # monotonic time before which no reader was listening
        self._poke_lock = threading.Lock()
        self._new_fd: int | None = None  # new/ stays open for its fsyncs
        # The process umask when its owner vouches for it (pyqmail-smtpd sets its own);
        # None: unknown, so every new file gets an fchmod.
        self.umask = umask
        self._policy: tuple[int, int | None] | None = None  # see file_policy

    def path(self, sub: str, queue_id: str = "") -> Path:
        return self.root / sub / queue_id if queue_id else self.root / sub

    def file_policy(self) -> tuple[int, int | None]:
        """Mode of a new queue file, and the uid to hand it to (None: keep ours).

        Only pyqmail-send, the owner of ``new/``, is to read it besides its writer: the
        owner writes it 0600; root writes it 0600 for the owner (cron's sendmail); any
        other writer (pyqmail-smtpd, a member of the group) writes it 0640 and the owner
        reads it through the group, the directories being setgid. Worked out once."""
        policy = self._policy
        if policy is None:
            euid = os.geteuid()
            try:
                owner = os.stat(self.dir_new).st_uid
            except OSError:
                owner = -1  # no new/: the commit will fail and say so; nothing to hand over
            if euid == owner:
                policy = (PRIVATE_FILE, None)
            elif euid == 0 and owner >= 0:
                policy = (PRIVATE_FILE, owner)
            else:
                policy = (SHARED_FILE, None)
            self._policy = policy
        return policy

    def set_owner_mode(self, fd: int, mode: int, owner: int | None) -> None:
        """Give a file just created with ``mode`` its owner, and its mode whatever the
        umask: cron's sendmail as root with umask 077 must still queue mail pyqmail-send can
        read. No fchmod when the process vouched for a umask that keeps the mode."""
        if owner is not None:
            os.fchown(fd, owner, -1)
        if owner is not None or self.umask is None or self.umask & mode:
            os.fchmod(fd, mode)

    def create(self) -> None:
        """Make the directories with the modes of ``LAYOUT`` and the trigger FIFO
        (idempotent; the modes of existing directories are set again). The caller gives
        the tree to pyqmail-send's user and the group (the role pyqmail_control does)."""
        if not self.root.is_dir():
            self.root.mkdir(mode=ROOT_MODE, parents=True)
            self.root.chmod(ROOT_MODE)
        for sub, mode in LAYOUT.items():
            self.path(sub).mkdir(mode=mode & 0o777, exist_ok=True)
            self.path(sub).chmod(mode)  # mkdir drops setgid and applies the umask
        trigger = self.root / TRIGGER
        if not trigger.exists():
            os.mkfifo(trigger, 0o620)
            trigger.chmod(0o620)

    def check(self) -> None:
        """Raise QueueError naming the first missing piece of the layout."""
        for sub in SUBDIRS:
            if not self.path(sub).is_dir():
                raise QueueError(f"queue directory missing: {self.path(sub)}")

    def writer(
        self, sender: str, recipients: Sequence[str], meta: Mapping[str, str] | None = None
    ) -> QueueWriter:
        """Start streaming one message into tmp/ (see QueueWriter)."""
        return QueueWriter(self, sender, recipients, meta)

    def enqueue(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        meta: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Durably commit a whole message at once; return its envelope."""
        with self.writer(sender, recipients, meta) as w:
            w.write(message)
            return w.commit()

    def poke(self) -> None:
        """Wake the reader through the FIFO; silently skipped if nobody listens.

        The FIFO stays open between pokes (one write per poke). When nobody listens
        (ENXIO on open, EPIPE on write) it is closed, and re-opened at the earliest
        POKE_RETRY seconds later; the reader scans new/ when it starts anyway."""
        with self._poke_lock:
            fd = self._poke_fd
            if fd is None:
                now = time.monotonic()
                if now < self._poke_retry:
                    return
                try:
                    fd = os.open(self._trigger, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    self._poke_retry = now + POKE_RETRY
                    return
                self._poke_fd = fd
            try:
                os.write(fd, b"!")
            except OSError as exc:
                if exc.errno == errno.EAGAIN:  # full: the reader has plenty to wake it
                    return
                self._poke_fd = None
                os.close(fd)
                if exc.errno != errno.EPIPE:
                    raise

    def new_dir_fd(self) -> int:
        """A descriptor of new/, kept open (for its fsyncs and for linking into it)."""
        fd = self._new_fd
        if fd is None:
            fd = self._new_fd = os.open(self.dir_new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd

    def sync_new(self) -> None:
        """fsync(new/) through a descriptor kept open (one syscall per batch, not three)."""
        os.fsync(self.new_dir_fd())

    def close(self) -> None:
        """Close the trigger FIFO if a poke left it open, and new/ if a commit opened it."""
        with self._poke_lock:
            fd, self._poke_fd = self._poke_fd, None
            if fd is not None:
                os.close(fd)
        fd, self._new_fd = self._new_fd, None
        if fd is not None:
            os.close(fd)

    def load(self, sub: str, name: str) -> list[Stored]:
        """Read and verify ``<sub>/<name>``: its one message, or every one of a segment."""
        path = f"{self.root}/{sub}/{name}"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise QueueError(f"cannot read {path}: {exc.strerror}") from exc
        return parse_file(data, path)

    def read_stored(self, sub: str, name: str, span: tuple[int, int] | None) -> Stored:
        """Read one message again: the whole file ``<sub>/<name>``, or the record of the
        segment at ``span`` (verified again: header and trailer)."""
        if span is None:
            stored = self.load(sub, name)
            if len(stored) != 1:
                raise QueueError(f"{self.path(sub, name)} is a segment of {len(stored)} messages")
            return stored[0]
        path = f"{self.root}/{sub}/{name}"
        offset, length = span
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            raise QueueError(f"cannot read {path}: {exc.strerror}") from exc
        env, body = parse_message(data, f"{path} at byte {offset}")
        return Stored(env, body, span)

    def ids(self, sub: str) -> list[str]:
        """Queue ids in ``sub``, oldest first (ids begin with the time in hex ns)."""
        try:
            names = os.listdir(self.path(sub))
        except FileNotFoundError:
            return []
        return sorted((n for n in names if not n.startswith(".")), key=_id_order)

    def quarantine(self, sub: str, queue_id: str) -> Path:
        """Move a file that failed verification to ``bad/`` for the admin."""
        target = self.path("bad", queue_id)
        os.rename(self.path(sub, queue_id), target)
        _fsync_dir(self.path("bad"))
        return target

    def clean_tmp(self, older_than: float = 36 * 3600) -> list[str]:
        """Remove tmp files older than ``older_than`` seconds (crashed writers), as qmail does."""
        removed = []
        cutoff = time.time() - older_than
        for entry in os.scandir(self.path("tmp")):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(entry.name)
        return removed


def _id_order(name: str) -> tuple[int, str]:
    head = name.split(".", 1)[0]
    try:
        return int(head, 16), name
    except ValueError:
        return 0, name


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Public helper for the delivery side's own renames (Maildir, state files)."""
    _fsync_dir(Path(path))
