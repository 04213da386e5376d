"""The pre-forking supervisor of pyqmail-smtpd: a small process that keeps the sockets, has
short-lived *spawners* fork the workers, replaces dead ones and passes TERM and HUP on.

Why pre-forked workers under a parent that keeps the sockets: the parent binds one
``SO_REUSEPORT`` socket per worker, so the kernel spreads connections over the workers, and
keeps them all open, so a crashed worker's pending connections wait for its replacement
rather than being reset.

Why spawners. Workers forked from one process share its heap copy-on-write, and every page
a worker writes (a reference count is a write) becomes that worker's own copy. When the
process they were forked from lives on, as a supervisor does, the original of every page
both workers copied stays in it too: three copies. Measured under load in ``make bench``,
such a supervisor held 13.5 MiB of PSS, 7.4 MiB of it private. So the supervisor is a
program of its own: ``cli`` binds the sockets and then ``exec``s ``pyqmail-smtpd
--supervise=FD,FD ARGS`` (``entry``), which imports only this module, ``pyqmail.log`` and
``pyqmail.ticketkeys`` (no ``ssl``, no event loop, no configuration, no ``argparse``);
for each generation of workers it forks a spawner, which imports the daemon
(``pyqmail.smtpd.start``), reads the command line again, drops privileges, reads the
configuration, forks the workers and exits. The supervisor is a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so the orphaned workers become its children, and it reaps
and replaces them as a plain pre-forking parent would. Every page the workers share is then
shared by them alone.

Privileges. The supervisor keeps the user it was started as (root for port 25), as
Postfix's and Dovecot's masters do: every spawner must import the daemon's modules before
it drops to ``--user`` (whose user may not be able to read the interpreter's files), and
only a process that still has root can fork one. The supervisor reads no file and no client
byte: its inputs are signals, its children's exits and one pipe from each spawner it forked.
Workers, under another user, cannot signal it.

A spawner's report, one line per event on a pipe: ``worker <slot> <pid>`` after each fork,
then ``ok <kill_after> <capacity>`` (the TERM backstop in seconds, the size of the shared
connection table); a spawner that fails writes no ``ok`` and says why itself (on stderr at
start, as a log line later; a traceback if it crashed; ``spawn-timeout`` from here if it
hangs). A TERM that arrives while a spawner works cuts the wait short. The connection
table (``pyqmail.smtpd.limits.ConnTable``) lives in a memfd the supervisor creates before
the first spawner, which sizes it from ``maxconn``; every later spawner maps it with the
capacity reported, and a replacement's spawner first drops the dead workers' entries.
A spawner refuses to import a daemon whose files changed since the supervisor started (an
upgrade without a restart would run new code on the supervisor's old modules): it logs
``spawn-fail`` (or ``reload-fail`` on HUP), and the fix is a restart.

Replacements. A dead worker is replaced by a spawner that reads the configuration on disk
(the supervisor holds none): what a HUP would have put in force. A worker that dies within
a second of its start is replaced after a second (no fork loop); a spawner that fails (a
configuration broken since) is retried after 1, 2, 4 ... 60 seconds while the other workers
serve, and the slot's socket is closed meanwhile (its connections go to the other workers;
the next spawner binds a new one). A worker that keeps dying within a second waits the
same growing time, its socket closed too. A replacement shares no pages with the
survivors (its spawner imported the daemon afresh): about 10 MiB more until the next
restart.

Signals (blocked, taken with ``sigtimedwait``, so no handler runs in the middle of a
fork). TERM: close the sockets, pass TERM on, kill workers still there after their grace.
HUP: a spawner with no workers to fork checks the configuration as a start would; only if
it is good are the workers sent HUP (each re-reads it; sessions in progress keep theirs).
"""

from __future__ import annotations

import _ctypes
import importlib
import os
import select
import sys
import time

from pyqmail.log import log
from pyqmail.ticketkeys import TicketKeys

# What the supervisor imports is what it costs, for its whole life: typing 1.6 MiB,
# ``signal`` (its enums) 0.8, ``threading`` 0.7, ``contextlib`` 0.6, ``ctypes`` 0.5 (PSS of a
# bare interpreter's import, measured). So it uses their C halves (``_signal``, ``_ctypes``),
# try/except instead of ``contextlib.suppress``, and annotations only for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal  # the same functions and numbers, typed (the type checker has no _signal)
    from collections.abc import Callable, Iterable
    from typing import NoReturn

    Spawner = Callable[["Spawn"], NoReturn]
    """A spawner's life (``spawn_daemon``: imports ``pyqmail.smtpd.start``, runs its
    ``spawner``)."""
else:
    import _signal as signal

_PR_SET_CHILD_SUBREAPER = 36
SPAWN_TIMEOUT = 60.0  # seconds a spawner may take to import, read the configuration and fork
RETRY_MAX = 60.0  # the longest wait between two failed replacements of a worker
DEFAULT_KILL_AFTER = 60.0  # TERM backstop until a spawner reported the configured one
QUICK_DEATH = 1.0  # seconds: a worker dead sooner is replaced after a growing wait


class SpawnError(Exception):
    """A spawner wrote no ``ok``: it failed and said why (stderr or the log)."""


class Spawn:
    """What a spawner gets from the supervisor (in the fork: nothing crosses back but its
    report lines). ``purpose``: ``start`` (the first workers), ``replace`` or ``check``
    (HUP: read the configuration, fork nothing). A plain class: ``dataclasses`` would
    cost the supervisor 2.6 MiB of imports."""

    def __init__(
        self,
        purpose: str,
        slots: list[int],
        *,
        fds: list[int],
        keys: TicketKeys,
        table_fd: int,
        capacity: int,
        supervisor: int,
        report: int,
        code: tuple[tuple[str, int, int, int], ...] = (),
    ) -> None:
        self.purpose = purpose
        self.slots = slots
        self.fds = fds  # the listening sockets, one per slot; -1: none (the spawner binds one)
        self.keys = keys
        self.table_fd = table_fd
        self.capacity = capacity  # 0 until the first spawner sized the table
        self.supervisor = supervisor
        self.report = report  # the pipe's write end
        self.code = code  # the supervisor's code_identity()

    def worker_forked(self, slot: int, pid: int) -> None:
        os.write(self.report, f"worker {slot} {pid}\n".encode())

    def ok(self, kill_after: float, capacity: int) -> None:
        os.write(self.report, f"ok {kill_after:g} {capacity}\n".encode())

    def fail(self, why: str) -> None:
        """Say why no ``ok`` comes, as this purpose's failure: a fatal line on stderr at
        start, ``reload-fail`` for a HUP's check, ``spawn-fail`` for a replacement."""
        if self.purpose == "start":
            os.write(2, f"pyqmail-smtpd: fatal: {why}\n".encode())
        elif self.purpose == "check":
            log("reload-fail", error=why, text="keeping the old configuration")
        else:
            log("spawn-fail", slots=",".join(map(str, self.slots)), error=why)


def _signal_all(pids: Iterable[int], signo: int) -> None:
    """Signal every worker; one that is already gone is no error."""
    for pid in pids:
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass


class _CInt(_ctypes._SimpleCData):  # type: ignore[type-arg] # generic only in the stubs
    """C's ``int`` (``ctypes.c_int``, defined as ``ctypes`` does)."""

    _type_ = "i"


class _CFunction(_ctypes.CFuncPtr):
    """A C function returning an ``int`` and setting ``errno`` (``ctypes.CDLL``'s functions
    with ``use_errno=True``, defined as ``ctypes`` does)."""

    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _CInt


def become_subreaper() -> None:
    """Orphaned descendants (the workers, once their spawner exited) become our children.
    Python has no ``prctl``; this calls the C library's with ``_ctypes``, the part of
    ``ctypes`` that does the work (the rest costs the supervisor 0.3 MiB)."""
    program = _ctypes.dlopen(None)  # type: ignore[arg-type] # None: this program, as CDLL(None)
    prctl = _CFunction(_ctypes.dlsym(program, "prctl"))
    if prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = _ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Supervisor:
    """Keeps the sockets; spawners fork the workers; replaces dead ones; TERM and HUP."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self, fds: list[int], spawner: Spawner) -> None:
        self.fds = fds  # the listening sockets, one per slot; -1 once closed (_respawn)
        self.spawner = spawner
        self.keys = TicketKeys()  # before every fork: all workers share them
        self.pid = os.getpid()
        self.table_fd = os.memfd_create("pyqmail-conns", os.MFD_CLOEXEC)
        self.capacity = 0  # the table's, from the first spawner's report
        self.kill_after = DEFAULT_KILL_AFTER
        self.workers: dict[int, int] = {}  # pid -> slot
        self.started: dict[int, float] = {}  # slot -> time
        self.respawn_at: dict[int, float] = {}  # slot -> when
        self.retry: dict[int, float] = {}  # slot -> the wait after its next failed spawner
        self.code = code_identity()

    # spawners ---------------------------------------------------------------------------

    def spawn(self, purpose: str, slots: list[int]) -> None:
        """Fork a spawner for ``slots`` and read its report; SpawnError if it failed (the
        workers it reported are ours anyway). A TERM that arrives meanwhile cuts the wait
        short (the spawner gets a few seconds, then SIGKILL)."""
        try:
            read, write = os.pipe()
        except OSError as exc:
            raise SpawnError(f"no pipe for a spawner: {exc}") from exc
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read)
            os.close(write)
            raise SpawnError(f"cannot fork a spawner: {exc}") from exc
        if pid == 0:
            os.close(read)
            self.spawner(
                Spawn(
                    purpose,
                    slots,
                    fds=self.fds,
                    keys=self.keys,
                    table_fd=self.table_fd,
                    capacity=self.capacity,
                    supervisor=self.pid,
                    report=write,
                    code=self.code,
                )
            )
        os.close(write)
        try:
            lines = self._report(read, purpose)
        finally:
            os.close(read)
            self._collect(pid)
        self._take(lines, purpose, slots)

    def _report(self, fd: int, purpose: str) -> list[str]:
        """The spawner's lines, up to its ``ok`` (or the end of the pipe, the timeout, or
        a pending TERM)."""
        deadline = time.monotonic() + SPAWN_TIMEOUT
        data = b""
        while not data.endswith(b"\n") or not data.splitlines()[-1].startswith(b"ok "):
            left = deadline - time.monotonic()
            if left <= 0:
                log("spawn-timeout", purpose=purpose, seconds=f"{SPAWN_TIMEOUT:g}")
                break
            if signal.sigpending() & {signal.SIGTERM, signal.SIGINT}:
                break
            if not select.select([fd], [], [], min(left, 0.5))[0]:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode("ascii", "replace").splitlines()

    def _collect(self, pid: int) -> None:
        """Reap the spawner (it exits right after its report; killed if it hangs)."""
        for _ in range(100):
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)

    def _take(self, lines: list[str], purpose: str, slots: list[int]) -> None:
        """Record the reported workers (only for the slots asked) and the table's capacity;
        SpawnError without ``ok``. The TERM backstop follows a start or a HUP's check; a
        replacement may only raise it (the running workers have not read its files)."""
        ok = None
        for line in lines:
            word, *rest = line.split() or [""]
            try:
                if word == "worker" and len(rest) == 2 and int(rest[0]) in slots:
                    slot, pid = int(rest[0]), int(rest[1])
                    self.workers[pid] = slot
                    self.started[slot] = time.monotonic()
                elif word == "ok" and len(rest) == 2:
                    ok = (float(rest[0]), int(rest[1]))
            except ValueError:
                continue
        if ok is None:
            raise SpawnError("the spawner failed")
        kill_after, self.capacity = ok
        if purpose == "replace":
            kill_after = max(kill_after, self.kill_after)
        self.kill_after = kill_after

    def _children(self) -> list[int]:
        """Every child we have, reported or not (a worker whose spawner died before its
        report line is still ours to stop)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                text = f.read()
        except OSError:
            return list(self.workers)
        return [int(pid) for pid in text.split()]

    # the life ------------------------------------------------------------------------------

    def run(self) -> int:
        """Until TERM and the last worker's exit: 0; 111 if the first workers cannot start."""
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            self.spawn("start", list(range(len(self.fds))))
        except SpawnError as exc:
            self._close()
            _signal_all(self._children(), signal.SIGKILL)
            os.write(2, f"pyqmail-smtpd: fatal: no worker started ({exc})\n".encode())
            return 111
        terminating = False
        kill_at = 0.0
        while True:
            info = signal.sigtimedwait(self.SIGNALS, 0.5)
            signo = info.si_signo if info is not None else None
            self.keys.advance()  # every process ratchets: none keeps an old secret
            if signo in (signal.SIGTERM, signal.SIGINT) and not terminating:
                terminating = True
                kill_at = time.monotonic() + self.kill_after
                self._close()
                _signal_all(self._children(), signal.SIGTERM)
            elif signo == signal.SIGHUP and not terminating:
                self.reload()
            self.reap(terminating)
            if terminating:
                if not self.workers:
                    log("stopped")
                    return 0
                if time.monotonic() > kill_at:
                    _signal_all(self._children(), signal.SIGKILL)
                continue
            self._respawn()

    def _close(self, slots: Iterable[int] | None = None) -> None:
        """Close the sockets of ``slots`` (all by default): the kernel stops giving them
        connections, and those waiting in their backlogs are reset."""
        for slot in range(len(self.fds)) if slots is None else slots:
            if self.fds[slot] >= 0:
                try:
                    os.close(self.fds[slot])
                except OSError:
                    pass
                self.fds[slot] = -1

    def reload(self) -> None:
        """HUP: the workers get it only if a spawner found the configuration good (it
        logged ``reload-fail`` otherwise); then replacements that were waiting (their
        configuration was broken, say) are tried at once."""
        try:
            self.spawn("check", [])
        except SpawnError:
            return
        _signal_all(self.workers, signal.SIGHUP)
        for slot in self.respawn_at:
            self.respawn_at[slot] = time.monotonic()
        self.retry.clear()

    def reap(self, terminating: bool) -> None:
        """Collect dead workers (and any other child); unless we are stopping, schedule
        the replacements. A worker that dies within a second of its start waits like a
        failed spawner, longer each time (a spawner imports the whole daemon: no loop),
        and its slot's socket is closed meanwhile, for the reason ``_respawn`` gives: with
        ``SO_REUSEPORT`` the kernel would go on queueing a share of the new connections
        on it for up to RETRY_MAX seconds, with nobody to greet them."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            log("worker-exit", worker=pid, slot=slot, status=os.waitstatus_to_exitcode(status))
            if terminating:
                continue
            if time.monotonic() - self.started.get(slot, 0) < QUICK_DEATH:
                self._close([slot])
                wait = self._back_off(slot)
                log("respawn-later", slot=slot, retry=f"{wait:g}s", text="its socket closed")
            else:
                self.retry.pop(slot, None)
                self.respawn_at[slot] = time.monotonic()

    def _back_off(self, slot: int) -> float:
        """Replace ``slot`` later: 1 s, then twice as long each time, at most RETRY_MAX."""
        wait = self.retry.get(slot, 1.0)
        self.retry[slot] = min(wait * 2, RETRY_MAX)
        self.respawn_at[slot] = time.monotonic() + wait
        return wait

    def _respawn(self) -> None:
        """One spawner for the replacements that are due. A slot it did not fill (it failed
        and said why) waits longer each time, and its socket is closed meanwhile: its
        connections would wait for a worker that may not come for a minute, while the
        other sockets of the group take them at once. A later spawner, still root before
        its drop, binds that slot a new socket, which then lives with its worker only: a
        crash of that worker resets its pending connections, as a restart would."""
        now = time.monotonic()
        due = sorted(slot for slot, when in self.respawn_at.items() if now >= when)
        if not due:
            return
        try:
            self.spawn("replace", due)
        except SpawnError:
            pass  # it said why; the slots it did not fill are handled below
        serving = set(self.workers.values())
        for slot in due:
            if slot in serving:
                del self.respawn_at[slot]
                continue
            self._close([slot])
            wait = self._back_off(slot)
            log("respawn-fail", slot=slot, retry=f"{wait:g}s", text="its socket closed")


def code_identity() -> tuple[tuple[str, int, int, int], ...]:
    """The files of the pyqmail modules this process has loaded (path, inode, size, mtime):
    a spawner that finds them changed on disk would import a newer daemon on top of
    the supervisor's older modules (an upgrade without a restart)."""
    found = []
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.split(".")[0] == "pyqmail" and path:
            try:
                st = os.stat(path)
            except OSError:
                found.append((path, 0, 0, 0))
            else:
                found.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


def supervise(fds_text: str, args: list[str]) -> int:
    """``pyqmail-smtpd --supervise=FD,FD ARGS`` (``entry``; ``cli`` execs it after the
    bind): supervise the workers of those sockets; ``ARGS`` is the command line every
    spawner reads again."""
    try:
        fds = [int(fd) for fd in fds_text.split(",")]
        for fd in fds:
            os.fstat(fd)
    except (ValueError, OSError) as exc:
        os.write(2, f"pyqmail-smtpd: fatal: --supervise={fds_text}: {exc}\n".encode())
        return 111
    for fd in fds:
        os.set_inheritable(fd, False)  # no program we might start needs them
    try:
        become_subreaper()
    except OSError as exc:
        os.write(2, f"pyqmail-smtpd: fatal: cannot supervise the workers: {exc}\n".encode())
        return 111
    return Supervisor(fds, lambda spawn: spawn_daemon(spawn, args)).run()


def spawn_daemon(spawn: Spawn, args: list[str]) -> NoReturn:
    """A spawner's life, in the supervisor's fork: the daemon is imported here, never in the
    supervisor (``pyqmail.smtpd.start.spawner`` says what became of it). It refuses to
    import a daemon whose files changed since the supervisor started (``code_identity``:
    restart it). The one way out is ``os._exit``, whatever happened."""
    code = 111
    try:
        if code_identity() != spawn.code:
            spawn.fail(
                "pyqmail's files changed since this supervisor started "
                "(an upgrade?): restart pyqmail-smtpd"
            )
        else:
            code = importlib.import_module("pyqmail.smtpd.start").spawner(args, spawn)
    except BaseException:  # noqa: BLE001 - say why, never return into the supervisor's code
        importlib.import_module("traceback").print_exc()
    finally:
        os._exit(code)
