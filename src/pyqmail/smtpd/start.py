"""pyqmail-smtpd's start-up after the bind: import the daemon, drop privileges, read and check
the configuration, then serve (one worker: this process) or fork workers (a spawner).

Why apart from ``cli``: the supervisor (``prefork``) must not import what is here (the
configuration, ``ssl``, the event loop, the checks' libraries: ``prefork`` says why), so
``cli`` imports this module only in a process that will serve or spawn: a spawner forked by
the supervisor, the single process of ``--workers 1``, or ``--check``.

The order keeps root's part small: the checks' libraries the control files ask for are
imported while the interpreter's files are surely readable (``pyqmail.checks.libraries``:
by their existence; dnspython also for a rules cdb with ``=host`` keys, the one file root
opens), then privileges drop to ``--user``, and only then is any file read.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from pyqmail import authdir, privs, tickets, tls
from pyqmail.authlock import StateError
from pyqmail.checks import greylist, libraries
from pyqmail.control import check as control_check
from pyqmail.control import smtpd as configmod
from pyqmail.log import log
from pyqmail.smtpd.authguard import AuthState, state_path
from pyqmail.smtpd.cli import (
    Options,
    UsageError,
    bind_sockets,
    listen_name,
    parse_args,
    resolve_loop,
)
from pyqmail.smtpd.limits import ConnTable
from pyqmail.smtpd.policy import Loader, RulesCache
from pyqmail.smtpd.prefork import Spawn
from pyqmail.smtpd.server import UMASK, run_worker
from pyqmail.smtpd.session import CLOSE_GRACE
from pyqmail.ticketkeys import TicketKeys

KILL_MARGIN = 5  # seconds past timeoutterm and the close grace before TERM becomes KILL


def drop_privileges(user: str | None) -> None:
    """As root: become ``user`` (its groups too) for good. Otherwise: stay as we are."""
    try:
        privs.drop(
            user,
            allow_root=False,
            refusal="refusing to serve as root: pass --user (e.g. --user pyqmaild)",
        )
    except privs.PrivilegeError as exc:
        raise UsageError(str(exc)) from None


def load_config(root: Path, keys: TicketKeys | None = None, mode: str = "smtp") -> configmod.Config:
    """The configuration, with the server TLS context set up for many workers.

    TLS session tickets (``pyqmail.tickets``) under ``keys``, the ones every worker of
    this listener shares (drawn once by the supervisor before any fork, so a HUP, which
    builds a new context in each worker, keeps them); no server-side session cache. With
    no ``keys``, or if this interpreter cannot install them (logged), no tickets at all
    (``num_tickets = 0``: OP_NO_TICKET alone leaves OpenSSL's stateful TLS 1.3 tickets,
    a per-worker cache of every session that another worker could not resume)."""
    cfg = configmod.load(root, inbound=configmod.inbound(mode))
    if cfg.server_tls is None:
        return cfg
    cfg.server_tls.num_tickets = 0
    if keys is not None:
        try:
            # the bytes the context's CAs came from, not a second read of the file
            clientca = tls.loaded_clientca(cfg.server_tls)
            tickets.enable(cfg.server_tls, keys, tickets.session_context(clientca))
        except tickets.TicketError as exc:
            log("warning", text=f"no TLS session tickets: {exc}")
    return cfg


def check_startup(cfg: configmod.Config, mode: str) -> None:
    """Refuse modes that cannot work with this configuration; warn about odd ones (the
    conditions are ``pyqmail.control.check``'s, shared with ``--check``)."""
    problems = control_check.startup_problems(cfg, mode)
    if problems:
        raise configmod.ConfigError(problems[0])
    if cfg.authdb is not None:
        try:
            AuthState.check(state_path(cfg.root))
        except StateError as exc:
            raise configmod.ConfigError(str(exc)) from exc
    for warning in control_check.startup_warnings(cfg, mode):
        log("warning", text=warning)


def load(opts: Options, keys: TicketKeys | None = None) -> tuple[configmod.Config, RulesCache]:
    """The configuration and the rules, checked for ``opts.mode``: at start, in the
    spawner a HUP forks, and again in every worker (the same checks each time, so a HUP
    never puts in force what a start would have refused)."""
    cfg = load_config(opts.root, keys, opts.mode)
    check_startup(cfg, opts.mode)
    return cfg, RulesCache(opts.rules)


def _prepare(opts: Options) -> tuple[list[str], str]:
    """Root's part, then the drop: the checks' libraries and the event loop are imported
    (the groups loaded and the loop resolved are returned); files are read after this."""
    preloaded = libraries.preload(opts.root / "control") if configmod.inbound(opts.mode) else []
    preloaded += libraries.preload_rules(opts.rules)  # a cdb with =host rules: dnspython
    loop = resolve_loop(opts.loop)
    if os.geteuid() == 0:
        # The login locks' directory (pyqmail.authdir), if no role made it: only root may
        # create it in <root>. A failure is named by the start-up warning (control.check).
        with contextlib.suppress(OSError):
            authdir.make_dir(opts.root)
    drop_privileges(opts.user)
    os.umask(UMASK)  # ours, whatever started us: queue files need no fchmod then
    return preloaded, loop


def _log_start(opts: Options, workers: int, loop: str, preloaded: list[str], where: str) -> None:
    log(
        "start",
        listen=where,
        mode=opts.mode,
        workers=workers,
        uid=os.getuid(),
        loop=loop,
        libraries=",".join(preloaded) or None,
    )


def serve_alone(opts: Options, sock: socket.socket, where: str) -> int:
    """``--workers 1``: this process serves; exit status 0, 111 on a bad configuration."""
    try:
        preloaded, loop = _prepare(opts)
        keys = TicketKeys()
        cfg, rules = load(opts, keys)
    except (UsageError, configmod.ConfigError) as exc:
        sys.stderr.write(f"pyqmail-smtpd: fatal: {exc}\n")
        return 111
    _log_start(opts, 1, loop, preloaded, where)
    if configmod.inbound(opts.mode):
        greylist.move_before_serving(cfg.root, cfg.screen.greylist)
    counter = ConnTable(1, cfg.maxconn)
    reload: Loader = lambda: load(opts, keys)  # noqa: E731 - the worker's HUP
    return run_worker(sock, cfg, rules, counter, mode=opts.mode, loop=loop, load=reload, keys=keys)


def spawner(args: list[str], spawn: Spawn) -> int:
    """A spawner's work (``prefork.spawn_daemon`` runs it and exits with its status): read
    the command line again, prepare, read the configuration, fork the workers of
    ``spawn.slots`` (each reported at once), report ``ok``; 111 if it could not (said
    by ``spawn.fail``)."""
    table = None
    if spawn.capacity:
        table = ConnTable.attach(spawn.table_fd, len(spawn.fds), spawn.capacity)
        # a replacement: the dead workers' connections died with them; uncount them
        # before anything that can fail (a broken configuration must not leave them held)
        for slot in spawn.slots:
            table.reset(slot)
    try:
        opts = parse_args(args)
        socks = _sockets(opts, spawn)
        preloaded, loop = _prepare(opts)
        cfg, rules = load(opts, spawn.keys)
    except (UsageError, configmod.ConfigError) as exc:
        spawn.fail(str(exc))
        return 111
    if configmod.inbound(opts.mode):  # before any worker serves: no loop blocked for it
        greylist.move_before_serving(cfg.root, cfg.screen.greylist)
    if table is None:  # the first spawner sizes the table
        table = ConnTable(len(spawn.fds), cfg.maxconn, fd=spawn.table_fd)
    if spawn.purpose == "start":
        where = listen_name(next(iter(socks.values())))
        _log_start(opts, len(spawn.fds), loop, preloaded, where)
    # The workers share this process's heap copy-on-write. A full collection in a worker
    # writes to the header of every tracked object it finds, copying every page that holds
    # one into that worker; frozen objects are never collected, so those pages stay shared
    # (the gc.freeze recipe in Python's documentation; 0.9 MiB less PSS after 20 s of load).
    gc.freeze()
    for slot in spawn.slots:
        pid = os.fork()
        if pid == 0:
            _worker(opts, spawn, slot, socks=socks, table=table, cfg=cfg, rules=rules, loop=loop)
        spawn.worker_forked(slot, pid)
    spawn.ok(cfg.timeoutterm + CLOSE_GRACE + KILL_MARGIN, table.capacity)
    return 0


def _sockets(opts: Options, spawn: Spawn) -> dict[int, socket.socket]:
    """The open listening sockets by slot: the supervisor's, and for a slot to fork whose
    socket it closed (its replacement had failed: ``prefork``) a new one in the group,
    bound on the group's port while we are still root."""
    socks = {slot: socket.socket(fileno=fd) for slot, fd in enumerate(spawn.fds) if fd >= 0}
    port = next((sock.getsockname()[1] for sock in socks.values()), opts.port)
    for slot in spawn.slots:
        if slot not in socks:
            socks[slot] = bind_sockets(opts.host, port, 1)[0]
    return socks


def _worker(
    opts: Options,
    spawn: Spawn,
    slot: int,
    *,
    socks: dict[int, socket.socket],
    table: ConnTable,
    cfg: configmod.Config,
    rules: RulesCache,
    loop: str,
) -> NoReturn:
    """One forked worker: its socket only, signals unblocked, serve, exit."""
    code = 1
    try:
        os.close(spawn.report)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for other_slot, other in socks.items():
            if other_slot != slot:
                other.close()
        table.slot = slot
        reload: Loader = lambda: load(opts, spawn.keys)  # noqa: E731 - the worker's HUP
        code = run_worker(
            socks[slot],
            cfg,
            rules,
            table,
            spawn.supervisor,
            mode=opts.mode,
            loop=loop,
            load=reload,
            keys=spawn.keys,
        )
    except BaseException:  # noqa: BLE001 - a worker must never return into the spawner's code
        traceback.print_exc()
    finally:
        os._exit(code)


def check(opts: Options) -> int:
    """``--check``: the configuration as a start would load it, as ``--user``; 0 or 111."""
    try:
        if configmod.inbound(opts.mode):
            libraries.preload(opts.root / "control")
        libraries.preload_rules(opts.rules)
        if opts.user is not None:
            drop_privileges(opts.user)  # the files must be readable by the daemon's user
    except UsageError as exc:
        sys.stderr.write(f"pyqmail-smtpd: fatal: {exc}\n")
        return 111
    return control_check.check_smtpd(opts.root, opts.mode, opts.rules)
