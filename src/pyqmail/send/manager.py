"""pyqmail-send: the queue manager (qmail-send), driving local and remote delivery.

Pickup protocol (new/ -> mess/): on start, on ALRM, whenever the trigger FIFO is poked, and
every ``RESCAN_NEW`` seconds in any case (``_rescan_new``), every file in ``new/`` is
verified (``parse_file``: header and END trailer of each message, and a segment's record
count; a torn file goes to ``bad/``), renamed into ``mess/``, and
``mess/`` then ``new/`` are fsynced once per batch before any delivery of those messages
starts (a batch: at most ``PICKUP_BATCH`` bytes, or one larger file, so that a backlog
is not read into memory at once). A crash before the fsyncs leaves the file in ``new/``
(or already in ``mess/``): either way it is picked up again; nothing was delivered yet.
Once both are fsynced the name is gone from ``new/`` for good, so a message cannot come
back there after it was delivered.

Failing to read is not failing verification: a file of ``new/`` or ``mess/`` that cannot be
read now (EIO, EMFILE, EACCES after a wrong chown: ``QueueUnreadableError``), or whose state
files cannot, stays where it is with its state and is read again every ``UNREAD_RETRY``
seconds (``_hold``, ``_hold_new``, ``_read_again``); only a file that fails verification
(torn, not a regular file, not named by its id) goes to ``bad/``. ALRM reads everything
held again at once. A pickup whose fsyncs fail holds the same way what it moved (scheduled
once ``mess/`` and ``new/`` sync) and leaves in ``new/`` what it signed.

DKIM (``pyqmail.dkim``): before the rename, every message the policy signs gets its
DKIM-Signature fields, written to ``state/<file>`` and synced (``pyqmail.dkim.pickup``: one
fdatasync per queue file holding signed messages, one fsync of ``state/`` per batch, nothing
for unsigned mail). Every delivery puts them in front of the message; a retry or a restart
reuses them. The keys are loaded here (``self.dkim``), at start and on HUP, and never leave
this process.

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
removed on start, unless a file of ``mess/`` cannot be read then: see above).

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
local deliveries and ``concurrencyremote`` SMTP connections run at once, at most
``concurrencydestination`` of them to one destination; a remote worker keeps its
connection and takes the next ready job for the same destination (``pyqmail.send.scheduler``:
a destination with no connection to be had defers its other ready jobs at once).

Processes: the deliveries run in two child processes, remote and local, each under its
own user (``--remote-user``, ``--local-user``); this process sends them each message's bytes
and records what they answer. See ``pyqmail.send.spawn``. The code is in four modules:
this one (signals, the loop, the command line), ``pyqmail.send.loader`` (start-up, pickup,
reading again what could not be read), ``pyqmail.send.scheduler`` (the in-memory model,
retries, slots) and ``pyqmail.send.finisher`` (outcomes, ends, bounces).

Signals: ALRM retries every deferred recipient now (and rescans ``new/``, reading again what
could not be read), HUP reloads the control files, TERM stops starting deliveries, waits
for those in flight, exits 0.
``--check`` loads the configuration (control files, clientcert.pem, tlshosts pins, queue
layout) and exits 0 or 111 without touching the queue (used before ``svc -h``/``svc -t``).
The process holds an exclusive POSIX record lock on ``<queue>/lock/sendpid`` (which holds
its pid: ``lock_pidfile``); ``pyqmail-queue flush`` asks the kernel which process holds
that lock and sends it ALRM.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pyqmail.control.check import check_send
from pyqmail.control.send import Control, ControlError
from pyqmail.dkim import keys as dkim_keys
from pyqmail.dkim.keys import Key
from pyqmail.privs import Identity, PrivilegeError, drop, resolve
from pyqmail.queue.format import QueueError
from pyqmail.queue.store import PIDFILE, Queue
from pyqmail.send.loader import Loader
from pyqmail.send.local import LocalDelivery
from pyqmail.send.mx import Resolver
from pyqmail.send.remote import RemoteDelivery
from pyqmail.send.scheduler import Msg, Segment, load_msg, nextretry
from pyqmail.send.spawn import Children, stop_children

__all__ = ["Log", "Manager", "load_msg", "main", "nextretry"]

CLEAN_TMP_EVERY = 3600.0
MAX_SLEEP = 60.0
# seconds between scans of new/ that no poke asked for: the safety net under the trigger
# FIFO, whose pokes are best effort (a writer that cannot open it, an admin who made it
# anew, a bug) and were once lost at every start (``Queue.poke``). A scan of an empty
# new/ is one listdir, so once a minute costs nothing; a message whose poke was lost
# waits at most that long. (qmail-send scans todo/ every 25 minutes for the same reason.)
RESCAN_NEW = 60.0


# -- the manager ------------------------------------------------------------------------


class Log:
    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()


class Manager(Loader):
    """The queue manager: signals and the main loop (this module's docstring); start-up
    and pickup in ``Loader``, scheduling in ``Scheduler``, completion in ``Finisher``."""

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
        self.dkim: dict[str, list[Key]] = dkim_keys.load(self.control.control)
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
        # a bounce or an end that failed, a segment's unlink: name -> when it is tried
        self.finish_later: dict[str, float] = {}  # again (``Finisher.finish``)
        self.segments_later: dict[str, float] = {}
        self.segments: dict[str, Segment] = {}
        self.segments_done: set[str] = set()  # every message ended: remove the file
        # files of mess/ and new/ that could not be read: name -> when they are read
        self.unread: dict[str, float] = {}  # again (``Loader._read_again``)
        self.new_held: dict[str, float] = {}
        self.stopping = False
        self.status = 0  # exit status of run()
        self.flags: set[str] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # threads are made on demand; the limits are enforced by busy_* so HUP can change them
        self.local_pool = ThreadPoolExecutor(1000, "local")
        self.remote_pool = ThreadPoolExecutor(1000, "remote")
        self._last_clean = 0.0
        self._next_rescan = time.monotonic() + RESCAN_NEW  # see _rescan_new
        self.body_bytes = 0  # held in Msg.body, at most BODY_CACHE
        self.children = children or Children.start(resolver)
        self.children.connect(self.control, self.log, self.wake)
        weakref.finalize(self, stop_children, self.children)

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

    def _rescan_new(self) -> None:
        """Pick up new/ every ``RESCAN_NEW`` seconds, poked or not: a message committed
        while no poke reached us would otherwise wait in new/ for the next commit's poke
        or an ALRM, hours on a quiet host."""
        now = time.monotonic()
        if now < self._next_rescan:
            return
        self._next_rescan = now + RESCAN_NEW
        self.pickup()

    # -- main loop ------------------------------------------------------------------
    def _sleep_time(self) -> float:
        """Seconds until something is due: a retry, a file to read or end again, the
        next scan of new/ (``_rescan_new``); at most MAX_SLEEP."""
        rescan = max(0.0, min(MAX_SLEEP, self._next_rescan - time.monotonic()))
        with self.lock:
            if self.to_finish:
                return 0.0
            due = [self.heap[0][0]] if self.heap else []
            for later in (self.finish_later, self.segments_later, self.unread, self.new_held):
                due.extend(later.values())
            if not due:
                return rescan
            return max(0.0, min(rescan, min(due) - time.time()))

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
                control = Control.load(self.root)
                self.dkim = dkim_keys.load(control.control)
                self.control = control
                self._deliverers()
                self.children.configure(self.control)
                self.log("status HUP: control files reloaded")
            except ControlError as exc:
                self.log(f"warning HUP: keeping the old control files: {exc}")
        if "alrm" in flags:
            self.log("status ALRM: retrying every deferred recipient now")
            self._read_again(now_all=True)  # new/, and whatever could not be read
            self.retry_all()

    def run(self) -> int:
        trigger = self.queue.root / "lock" / "trigger"
        try:  # before the start-up scan: a message committed after it is poked to us
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
        self._next_rescan = time.monotonic() + RESCAN_NEW
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
                    self._read_again()
                    self._rescan_new()
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
    try:
        who = drop(
            user,
            allow_root=True,
            refusal="refusing to run as root; pass --user pyqmails (or --user root to insist)",
        )
    except PrivilegeError as exc:
        raise SystemExit(f"pyqmail-send: {exc}") from None
    if who is not None and who.uid == 0 and os.geteuid() == 0:
        sys.stderr.write("pyqmail-send: warning: delivering mail as root (--user root)\n")


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
    """Exclusive lock on lock/sendpid, which then holds our pid; exits if another instance
    runs.

    A POSIX record lock (``lockf``: fcntl F_SETLK), not flock, because the kernel tells
    who holds one (F_GETLK gives the holder's pid): ``pyqmail-queue flush`` signals that
    pid, never the one in the file, which is the previous instance's until we write ours
    (a pid perhaps reused by an unrelated process, which ALRM's default action kills), and
    takes no lock of its own to find out (its shared flock once made a pyqmail-send that
    started at that moment exit, "another pyqmail-send is running"). So nothing but
    another pyqmail-send holds this lock, and there is nothing to wait for. Such a lock is
    released when this process closes any descriptor of the file: nothing else here opens
    it. It is not inherited by a fork (the delivery children are forked before, anyway)."""
    path = queue_root / PIDFILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SystemExit(f"pyqmail-send: cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise SystemExit(
                f"pyqmail-send: another pyqmail-send is running on {queue_root} (pid {other})"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _early_signals() -> set[str]:
    """Keep ALRM and HUP that arrive while pyqmail-send starts, before ``Manager.run`` puts
    its own handlers in place, instead of dying of them (their default action): ``svc -a``
    or ``svc -h`` may come at any moment, and a start-up under load takes a while (a
    supervised restart loop of such deaths once left a queue undrained under the soak's
    ALRMs). Returns the set the handler fills ("alrm", "hup")."""
    flags: set[str] = set()
    names = {int(signal.SIGALRM): "alrm", int(signal.SIGHUP): "hup"}

    def keep(signum: int, frame: object) -> None:
        del frame
        flags.add(names[signum])

    for signum in names:
        signal.signal(signum, keep)
    return flags


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
        return check_send(root)  # pyqmail.control.check, beside pyqmail-smtpd's
    early = _early_signals()
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
        manager.flags = early  # the loop acts on what came while starting
        pid_fd = lock_pidfile(manager.queue.root)
        try:
            return manager.run()
        finally:
            os.close(pid_fd)
    finally:
        children.close()


if __name__ == "__main__":
    sys.exit(main())
