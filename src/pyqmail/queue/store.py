"""The queue directory shared by pyqmail-smtpd (writer) and pyqmail-send (reader): its
layout, its modes, and reading the messages stored in it.

Layout under the queue root (``/var/qmail/queue`` by default; how a message moves through
it: ``README.md`` in this package)::

    tmp/      messages being written; never read by anyone but their writer
    new/      committed messages that pyqmail-send has not picked up yet
    mess/     messages pyqmail-send has picked up
    state/    per-message delivery progress, one file per message in mess/
              (``pyqmail.queue.state``)
    bad/      files that failed verification, kept for the admin
    lock/trigger   a FIFO; writers poke it after each commit so the reader wakes at once
    lock/sendpid   pyqmail-send's pid, under its exclusive fcntl lock (``PIDFILE``)

The file format is ``pyqmail.queue.format``'s; writing and committing a message is
``pyqmail.queue.writer``'s (``Queue.enqueue`` uses it for a whole message), and the
group commit of pyqmail-smtpd is ``pyqmail.queue.commit``'s.

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
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from pyqmail.queue.dirsync import DirSync, fsync_dir
from pyqmail.queue.format import (
    Envelope,
    QueueError,
    QueueUnreadableError,
    Stored,
    id_order,
    parse_file,
    parse_message,
)
from pyqmail.queue.writer import QueueWriter

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
PIDFILE = "lock/sendpid"  # pyqmail-send's pid, locked while it runs (pyqmail-queue flush)
# The largest queue file ``Queue.load`` reads: it reads a file whole (pickup, start-up, every
# delivery), so a larger one could never be delivered anyway, and any member of the group
# can put a file into new/: unbounded, a sparse file of a terabyte there made pyqmail-send
# die of MemoryError at every start. databytes is unlimited by default (qmail's), so no
# control file bounds what the queue takes; 2 GiB is far past what any MTA on the way
# accepts (typically 25-150 MB), and a file larger than it fails verification (bad/).
MAX_QUEUE_FILE = 2 * 1024 * 1024 * 1024
# The largest message pyqmail-smtpd accepts whatever databytes says (0, unlimited, included):
# the queue file's limit less room for the envelope (1,000 recipients) and the header, so
# nothing it acknowledges can fail verification for its size (552 at the limit instead).
MAX_MESSAGE = MAX_QUEUE_FILE - 1024 * 1024
PIECE = 16 * 1024 * 1024  # bytes read at once from a queue file that grows as it is read


def _open_regular(path: str) -> int:
    """A queue file opened for reading. Anything but a regular file is refused with a
    QueueError (it fails verification): every member of the queue's group may put a name
    into new/, and a FIFO there would block the reader's open forever (no delivery at all),
    a symlink would make it read some other file. O_NONBLOCK changes nothing for a regular
    file. Any other failure is a QueueUnreadableError (``_unreadable``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a socket
            raise QueueError(f"{path} is not a regular file") from exc
        raise _unreadable(path, exc) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise _unreadable(path, exc) from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise QueueError(f"{path} is not a regular file")
    return fd


def _unreadable(path: str, exc: OSError) -> QueueUnreadableError:
    return QueueUnreadableError(f"cannot read {path}: {exc.strerror or exc}", exc.errno)


def _read_bounded(f: BinaryIO, size: int) -> bytes | None:
    """The file's bytes, or None if it holds more than ``MAX_QUEUE_FILE``, found without
    reading past that bound: a larger ``size`` (its fstat) is not read at all, and one
    that grows while it is read (its writer may keep it open) is read on in pieces only
    up to the bound (one read of ``size + 1`` bytes in the usual case)."""
    if size > MAX_QUEUE_FILE:
        return None
    parts = [f.read(size + 1)]
    total = len(parts[0])
    while size < total <= MAX_QUEUE_FILE:  # it grew
        more = f.read(min(PIECE, MAX_QUEUE_FILE + 1 - total))
        if not more:
            break
        parts.append(more)
        total += len(more)
    return b"".join(parts) if total <= MAX_QUEUE_FILE else None


class Queue:
    """A queue directory. Safe for many writer processes and one reader."""

    def __init__(self, root: str | os.PathLike[str], *, umask: int | None = None) -> None:
        self.root = Path(root)
        self.dir_tmp = str(self.root / "tmp")
        self.dir_new = str(self.root / "new")
        self._trigger = str(self.root / TRIGGER)
        self._poke_fd: int | None = None
        self._poke_lock = threading.Lock()
        self._new_fd: int | None = None  # new/ stays open for its fsyncs
        self._new_sync = DirSync(self.dir_new)  # see sync_new
        self._new_fd_lock = threading.Lock()
        # The process umask when its owner vouches for it (pyqmail-smtpd sets its own);
        # None: unknown, so every new file gets an fchmod.
        self.umask = umask
        self._policy: tuple[int, int | None] | None = None  # see file_policy
        self._dirs: dict[str, Path] = {}  # see path

    def path(self, sub: str, queue_id: str = "") -> Path:
        """``<root>/<sub>[/<queue_id>]``. The directories' Paths are made once: pyqmail-send
        asks for mess/, new/ and state/ at every pickup and every batch of ends, and a Path
        built afresh parses and formats itself again each time."""
        base = self._dirs.get(sub)
        if base is None:
            base = self._dirs[sub] = self.root / sub
        return base / queue_id if queue_id else base

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

    def enqueue(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        meta: Mapping[str, str] | None = None,
    ) -> Envelope:
        """Durably commit a whole message at once; return its envelope. (Messages that
        arrive in pieces are streamed by a ``QueueWriter`` of their own.)"""
        with QueueWriter(self, sender, recipients, meta) as w:
            w.write(message)
            return w.commit()

    def poke(self) -> None:
        """Wake the reader through the FIFO; silently skipped if nobody listens.

        The FIFO stays open between pokes (one write per poke). When nobody listens
        (ENXIO on open, EPIPE on write) it is closed, and the next poke opens it again:
        pyqmail-send opens the FIFO before its start-up scan of new/, so a message
        committed after that scan began is in new/ after the FIFO had a reader, and its
        poke reaches it. (Pokes were once skipped for a second after an ENXIO, to spare
        the open while pyqmail-send is down; a reader that started within that second
        missed the skipped pokes of messages committed after its scan, until some later
        poke. The open that fails costs about 20 us, next to the fsyncs of every commit.)"""
        with self._poke_lock:
            fd = self._poke_fd
            if fd is None:
                try:
                    fd = os.open(self._trigger, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
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
            with self._new_fd_lock:  # two threads' first commits must not open two
                fd = self._new_fd
                if fd is None:
                    fd = os.open(self.dir_new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    self._new_fd = fd
        return fd

    def new_ticket(self) -> int:
        """Taken before a rename or link into new/, for ``sync_new``."""
        return self._new_sync.ticket(open_fd=False)  # new_dir_fd is the one

    def sync_new(self, ticket: int) -> None:
        """fsync(new/) through a descriptor kept open (one syscall per batch, not three),
        shared by the threads that commit at once; OSError if it fails, or if one failed
        since ``ticket`` (``pyqmail.queue.dirsync`` says why no commit may try again)."""
        self._new_sync.sync(ticket, self._fsync_new)

    def _fsync_new(self) -> None:
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

    def __del__(self) -> None:
        """A queue nobody holds any more closes its descriptors: a HUP that moves a
        pyqmail-smtpd worker to another queue directory drops the old ``Queue`` once its
        last message is committed, and would otherwise leak its new/ and FIFO descriptors
        for the worker's life. Nothing can use them then (every user holds the object)."""
        with contextlib.suppress(Exception):  # at interpreter exit, whatever is left
            self.close()

    def load(self, sub: str, name: str, *, named: bool = True) -> list[Stored]:
        """Read and verify ``<sub>/<name>``: its one message, or every one of a segment; a
        file not named by its id fails verification (``parse_file``) unless ``named`` is
        False (looking into bad/, where such files go)."""
        path = f"{self.root}/{sub}/{name}"
        fd = _open_regular(path)
        try:
            with open(fd, "rb") as f:
                data = _read_bounded(f, os.fstat(fd).st_size)
            if data is not None:
                return parse_file(data, path, name if named else None)
        except OSError as exc:  # the fstat, the read, or the close
            raise _unreadable(path, exc) from exc
        raise QueueError(f"{path} is larger than {MAX_QUEUE_FILE} bytes (MAX_QUEUE_FILE)")

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
        fd = _open_regular(path)
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        finally:
            os.close(fd)
        env, body = parse_message(data, f"{path} at byte {offset}")
        return Stored(env, body, span)

    def ids(self, sub: str) -> list[str]:
        """Queue ids in ``sub``, oldest first (ids begin with the time in hex ns)."""
        try:
            names = os.listdir(self.path(sub))
        except FileNotFoundError:
            return []
        return sorted((n for n in names if not n.startswith(".")), key=id_order)

    def quarantine(self, sub: str, queue_id: str) -> Path:
        """Move a file that failed verification to ``bad/`` for the admin, under its name,
        or ``<name>.<n>`` if that is taken: a rename replaces its target, and a file of
        that name set aside before (an impostor named after a file already there, or the
        same name set aside twice) would be lost. The name is reserved first with an
        empty file made ``O_EXCL`` (race-free whoever else writes bad/), then the rename
        replaces that placeholder only; a crash in between leaves an empty file in bad/.
        (``link`` + ``unlink`` would not do: with fs.protected_hardlinks the queue's owner
        cannot link a file pyqmail-smtpd wrote 0640, which it can only read.)"""
        source = self.path(sub, queue_id)
        for n in range(1000):
            target = self.path("bad", queue_id if not n else f"{queue_id}.{n}")
            try:
                os.close(
                    os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                )
            except FileExistsError:
                continue
            try:
                os.rename(source, target)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(target)
                raise
            fsync_dir(self.path("bad"))
            return target
        raise OSError(errno.EEXIST, f"no free name for {queue_id} in bad/")

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
