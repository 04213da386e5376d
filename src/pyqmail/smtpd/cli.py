"""pyqmail-smtpd: the SMTP listener around the sans-I/O core in ``pyqmail.protocol.connection``.

One program, three listener modes (one supervised service each, as in the qmail guides):

- ``smtp``: port-25 style. STARTTLS offered when ``control/servercert.pem`` exists, AUTH
  off unless the client's rule sets ``SMTPAUTH=1``; relaying only with ``RELAYCLIENT`` or a
  client certificate that chains to ``clientca.pem`` and is listed in ``tlsclients``.
- ``smtps``: implicit TLS (port 465), AUTH on unless ``SMTPAUTH=0``; submission (RFC 8314):
  AUTH required for MAIL unless the client has ``RELAYCLIENT`` or a relay certificate.
- ``submission``: port 587, STARTTLS required before AUTH/MAIL (``FORCETLS=0`` lifts it)
  and AUTH required unless the client has ``RELAYCLIENT`` or a relay certificate.

Process model. This process binds one ``SO_REUSEPORT`` socket per worker (as root if the
port needs it) and, with more than one worker, ``exec``s the supervisor (``prefork``): the
same program with ``--supervise=FD,FD`` before the same arguments, a small process that keeps
every socket open (a crashed worker's pending connections wait for its replacement rather
than being reset), keeps the user it was started as, and forks a short-lived spawner per
generation of workers. The spawner imports the daemon, drops to ``--user`` (initgroups,
setgid, setuid), reads the configuration and only then forks the workers: nothing ever
reads a file or a client byte as root. The kernel spreads connections over the workers'
sockets; each worker runs one asyncio loop (uvloop's when it is installed, see
``--loop``). The supervisor forwards TERM and HUP; with ``--workers 1`` this process drops
its privileges and serves directly. In ``ps`` the spawners and workers show the
supervisor's command line (``pyqmail-smtpd --supervise=...``): they are its forks; their
user tells them apart (root: the supervisor, or a spawner before its drop; ``--user``: a
worker).

Per-client policy comes from the tcprules cdb exactly as tcpserver applies it: a ``deny``
rule closes the connection at once (logged), ``allow`` passes the rule's environment
(RELAYCLIENT, SMTPAUTH, FORCETLS, BARELF, DATABYTES, MAXRCPT). The cdb is re-read when its
file changes, as tcpserver opens it per connection. A cdb with host-name rules (``=host``,
``=.domain``, ``=``) has the client's name looked up first, as tcpserver -p does
(``pyqmail.smtpd.remotehost``: the PTR name, only if its A/AAAA records include the
client's address; within ``dnsbltimeout``; the connection is counted meanwhile and its
greeting waits); no name, no ``=`` match. Any other cdb makes no DNS query (``-H``), and
the Received header says ``unknown`` for the client's name.

Limits: ``maxconn`` per listener and ``maxconnip`` per client (an IPv4 address or an IPv6
/64) are counted exactly across workers in a table they share (``pyqmail.smtpd.limits``). Over a
limit: ``421 4.7.0`` and close. A client must make progress (complete a command or a
chunk of message) within ``timeoutsmtpd``; a DATA phase must end within ``timeoutdata``;
a handshake within ``timeouttls``. Under stress (connections over ``stresspercent`` of
``maxconn``, all workers) progress is due within ``timeoutstress`` instead; junk commands
past ``maxjunk`` count as errors; the ``smtp`` listener may pause its greeting
(``greetdelay``) to catch clients that talk first (``pyqmail.smtpd.knobs``). A client
that stops reading our replies stops being read and then times out; closing sockets that
cannot flush are aborted. AUTH goes through limits every worker of every listener shares
(``pyqmail.smtpd.authguard``, state in ``<root>/smtpd/authstate.sqlite``): one attempt at a time
per client, a penalty delay after each failure, a temporary lock of a name after
``authlockfails`` failures (``pyqmail.authlock``, ``<root>/auth/accounts.sqlite``: IMAP and
POP3 logins share it), and at most ``authconcurrency`` password checks at once per worker.

Signals: TERM stops accepting, lets sessions finish for ``timeoutterm`` seconds, then
tells the rest ``421`` and exits 0. HUP re-reads control files, rules and certificates
for new connections; sessions in progress keep the configuration they started with. A
bad new configuration is logged and the old one stays in force. TLS sessions resume
across workers and HUPs (``pyqmail.tickets``: ticket keys drawn by the supervisor before any
fork, rotated hourly, only in memory; a restart makes every client do a full handshake once).
Two files need no HUP:
the rules cdb and control/smtpusers are re-read when they change (tcpserver and
checkpassword read theirs per connection / per AUTH).

Files are read after the privilege drop, so ``--user`` must be able to read
control/servercert.pem (qmail-tls: owner qmaild, mode 0400), control/smtpusers (0640
root:pyqmaila, the group of the password verifiers) and write the queue's tmp/ and new/ and
``<root>/smtpd/`` (the shared AUTH failure state). Before the drop, root only looks whether
control/authchecks, control/dnsbl or control/dnswl exist, to import the checks' libraries
while it surely can (``pyqmail.checks.libraries``; without those files a listener never
loads them, some 9 MB less per process); and whether the rules cdb has ``=host`` keys, to
import dnspython for the client names they need.

Logs go to stdout (multilog), one line per event: ``pid=<pid> <event> key=value ...``
(values with blanks or control characters are escaped as ``\\xNN``)::

    start listen=127.0.0.1:2525 mode=smtp workers=2 uid=105 loop=uvloop [libraries=auth,lists,hosts]
                                     (real port if :0; the checks' libraries loaded at start)
    ready slot=0 mode=smtp                                    (one per worker, serving)
    msg qid=... mid=<...> size=N ip=... [tls=TLSv1.3:SUITE:BITS] [auth=USER] from=<..> to=<..>,<..>
    conn ip=... port=... secs=... msgs=N [tls=...] [auth=...] [host=NAME]  (one per finished
                                     connection; host: its confirmed name, for =host rules)
    pregreet ip=... port=... bytes=N after=SECS   helo-refused ip=... text=...
    junk-limit, defer-limit, rcpt-defer-limit, rcpt-overshoot  (a session's first excess of
                                     each margin: pyqmail.protocol.tally)
    deny ip=... port=... rule=KEY [host=NAME]   refuse ip=... port=... reason=maxconnip=50
    host-fail ip=... error=LifetimeTimeout    (the name of a client could not be looked up)
    auth-fail ip=... port=... mech=M user=U reason=R [delay=S]  (every failed AUTH; fail2ban)
    tls-fail, timeout, abort, queue-fail, reload, reload-fail, worker-exit, stopped

Exit status: 0 after TERM; 111 (qmail's "temporary failure") for a bad command line or
configuration, with ``pyqmail-smtpd: fatal: <file>:<line>: <problem>`` on stderr.
``--check`` loads the configuration as a start with the same ``--mode``/``--rules``/``--user``
would (``pyqmail.control.check``), binds and writes nothing, and exits 0 with one OK line or
111 with those fatal lines, one per problem.

Where each part lives (this module: the command line and the bind):

- ``entry``: the program's entry point (this module, or the supervisor for ``--supervise``);
- ``prefork``: the supervisor (spawners fork workers; replaces dead ones; TERM and HUP);
- ``start``: the start-up after the bind (privilege drop, configuration and its checks,
  the spawner's forks);
- ``server``: one worker (its loop, listener, reload and wind-down; the sessions' context);
- ``session``: one connection (socket bytes <-> the core's events, timers);
- ``tlspump``: TLS over memory BIOs; ``intake``: a message on its way into the queue;
- ``policy``: the rules and users caches and the per-client Policy; ``auth``: the AUTH check;
- ``limits``, ``authguard``, ``knobs``: connection limits, AUTH limits, session knobs;
- ``senders``, ``sendlimits``: the addresses an AUTH login owns, its messages per hour;
- ``pyqmail.log``: the key=value log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import ipaddress
import os
import resource
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from pyqmail import __version__
from pyqmail.smtpd import entry

MODES = ("smtp", "smtps", "submission")
LOOPS = ("auto", "asyncio", "uvloop")


class UsageError(Exception):
    """Bad command line or start-up condition; main() prints it and exits 111."""


# --- command line ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line, checked: what the rest of the start-up and the reloads need."""

    root: Path
    host: str
    port: int
    mode: str
    rules: Path | None
    user: str | None
    workers: int
    loop: str = "auto"  # --loop: resolved (``resolve_loop``) where the daemon is imported
    check: bool = False  # --check: load the configuration, report, exit (pyqmail.control.check)


def parse_listen(text: str, allow_wildcard: bool) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT``; a wildcard address only when explicitly allowed."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--listen {text!r}: expected IP:PORT (IPv6: [ADDR]:PORT)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--listen {text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {text!r}: port must be a number 0-65535")
    if ip.is_unspecified and not allow_wildcard:
        raise UsageError(
            f"--listen {text!r}: refusing to listen on every address "
            "(name the host's IP, or pass --allow-wildcard)"
        )
    return str(ip), int(port_text)


def parse_workers(text: str) -> int:
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise UsageError(f"--workers {text!r}: expected 'auto' or a number from 1 to 256")
    return int(text)


def resolve_loop(choice: str) -> str:
    """``auto``: uvloop when importable, else asyncio's own loop; ``uvloop``: required."""
    if choice == "asyncio":
        return choice
    try:
        importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "uvloop":
            raise UsageError(f"--loop uvloop: cannot import uvloop ({exc})") from None
        return "asyncio"
    return "uvloop"


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's own formatter, as wide as the terminal, found as ``shutil`` would find it
    (``COLUMNS``, then stdout's terminal, else 80) but without importing it: argparse
    imports ``shutil`` (and with it zlib, bz2 and lzma) for nothing else, in every spawner
    that reads the command line again, and the workers it forks keep it (0.3 MiB)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return argparse.HelpFormatter(prog, width=(columns if columns > 0 else 80) - 2)


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="pyqmail-smtpd",
        description="qmail-style SMTP listener (see module docstring)",
        formatter_class=_help_formatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version (of the daemon and of the collection pyqmail.mail) and exit",
    )
    parser.add_argument("--root", default="/var/qmail", help="qmail root (default /var/qmail)")
    parser.add_argument("--listen", help="IP:PORT to listen on (required unless --check)")
    parser.add_argument("--mode", choices=MODES, default="smtp", help="listener mode")
    parser.add_argument("--rules", help="tcprules cdb with per-client policy")
    parser.add_argument("--user", help="unprivileged user to run as (required when root)")
    parser.add_argument("--workers", default="auto", help="'auto' (one per core) or N")
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop (Debian python3-uvloop) if installed with 'auto' (default)",
    )
    parser.add_argument(
        "--allow-wildcard", action="store_true", help="permit listening on 0.0.0.0 or ::"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="load the configuration as the daemon would for --mode/--rules (as --user when "
        "given), bind nothing, then exit: 0 = usable, 111 = not (reasons on stderr)",
    )
    ns = parser.parse_args(argv)
    if ns.listen is None and not ns.check:
        parser.error("the following arguments are required: --listen")
    host, port = ("", 0) if ns.listen is None else parse_listen(ns.listen, ns.allow_wildcard)
    return Options(
        root=Path(ns.root),
        host=host,
        port=port,
        mode=ns.mode,
        rules=Path(ns.rules) if ns.rules else None,
        user=ns.user,
        workers=parse_workers(ns.workers),
        loop=ns.loop,
        check=ns.check,
    )


# --- start-up ----------------------------------------------------------------------------


def bind_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, joined with SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others join the one we got
            sock.listen(1024)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return socks


def raise_fd_limit() -> None:
    """Idle connections are cheap; running out of descriptors is not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 1 << 20), hard))


# --- entry point -------------------------------------------------------------------------


def _start() -> ModuleType:
    """``pyqmail.smtpd.start``, imported only by a process that serves or checks (and by
    spawners): never by the supervisor, which must stay small (``prefork``)."""
    return importlib.import_module("pyqmail.smtpd.start")


def exec_supervisor(socks: list[socket.socket], args: list[str]) -> NoReturn:
    """Become the supervisor (``entry``, ``prefork``): the same program, a fresh
    interpreter that imports none of the daemon, the sockets inherited by number."""
    fds = [sock.detach() for sock in socks]
    for fd in fds:
        os.set_inheritable(fd, True)
    flag = entry.SUPERVISE + ",".join(map(str, fds))
    script = Path(sys.argv[0])
    if script.name == "pyqmail-smtpd" and os.access(script, os.X_OK):
        # its own program again, its name kept in ps; argv is its own command line
        with contextlib.suppress(OSError):  # a broken script: the interpreter, below
            os.execv(script, [str(script), flag, *args])  # noqa: S606
    os.execv(sys.executable, [sys.executable, "-m", "pyqmail.smtpd.entry", flag, *args])  # noqa: S606


def main(argv: list[str] | None = None) -> int:
    """Parse, bind (as root if the port needs it); then ``--workers 1`` serves in this
    process, and more are forked by spawners under the supervisor this process becomes
    (``prefork``). Privileges drop, and files are read, in whichever process imports
    ``start``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(args)
        if opts.check:
            return int(_start().check(opts))
        raise_fd_limit()
        socks = bind_sockets(opts.host, opts.port, opts.workers)
    except UsageError as exc:
        sys.stderr.write(f"pyqmail-smtpd: fatal: {exc}\n")
        return 111
    if opts.workers == 1:
        return int(_start().serve_alone(opts, socks[0], listen_name(socks[0])))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        exec_supervisor(socks, args)
    except OSError as exc:
        sys.stderr.write(f"pyqmail-smtpd: fatal: cannot start the supervisor: {exc}\n")
        return 111


def listen_name(sock: socket.socket) -> str:
    """``IP:PORT`` (``[IPv6]:PORT``) as bound: the real port when ``--listen`` said 0."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    sys.exit(main())
