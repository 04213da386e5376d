"""Putting messages into the queue: ``QueueWriter`` (one message) and ``SegmentWriter``
(several held messages in one file), with the steps of a commit as public methods.

Durability protocol, the same for a message file and a segment (``QueueWriter.commit`` runs
it for one message, as ``Queue.enqueue`` does; ``pyqmail.queue.commit`` runs it for a batch
and sends the 250 after DATA only after it):

1. ``tmp/<id>`` is created with O_EXCL, the whole file is written, then ``fsync(file)``;
2. ``rename(tmp/<id>, new/<id>)``, then ``fsync(new/)`` (once for a whole batch);
3. the trigger FIFO is poked (best effort: a reader also scans ``new/`` on start, on ALRM
   and once a minute).

A segment is an unnamed file in tmp/ (O_TMPFILE) where the file system allows it, and
step 2 is then ``linkat`` into ``new/<id>`` instead of the rename (see ``SegmentWriter``).

A crash before step 2 leaves only a tmp file, which ``Queue.clean_tmp`` removes later, or
an unnamed one, which the file system frees; it was never acknowledged. A crash after step 2
leaves a complete message. Readers still check the header and the ``END`` trailer
(``pyqmail.queue.format``) and never deliver a file that fails them: a torn file can only
come from a disk lying about fsync, and is moved to ``bad/`` for the admin, not delivered.

Any OSError on the way (ENOSPC, EIO, EDQUOT, ...) removes the tmp file and raises
``QueueError``; the SMTP layer answers ``451 4.3.0`` and nothing is left in the queue. A
failure writing a segment fails every message in it (each client gets its 451).

Messages streamed to disk because they were large, and those queued by ``Queue.enqueue``
(the sendmail injector, bounces), are files of their own; held messages committed together
go into one segment, so that a batch costs one create, one fsync and one rename (or link)
instead of one each per message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pyqmail.queue.format import (
    SEGMENT_MAGIC,
    Envelope,
    QueueError,
    encode_header,
    encode_segment_trailer,
    encode_trailer,
    new_queue_id,
)
from pyqmail.queue.writeall import write_all, writev_all

if TYPE_CHECKING:  # the Queue creates writers; a writer only uses the Queue it is given
    from pyqmail.queue.store import Queue


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
        self._published = False  # renamed into new/ (not yet durable: new/ is fsynced after)
        self._fd: int | None = None
        header = encode_header(self.queue_id, sender, self.recipients, self.received, self.meta)
        self._tmp = f"{queue.dir_tmp}/{self.queue_id}"
        self._held: list[bytes] | None = [header]
        self._header_size = len(header)
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
            write_all(self._fd, data)
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot write {self._tmp}: {exc.strerror or exc}") from exc

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

    def replace_held(self, message: bytes, meta: Mapping[str, str]) -> None:
        """A held message's bytes and meta, replaced before ``finish`` (the inbound checks
        put their header on top and may add meta; ``pyqmail.checks.inbound``)."""
        if self._held is None or self._completed:
            raise QueueError(f"writer for {self.queue_id} is not an unfinished held message")
        header = self._held[0]
        if meta != self.meta:  # the same meta (a scan's header edits alone): the same header
            self.meta = dict(meta)
            header = encode_header(
                self.queue_id, self.sender, self.recipients, self.received, self.meta
            )
        self._held = [header, message]
        self.size = len(message)

    def message_bytes(self) -> bytes:
        """The message so far, without the queue header: held, or read back from the tmp
        file of a spilled writer (blocking: the inbound checks read it in a worker thread)."""
        if self._completed:
            raise QueueError(f"writer for {self.queue_id} is finished")
        if self._held is not None:
            return b"".join(self._held[1:])
        try:
            with open(self._tmp, "rb") as file:
                file.seek(self._header_size)
                return file.read()
        except OSError as exc:
            raise QueueError(f"cannot read {self._tmp}: {exc.strerror}") from exc

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
        """Step 2: rename into new/ (its fsync follows, once per batch). new/'s kept
        descriptor is opened first: a descriptor opened after a failed fsync of new/ had
        reported its error would not see it (``pyqmail.queue.dirsync``)."""
        try:
            self.queue.new_dir_fd()
            os.rename(self._tmp, f"{self.queue.dir_new}/{self.queue_id}")
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot commit {self.queue_id}: {exc.strerror or exc}") from exc
        self._published = True

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
        """The message is refused after all (new/ could not be fsynced, or the commit
        failed later): take it back out of new/ if it got there (best effort), and out of
        tmp/, rather than deliver it and its retry."""
        self.abort()
        if self._published:
            with contextlib.suppress(OSError):
                os.unlink(f"{self.queue.dir_new}/{self.queue_id}")
            self._published = False

    def commit(self) -> Envelope:
        """Trailer, fsync, rename into new/, fsync new/, poke the reader. Then reply 250."""
        self.finish()
        self.spill()
        self._sync()
        ticket = self.queue.new_ticket()
        self._publish()
        try:
            self.queue.sync_new(ticket)
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
    cache) for as long as the previous batch is being committed, then ``seal``s it; the
    commit (its thread, or the loop when every session waits: ``pyqmail.queue.commit``)
    only does ``sync_publish`` (fsync, close, link or rename into new/) and the shared
    fsync(new/). Any failure raises QueueError and fails every message in it; ``abort``
    leaves nothing behind.
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
            writev_all(self._fd, parts)
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
                self.queue.new_dir_fd()  # before the link or rename: see _publish
                os.fsync(fd)
                if self.tmp is None:
                    self._link(fd)
                    self._published = True
            finally:
                os.close(fd)
            if self.tmp is not None:
                os.rename(self.tmp, target)
                self._published = True
        except OSError as exc:
            # A close that fails after the link (EIO, an NFS server) fails the segment
            # too: its clients get 451, so it must not stay in new/ to be delivered.
            self.unpublish()
            raise QueueError(
                f"cannot commit segment {self.segment_id}: {exc.strerror or exc}"
            ) from exc

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
        """Refused after all: take the segment back out of new/ (see QueueWriter.unpublish)."""
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
