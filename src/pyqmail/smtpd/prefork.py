"""The pre-forking supervisor of pyqmail-smtpd: fork the workers, replace dead ones, pass
TERM and HUP on.

Why pre-forked workers under a parent that keeps the sockets: the parent binds one
``SO_REUSEPORT`` socket per worker, so the kernel spreads connections over the workers, and
keeps them all open, so a crashed worker's pending connections wait for its replacement
rather than being reset. A worker that dies within a second of its start is replaced after
a second (no fork loop); its connections are uncounted first (``ConnTable.reset``).

The parent serves no client and reads no client byte: it only waits for signals and
children (``sigtimedwait``, signals blocked, so no handler runs in the middle of a fork).
TERM: close the sockets, pass TERM on, and kill workers still there after their grace.
HUP: re-read the configuration, and only if it is good, pass HUP on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from typing import NoReturn

from pyqmail.control import smtpd as configmod
from pyqmail.log import log
from pyqmail.smtpd.limits import ConnTable
from pyqmail.smtpd.policy import Loader, RulesCache
from pyqmail.smtpd.session import CLOSE_GRACE

WorkerMain = Callable[[socket.socket, configmod.Config, RulesCache, ConnTable, int], int]
"""A worker's life: its socket, the configuration and rules of now, the connection table,
the supervisor's pid;
returns its exit status (``server.run_worker`` with the listener's options bound)."""


def _signal_all(pids: Iterable[int], signo: int) -> None:
    """Signal every worker; one that is already gone is no error."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signo)


class Supervisor:
    """Forks the workers, replaces dead ones, forwards TERM and HUP."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(
        self,
        socks: list[socket.socket],
        cfg: configmod.Config,
        rules: RulesCache,
        counter: ConnTable,
        *,
        load: Loader,
        work: WorkerMain,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.socks = socks
        self.cfg = cfg
        self.rules = rules
        self.counter = counter
        self.load = load
        self.work = work
        self.tick = tick  # run twice a second (the TLS ticket keys' ratchet, cli.py)
        self.pid = os.getpid()
        self.workers: dict[int, int] = {}  # pid -> slot
        self.started: dict[int, float] = {}  # slot -> time
        self.respawn_at: dict[int, float] = {}  # slot -> when

    def spawn(self, slot: int) -> None:
        """Fork the worker of ``slot`` (its connection counts start from zero)."""
        self.counter.reset(slot)
        pid = os.fork()
        if pid == 0:
            self._child(slot)
        self.workers[pid] = slot
        self.started[slot] = time.monotonic()

    def _child(self, slot: int) -> NoReturn:
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            for i, sock in enumerate(self.socks):
                if i != slot:
                    sock.close()
            self.counter.slot = slot
            sock = self.socks[slot]
            code = self.work(sock, self.cfg, self.rules, self.counter, self.pid)
        except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
            traceback.print_exc()
        finally:
            os._exit(code)

    def reap(self, terminating: bool) -> None:
        """Collect dead workers; unless we are stopping, schedule their replacements."""
        while self.workers:
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
            self.counter.reset(slot)  # its connections died with it
            if not terminating:
                quick = time.monotonic() - self.started.get(slot, 0) < 1.0
                self.respawn_at[slot] = time.monotonic() + (1.0 if quick else 0.0)

    def reload(self) -> bool:
        """HUP: True if the new configuration is good (then the workers get HUP too)."""
        try:
            cfg, _ = self.load()
        except configmod.ConfigError as exc:
            log("reload-fail", error=str(exc), text="keeping the old configuration")
            return False
        self.cfg = cfg
        return True

    def run(self) -> int:
        """Until TERM and the last worker's exit; exit status 0."""
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        for slot in range(len(self.socks)):
            self.spawn(slot)
        terminating = False
        kill_at = 0.0
        while True:
            info = signal.sigtimedwait(self.SIGNALS, 0.5)
            signo = info.si_signo if info is not None else None
            if self.tick is not None:
                self.tick()
            if signo in (signal.SIGTERM, signal.SIGINT) and not terminating:
                terminating = True
                kill_at = time.monotonic() + self.cfg.timeoutterm + CLOSE_GRACE + 5
                for sock in self.socks:
                    sock.close()
                _signal_all(self.workers, signal.SIGTERM)
            elif signo == signal.SIGHUP and not terminating and self.reload():
                _signal_all(self.workers, signal.SIGHUP)
            self.reap(terminating)
            if terminating:
                if not self.workers:
                    log("stopped")
                    return 0
                if time.monotonic() > kill_at:
                    _signal_all(self.workers, signal.SIGKILL)
                continue
            self._respawn()

    def _respawn(self) -> None:
        """Fork the replacements that are due."""
        now = time.monotonic()
        for slot, when in list(self.respawn_at.items()):
            if now >= when:
                del self.respawn_at[slot]
                self.spawn(slot)
