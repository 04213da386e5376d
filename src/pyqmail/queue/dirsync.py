"""One directory's fsync shared by the threads that link or rename files into it, with a
failure reaching every thread whose entry it was to make durable.

Used for a Maildir's new/ (``pyqmail.send.local``), the queue's new/ (``Queue.sync_new``:
in pyqmail-send a forward, committed in the local link's thread, and a bounce, committed by
the main loop, both sync it) and the queue's state/ (a delivery's first record,
``pyqmail.queue.state.append_state``, and the DKIM pickup's signatures,
``pyqmail.dkim.pickup``, made by different threads of pyqmail-send).

The rule: ``sync()`` returns once an fsync of the directory that *started after the call*
has completed. Calls wait in a *run*: the first call while no run is waiting opens one,
later calls join it, and once the fsync in flight (if any) is done, one of its callers
runs the fsync for all of them. So deliveries that finish together share one fsync.

Why a failed fsync fails every caller whose entry it was to make durable, and none of them
tries again: on Linux, once a failed fsync has reported its error, the directory's lost
changes are gone, and the next fsync (through the same descriptor or a new one) returns 0
without writing them. A caller that ran its own fsync after someone else's failure would be
told its link is durable when it may not be: a message reported delivered, or queued, that
a power loss takes away. So a caller takes a ``ticket()`` *before* its link or rename, and
``sync(ticket)`` raises an OSError if any fsync of the directory failed since then, its own
run's or one that ran between its link and its call (its delivery is deferred, its commit
refused: at worst a duplicate later). The next caller, with a ticket taken after that
failure, goes on as before.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections.abc import Callable
from typing import ClassVar


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, making the renames and unlinks in it durable (the queue's own,
    and the delivery side's: Maildir, state files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Run:
    """One fsync, and the calls it answers."""

    __slots__ = ("done", "error", "failures")

    def __init__(self) -> None:
        self.done = False
        self.error: OSError | None = None
        self.failures = 0  # the directory's failed fsyncs when this one ended, itself included


class DirSync:
    """The group fsync of one directory (see the module docstring)."""

    _registry: ClassVar[weakref.WeakValueDictionary[str, DirSync]] = weakref.WeakValueDictionary()
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None  # opened by the first ``ticket(open_fd=True)``: see there
        self.cond = threading.Condition()
        self.waiting: _Run | None = None  # the run that calls join: not started yet
        self.running = False  # a run's fsync is in flight
        self.fsyncs = 0  # fsyncs run (for tests and curiosity)
        self.failures = 0  # of which failed
        self.last_error: OSError | None = None  # the latest failure's

    @classmethod
    def of(cls, path: str) -> DirSync:
        """The shared object for ``path`` (kept while some thread uses it)."""
        with cls._registry_lock:
            obj = cls._registry.get(path)
            if obj is None:
                obj = cls._registry[path] = cls(path)
            return obj

    def ticket(self, *, open_fd: bool = True) -> int:
        """Taken before a link or rename into the directory, for ``sync``: the failed
        fsyncs so far. It also opens the descriptor the fsyncs go through (``open_fd``;
        the queue passes False and fsyncs through its own, opened the same way), so that
        it exists before the link: a descriptor opened after another process's fsync of
        the directory had failed and reported it would not report that failure."""
        with self.cond:
            if open_fd and self.fd is None:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return self.failures

    def __del__(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def sync(self, ticket: int, fsync: Callable[[], None] | None = None) -> None:
        """Return once an fsync that started after this call has completed; OSError if
        it failed, or if another one failed since ``ticket`` (taken before the link or
        rename this fsync is to make durable: no default, a ticket taken here would not
        see a failure between the two). See the
        module docstring: no second try. ``fsync`` does the work if this thread runs it
        (the queue's: through its kept descriptor); by default it goes through the
        descriptor ``ticket`` opened. Passed per call, not kept: a queue that kept a
        DirSync holding its own method would never be freed by reference counting."""
        with self.cond:
            run = self.waiting
            if run is None:
                run = self.waiting = _Run()
            while not run.done and (self.running or self.waiting is not run):
                self.cond.wait()
            if not run.done:  # this thread runs it for everyone in it
                self.running = True
                self.waiting = None
        if not run.done:
            self._run(run, fsync or self._fsync)
        error = run.error
        if error is None and run.failures > ticket:
            error = self.last_error
        if error is not None:  # a fresh exception per caller: each thread has its traceback
            raise OSError(error.errno, error.strerror or str(error), self.path)

    def _fsync(self) -> None:
        """Through the descriptor ``ticket`` opened, or one opened now (the tickets
        were taken with ``open_fd=False`` and no ``fsync`` was given)."""
        fd = self.fd
        if fd is None:
            fsync_dir(self.path)
        else:
            os.fsync(fd)

    def _run(self, run: _Run, fsync: Callable[[], None]) -> None:
        # anything but a clean return fails the run (an exception that is no OSError
        # goes on up in this thread; the others get this one)
        error: OSError | None = OSError(errno.EIO, "the fsync did not complete")
        try:
            fsync()
            error = None
        except OSError as exc:
            # kept without its traceback, whose frames (the batch, the message, the queue
            # itself through ``fsync``) would otherwise live as long as this object
            error = OSError(exc.errno, exc.strerror or str(exc))
        finally:
            with self.cond:
                run.error = error
                run.done = True
                self.running = False
                self.fsyncs += 1
                if error is not None:
                    self.failures += 1
                    self.last_error = error
                run.failures = self.failures
                self.cond.notify_all()
