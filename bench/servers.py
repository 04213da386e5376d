"""The servers under test, each started privately on 127.0.0.1 and stopped by PID.

- ``PyqmailServer``: pyqmail-smtpd with ``--workers auto`` on a temporary qmail root.
- ``PostfixServer``: Debian's Postfix as a private instance: its own config, queue and
  data directories under the benchmark's temporary directory, its master started in the
  foreground (``master -d``) so its PID is ours. The system Postfix, /etc/postfix and
  port 25 are never touched (``meta_directory`` points at /etc/postfix read-only, for
  postfix-files). Accepted mail is put on hold (``check_client_access static:HOLD``):
  cleanup writes and fsyncs it into the queue exactly as usual, and it then stays there,
  like pyqmail's queue with no delivery agent running.
- ``AiosmtpdServer``: ``bench/aiosmtpd_server.py`` (fsync per message).

All three present the same certificate and hold the same connection limit (1100), so
1,000 idle connections fit in each.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyqmail
from bench import queue_count
from bench.certs import CertFiles
from bench.procstat import alive, start_time, tree
from pyqmail.queue.store import Queue

REPO = Path(__file__).resolve().parent.parent
MAX_CONNECTIONS = 1100
POSTFIX_MASTER = Path("/usr/lib/postfix/sbin/master")
POSTFIX_QUEUE_DIRS = (
    "active",
    "bounce",
    "corrupt",
    "defer",
    "deferred",
    "flush",
    "hold",
    "incoming",
    "private",
    "saved",
    "trace",
)


class ServerError(Exception):
    """A server could not be set up, did not come up, or died."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_greeting(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll until the server answers 220 on ``port``; fail early if it exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"exited with status {proc.returncode} while starting; log {log}:\n{_tail(log)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
            if banner.startswith(b"220"):
                return
            last = banner.decode("ascii", "replace").strip()
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise ServerError(f"no 220 greeting on port {port} after {timeout}s ({last}); log {log}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Server:
    """Common life cycle: ``start`` (blocks until 220), ``pid``, ``stored``, ``stop``."""

    name = "server"

    def __init__(
        self, base: Path, certs: CertFiles, port: int | None = None, tag: str = ""
    ) -> None:
        self.dir = base / (self.name + tag)  # tag: a second instance beside the first
        self.certs = certs
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Create the server's files under ``self.dir``."""

    def stored(self) -> int:
        """How many messages the server has committed to its queue or spool."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError(f"{self.name} is not running")
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """The roots whose process trees are the server: its own, and helpers it talks to
        that are not its children (the checks row's milters, bench/checks_peer.py)."""
        return [self.pid]

    def start(self, timeout: float = 20) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
        try:
            wait_for_greeting(self.port, self.proc, self.log, timeout)
        except ServerError as exc:
            self.stop()
            raise ServerError(f"{self.name}: {exc}") from None

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(
                f"{self.name} died (status {code}); log {self.log}:\n{_tail(self.log)}"
            )

    def stop(self, timeout: float = 15) -> None:
        """TERM the server's main process, wait, then KILL whatever of its tree is left."""
        if self.proc is None:
            return
        # Remember each process with its start time: after the TERM, only those still
        # alive *and* the same process (not a reused PID) get a KILL.
        pids = [(p, start_time(p)) for p in tree(self.proc.pid)] if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        for pid, started in pids:
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5  # Postfix's master exits before its children do
        while any(alive(*p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None


@functools.cache
def compile_pyqmail() -> None:
    """Bring pyqmail's bytecode (``__pycache__``) up to date, once per benchmark run.

    Why: an installed pyqmail has it (pip compiles a wheel's modules when it installs them,
    as the roles do), but this checkout is an editable install, and with
    ``PYTHONDONTWRITEBYTECODE`` set, or sources changed since the last import, every
    pyqmail-smtpd process would compile the changed modules from source at start. The
    compiler's garbage stays in the heap the workers share: about 1 MiB of PSS more than a
    deployed daemon has (measured at rest after changing two modules), on pyqmail's side
    only. Compiling writes nothing but ``__pycache__`` files."""
    package = Path(pyqmail.__file__).parent
    if not compileall.compile_dir(package, quiet=1):
        raise ServerError(f"cannot compile pyqmail's bytecode under {package}")


class PyqmailServer(Server):
    name = "pyqmail"

    def __init__(
        self,
        base: Path,
        certs: CertFiles,
        workers: str = "auto",
        user: str = "nobody",
        commitdelay: int | None = None,
        *,
        tag: str = "",
        control: dict[str, str] | None = None,
    ) -> None:
        super().__init__(base, certs, tag=tag)
        self.workers = workers
        self.control = control or {}  # more control files (the checks row's)
        self.commitdelay = commitdelay  # control/commitdelay (ms); None: pyqmail's default
        self.root = self.dir / "qmail"
        # As root, pyqmail-smtpd insists on dropping to an unprivileged user before it
        # reads its configuration; its files then belong to that user.
        self.user = user if os.geteuid() == 0 else None

    def prepare(self) -> None:
        from pyqmail.queue.store import Queue

        compile_pyqmail()
        control = self.root / "control"
        control.mkdir(parents=True, exist_ok=True)
        files = {
            "me": "mx.bench.test",
            "rcpthosts": "bench.test",
            "locals": "bench.test",
            "maxconn": str(MAX_CONNECTIONS),
            # 1,000 idle connections are ~90 % of maxconn: with the default stresspercent
            # (80) they would be dropped after timeoutstress, and the idle phase measures
            # memory while they are held. The stress timeout is tested in tests/attacks.
            "stresspercent": "100",
        }
        if self.commitdelay is not None:
            files["commitdelay"] = str(self.commitdelay)
        files.update(self.control)
        for name, text in files.items():
            (control / name).write_text(text + "\n")
        shutil.copyfile(self.certs.combined, control / "servercert.pem")
        (control / "servercert.pem").chmod(0o600)
        Queue(self.root / "queue").create()
        if self.user is not None:
            try:
                owner = pwd.getpwnam(self.user)
            except KeyError:
                raise ServerError(f"pyqmail --user {self.user!r}: no such user") from None
            self.dir.chmod(0o755)
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "pyqmail-smtpd"
        if not exe.exists():
            raise ServerError(f"{exe} not found: is pyqmail installed in this virtualenv?")
        return [
            str(exe),
            "--root",
            str(self.root),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--mode",
            "smtp",
            "--workers",
            self.workers,
            *(["--user", self.user] if self.user is not None else []),
        ]

    def stored(self) -> int:
        return queue_count.count(Queue(self.root / "queue"), "new")  # segments: several


class PostfixServer(Server):
    name = "postfix"

    def prepare(self) -> None:
        if not POSTFIX_MASTER.exists():
            raise ServerError(f"{POSTFIX_MASTER} not found: install Debian's postfix package")
        if os.geteuid() != 0:
            raise ServerError("the private Postfix instance needs root (its master runs as root)")
        try:
            owner = pwd.getpwnam("postfix")
            postdrop = grp.getgrnam("postdrop").gr_gid
        except KeyError as exc:
            raise ServerError(f"Postfix's user or group is missing: {exc}") from None
        self.dir.chmod(0o755)  # the postfix user must reach its queue
        etc, spool, data = self.dir / "etc", self.dir / "spool", self.dir / "data"
        for d in (etc, spool, data):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        os.chown(data, owner.pw_uid, owner.pw_gid)
        data.chmod(0o700)
        for name in POSTFIX_QUEUE_DIRS:
            (spool / name).mkdir(exist_ok=True)
            os.chown(spool / name, owner.pw_uid, 0)
            (spool / name).chmod(0o700)
        for name, mode in (("maildrop", 0o730), ("public", 0o710)):
            (spool / name).mkdir(exist_ok=True)
            os.chown(spool / name, owner.pw_uid, postdrop)
            (spool / name).chmod(mode)
        (spool / "pid").mkdir(exist_ok=True)
        (etc / "main.cf").write_text(self.main_cf(spool, data))
        (etc / "master.cf").write_text(self.master_cf())

    def main_cf(self, spool: Path, data: Path) -> str:
        return f"""\
# Private benchmark instance; nothing here touches the system Postfix.
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.bench.test
mydomain = bench.test
myorigin = bench.test
mydestination = bench.test
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
local_transport = discard
default_transport = discard
relayhost =
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
# Keep accepted mail queued (hold queue) instead of delivering it.
smtpd_data_restrictions = check_client_access static:HOLD
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = {MAX_CONNECTIONS}
smtpd_tls_security_level = may
smtpd_tls_chain_files = {self.certs.combined}
smtpd_tls_loglevel = 0
tls_random_source = dev:/dev/urandom
# TLS session resumption (the resumed workload, bench/resume.py): tickets are on by default
# (tls_session_ticket_cipher, keys from tlsmgr); the cache serves clients without tickets.
smtpd_tls_session_cache_database = btree:{data}/smtpd_scache
maillog_file = {self.dir / "maillog"}
maillog_file_prefixes = {self.dir}
"""

    def master_cf(self) -> str:
        services = [
            f"127.0.0.1:{self.port} inet n - n - {MAX_CONNECTIONS} smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "\n".join(services) + "\n"

    def command(self) -> list[str]:
        return [str(POSTFIX_MASTER), "-c", str(self.dir / "etc"), "-d"]

    def stored(self) -> int:
        spool = self.dir / "spool"
        return sum(len(os.listdir(spool / q)) for q in ("hold", "incoming", "active"))


class AiosmtpdServer(Server):
    name = "aiosmtpd"

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(REPO / "bench" / "aiosmtpd_server.py"),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--spool",
            str(self.dir / "spool"),
            "--cert",
            str(self.certs.chain),
            "--key",
            str(self.certs.key),
        ]

    def stored(self) -> int:
        return len(os.listdir(self.dir / "spool" / "new"))
