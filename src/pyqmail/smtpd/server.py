"""One pyqmail-smtpd worker: an event loop serving one listening socket.

Why a module of its own: the worker owns what its sessions share (the configuration of
now, the rules, the connection table, the AUTH check, the queue and its group commit, one
receive buffer) and its life (start, HUP, TERM), and hands each session only the narrow
``session.SessionContext`` view of it. The supervisor is ``prefork``, the spawner that
forks the workers ``start``; with ``--workers 1`` the one process runs a worker directly.

TERM: stop accepting, let sessions finish for ``timeoutterm`` seconds, then tell the rest
``421`` and exit 0. HUP: re-read the configuration (``policy.Loader``) for new connections;
sessions in progress keep the configuration they started with, and a bad new configuration
is logged and the old one stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from pyqmail import heap, tickets
from pyqmail import log as logmod
from pyqmail.checks.checkpool import CheckPool
from pyqmail.checks.screen import Checks
from pyqmail.control import smtpd as configmod
from pyqmail.log import log
from pyqmail.queue.commit import CommitResult, Committer
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.rules import Rules
from pyqmail.smtpd.auth import Authenticator
from pyqmail.smtpd.intake import Done, SpoolBudget
from pyqmail.smtpd.limits import Admission, ConnTable
from pyqmail.smtpd.policy import Loader, RulesCache
from pyqmail.smtpd.senders import SenderRules
from pyqmail.smtpd.sendlimits import Settings as LimitSettings
from pyqmail.smtpd.session import CLOSE_GRACE, Session
from pyqmail.ticketkeys import TicketKeys

if TYPE_CHECKING:
    from pyqmail.smtpd.remotehost import HostNames

UMASK = 0o027  # set at start; queue files are created 0640 (group pyqmail reads them)
READ_SIZE = 64 * 1024  # one socket read at most


class Server:
    """One worker process: an asyncio loop serving one listening socket. It provides
    ``SessionContext`` to its sessions (checked by mypy where ``Session(self)`` is made)."""

    def __init__(
        self,
        mode: str,
        cfg: configmod.Config,
        rules: RulesCache,
        counter: ConnTable,
        load: Loader,
        *,
        keys: TicketKeys | None = None,
    ) -> None:
        self.mode = mode
        self.cfg = cfg
        self.rules = rules
        self.counter = counter
        self.load = load
        self.queue = Queue(cfg.queue_dir, umask=UMASK)
        self.sessions: set[Session] = set()
        self.auth = Authenticator(cfg)
        self.senders = SenderRules(cfg.root, limit_settings(cfg))
        self.checks = Checks(cfg.root, cfg.screen)  # blocklist cache, greylist state
        self.checkpool = CheckPool()  # the inbound checks' threads (none until a check)
        self.stopping: asyncio.Event | None = None
        self.parents: frozenset[int] = frozenset()  # a forked worker's: see _orphaned
        self.idle: asyncio.Event | None = None
        self.budget = SpoolBudget()  # bytes of messages held in memory by all sessions
        self.read_buffer = memoryview(bytearray(READ_SIZE))  # every session's reads
        self._committer: Committer | None = None
        self.waiting: set[object] = set()  # the live sessions' intakes with a message in commit
        self._ended = False  # a session ended since the last ``_tick``
        self.keys = keys  # the TLS ticket secret, ratcheted at each ``_tick``
        self.hostnames: HostNames | None = None  # made for the first cdb with =host rules

    # SessionContext -----------------------------------------------------------------------

    def rules_now(self) -> Rules | None:
        """The tcprules cdb as of now (re-read when it changes); None: no cdb."""
        return self.rules.current()

    async def remote_host(self, ip: str) -> str | None:
        """The client's forward-confirmed host name, within ``dnsbltimeout``; None if it has
        none or DNS failed (``pyqmail.smtpd.remotehost``, loaded with the cdb that needs it:
        ``pyqmail.checks.libraries``)."""
        dnsbl = self.cfg.screen.dnsbl
        if self.hostnames is None:
            from pyqmail.smtpd.remotehost import HostNames  # noqa: PLC0415 - see above

            self.hostnames = HostNames(dnsbl.nameservers)
        return await self.hostnames.name(ip, dnsbl.timeout)

    def admit(self, key: bytes, cfg: configmod.Config) -> Admission:
        """Count a connection in the table every worker shares."""
        return self.counter.admit(key, cfg.maxconn, cfg.maxconnip)

    def release(self, key: bytes, *, counted: bool) -> None:
        """Uncount a connection."""
        self.counter.release(key, counted=counted)

    def connections(self) -> int:
        """The listener's connections over all workers."""
        return self.counter.total()

    def joined(self, session: Session) -> None:
        """A session to wait for at TERM."""
        self.sessions.add(session)

    def left(self, session: Session) -> None:
        """A session is over: the committer may stop waiting for it to add a message."""
        self.sessions.discard(session)
        self._ended = True
        self.waiting.discard(session.intake)  # its message may still be in commit: not it
        if self._committer is not None:
            self._committer.session_gone()
        if not self.sessions and self.idle is not None:
            self.idle.set()

    def submit(self, writer: QueueWriter, done: Done, owner: object) -> None:
        """To the group commit; ``owner``'s session counts as waiting until ``done`` runs or
        it leaves, so the committer knows when no live session could add a message to its
        batch (a session that left counted still would let the loop commit on it while
        the others are mid-transaction)."""
        self.waiting.add(owner)

        def committed(result: CommitResult) -> None:
            self.waiting.discard(owner)
            done(result)

        self.committer().submit(writer, committed)

    # the worker ---------------------------------------------------------------------------

    def committer(self) -> Committer:
        """The group commit, started with the first message (its thread costs nothing
        until then)."""
        if self._committer is None:
            self._committer = Committer(
                asyncio.get_running_loop(),
                delay=self.cfg.commitdelay / 1000,
                all_waiting=lambda: len(self.waiting) >= len(self.sessions),
                log=log,
            )
        return self._committer

    def _tick(self) -> None:
        """The worker's one timer, once a second: ``_orphaned``, ``_trim_heap`` and the
        ticket keys' ratchet (``tickets.forget``: an idle worker must not keep an old
        secret). The next tick is set first, so that nothing here can end the orphan
        watch."""
        handle = asyncio.get_running_loop().call_later(1.0, self._tick)
        if self._orphaned():
            handle.cancel()
            return
        self._trim_heap()
        if self.keys is not None:
            tickets.forget(self.keys)

    def _orphaned(self) -> bool:
        """A worker whose supervisor died (kill -9) stops, so a restart is not shadowed.
        Its parent is the spawner that forked it until that exits (moments later), then
        the supervisor, a child subreaper (``prefork``); then nobody else's. Only a
        forked worker has ``parents``."""
        if self.parents and os.getppid() not in self.parents and self.stopping is not None:
            log("orphaned", text="supervisor gone; stopping")
            self.stopping.set()
            return True
        return False

    def _trim_heap(self) -> None:
        """If a session ended since the last tick: give the heap's free pages back
        (``pyqmail.heap``), so that a worker at rest after a burst holds what it uses,
        not what the burst used. Under load that is one ``malloc_trim`` a second (about
        1 µs when there is little to give back); at rest, none."""
        if self._ended:
            self._ended = False
            heap.trim()

    def reload(self) -> None:
        """HUP: the new configuration for new sessions, or the old one if the new is bad."""
        try:
            cfg, rules = self.load()
        except configmod.ConfigError as exc:
            log("reload-fail", error=str(exc), text="keeping the old configuration")
            return
        self.cfg, self.rules = cfg, rules
        if self._committer is not None:
            self._committer.delay = cfg.commitdelay / 1000
        if Path(cfg.queue_dir) != self.queue.root:
            # the old one closes its descriptors when its last message is committed
            # (``Queue.__del__``): sessions in progress and the commit still hold it
            self.queue = Queue(cfg.queue_dir, umask=UMASK)
        self.auth.reload(cfg)
        self.senders.reload(cfg.root, limit_settings(cfg))
        self.checks.reload(cfg.root, cfg.screen)
        if self.hostnames is not None:
            self.hostnames.configure(cfg.screen.dnsbl.nameservers)
        log("reload", root=cfg.root)

    async def serve(self, sock: socket.socket) -> int:
        """Serve until TERM, then wind down (see the module's docstring); exit status 0."""
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.idle = asyncio.Event()
        stopping = self.stopping
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        loop.add_signal_handler(signal.SIGINT, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        server = await loop.create_server(lambda: Session(self), sock=sock, backlog=1024)
        log("ready", slot=self.counter.slot, mode=self.mode)
        self._tick()
        await stopping.wait()
        server.close()
        log("stopping", sessions=len(self.sessions), grace=self.cfg.timeoutterm)
        await self._wind_down()
        self.auth.shutdown()
        committed = self._committer is None or self._committer.stop(CLOSE_GRACE)
        self.senders.shutdown()  # after the last commit: its message is counted
        self.checks.shutdown()
        self.checkpool.shutdown()
        if committed:  # a commit still in its fsync keeps new/'s descriptor until the exit
            self.queue.close()
        log("stopped")
        return 0

    async def _wind_down(self) -> None:
        """421 at the next command boundary; after ``timeoutterm``, 421 now; after
        CLOSE_GRACE more, abort whatever is left."""
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            await self._until_idle(self.cfg.timeoutterm)
        for session in list(self.sessions):
            session.force_shutdown()
        if self.sessions:
            await self._until_idle(CLOSE_GRACE + 1)
        for session in list(self.sessions):
            session.abort()
        await asyncio.sleep(0)

    async def _until_idle(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the last session to end."""
        assert self.idle is not None  # noqa: S101 - set in serve
        self.idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout)


def limit_settings(cfg: configmod.Config) -> LimitSettings:
    """The sending limits per AUTH login, from the control files (``knobs``)."""
    return LimitSettings(cfg.knobs.auth_msgs_per_hour, cfg.knobs.auth_rcpts_per_hour)


def run_worker(
    sock: socket.socket,
    cfg: configmod.Config,
    rules: RulesCache,
    counter: ConnTable,
    parent: int | None = None,
    *,
    mode: str,
    loop: str,
    load: Loader,
    keys: TicketKeys | None = None,
) -> int:
    """One worker's life on its own event loop (``loop``: asyncio or uvloop); its log
    lines go out once per pass of that loop; ``keys``: its TLS ticket secret."""
    server = Server(mode, cfg, rules, counter, load, keys=keys)
    if parent is not None:
        server.parents = frozenset({parent, os.getppid()})
    factory = None
    if loop == "uvloop":
        factory = importlib.import_module("uvloop").new_event_loop
    with (
        logmod.loop_thread(asyncio.get_running_loop),
        asyncio.Runner(loop_factory=factory) as runner,
    ):
        return runner.run(server.serve(sock))
