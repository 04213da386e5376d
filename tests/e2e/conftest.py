"""End-to-end harness: a throw-away qmail root and pyqmail-smtpd running as a real process.

``qmail_root`` builds ``control/`` + ``queue/`` with the test PKI's server certificate;
``smtpd`` starts the daemon on 127.0.0.1 with a kernel-chosen port and stops it by PID.
As root the daemon drops to ``nobody`` (the root is built in a world-traversable temporary
directory and handed to that user), so every test also exercises the privilege drop.

Reusable from other test packages::

    def test_x(qmail_root, smtpd):
        qmail_root.control("rcpthosts", "example.com\\n")
        d = smtpd(mode="submission", workers=2)
        with smtplib.SMTP(d.host, d.port) as s: ...
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyqmail import authdb, rules
from pyqmail.queue.format import Envelope
from pyqmail.queue.store import Queue
from tests.conftest import PKI
from tests.e2e.helpers import RawSMTP
from tests.pki import Issued
from tests.queue_util import messages

DROP_USER = "nobody"
IS_ROOT = os.geteuid() == 0
SMTPD = Path(sys.executable).parent / "pyqmail-smtpd"


def smtpd_command() -> list[str]:
    if SMTPD.exists():
        return [str(SMTPD)]
    return [sys.executable, "-m", "pyqmail.smtpd.cli"]


@dataclass
class QmailRoot:
    """A qmail root directory the daemon under test can read (and write its queue in)."""

    path: Path
    pki: PKI

    @property
    def queue(self) -> Queue:
        return Queue(self.path / "queue")

    def _own(self, path: Path) -> None:
        if IS_ROOT:
            pw = pwd.getpwnam(DROP_USER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def write(self, relpath: str, data: str | bytes, mode: int = 0o644) -> Path:
        """Write a file atomically (the daemon may be reading) and hand it to the daemon."""
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.chmod(mode)
        self._own(tmp)
        tmp.replace(target)
        return target

    def control(self, name: str, data: str | bytes, mode: int = 0o644) -> Path:
        return self.write(f"control/{name}", data, mode)

    def remove_control(self, name: str) -> None:
        (self.path / "control" / name).unlink(missing_ok=True)

    def servercert(self, leaf: Issued | None = None) -> Path:
        """control/servercert.pem in qmail order: key, certificate, chain."""
        chosen = leaf if leaf is not None else self.pki.server
        data = chosen.key_pem + chosen.cert_pem + self.pki.ca.cert_pem
        return self.control("servercert.pem", data, 0o400)

    def users(self, users: dict[str, str], cram: tuple[str, ...] = ()) -> Path:
        """control/smtpusers with scrypt hashes (and CRAM-MD5 secrets for ``cram``)."""
        lines = [
            authdb.format_line(
                authdb.User(name, authdb.hash_password(pw), pw if name in cram else None)
            )
            for name, pw in users.items()
        ]
        return self.control("smtpusers", "\n".join(lines) + "\n", 0o640)

    def rules(self, source: str) -> Path:
        """A tcprules cdb compiled from ``source`` (tcprules syntax), outside control/."""
        data = rules.compile_rules(rules.parse(source, "test rules"))
        return self.write("etc/smtp.cdb", data)

    def queued(self) -> list[tuple[Envelope, bytes]]:
        q = self.queue
        return [(s.env, s.body) for _, s in messages(q, "new")]

    def tmp_files(self) -> list[str]:
        return os.listdir(self.path / "queue" / "tmp")


@pytest.fixture
def qmail_root(pki: PKI) -> Iterator[QmailRoot]:
    base = Path(tempfile.mkdtemp(prefix="pyqmail-e2e-"))
    base.chmod(0o755)
    root = QmailRoot(base, pki)
    (base / "control").mkdir()
    root.control("me", "mx.test\n")
    root.control("rcpthosts", "mx.test\nexample.test\n.sub.example.test\n")
    root.servercert()
    root.queue.create()
    if IS_ROOT:
        for path in [base, *base.rglob("*")]:
            root._own(path)
    yield root
    shutil.rmtree(base, ignore_errors=True)


def listeners_root(path: Path, pki: PKI) -> QmailRoot:
    """A qmail root at ``path`` that pyqmail-smtpd (every listener's mode, the submission
    listener's own rules cdb too) and pyqmail-send load: control files, a queue, the rules
    cdbs; owned as the daemons need when root. For the role tests that run their --check."""
    root = QmailRoot(path, pki)
    (root.path / "control").mkdir(parents=True)
    root.control("me", "mx.test\n")
    root.control("rcpthosts", "mx.test\n")
    root.servercert()
    root.queue.create()
    root.rules(":allow\n")
    root.write("etc/smtp-submission.cdb", (root.path / "etc" / "smtp.cdb").read_bytes())
    if IS_ROOT:
        for owned in [root.path, *root.path.rglob("*")]:
            root._own(owned)
    return root


@dataclass
class Daemon:
    """A running pyqmail-smtpd; its output is collected line by line."""

    proc: subprocess.Popen[bytes]
    args: list[str]
    lines: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    clients: list[RawSMTP] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False
    reader: threading.Thread | None = None

    def connect(self, timeout: float = 10.0) -> RawSMTP:
        """A raw client connection, closed when the test ends."""
        client = RawSMTP(self.host, self.port, timeout)
        self.clients.append(client)
        return client

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[re.Match[str]]:
        """Block until ``count`` output lines match ``pattern``; return the matches."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in map(rx.search, self.lines) if m]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    output = "\n".join(self.lines)
                    raise AssertionError(
                        f"wanted {count} line(s) matching {pattern!r} within {timeout}s,"
                        f" got {len(found)}; output:\n{output}"
                    )
                self._cond.wait(min(left, 0.2))

    def worker_pids(self) -> set[int]:
        return {int(m.group(1)) for m in self.wait_for(r"pid=(\d+) ready")}

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """TERM, wait; KILL the parent and every worker we saw if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        pids = {self.proc.pid}
        with self._cond:
            pids |= {int(m.group(1)) for m in map(re.compile(r"pid=(\d+)").match, self.lines) if m}
        for pid in pids:
            if _is_ours(pid, self.args):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(5)


def _is_ours(pid: int, args: list[str]) -> bool:
    """Only a process still running our exact command line (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    tail = args[args.index("--root") :]
    return [a.decode() for a in cmdline if a][-len(tail) :] == tail


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def smtpd(qmail_root: QmailRoot) -> Iterator[StartDaemon]:
    started: list[Daemon] = []

    def start(
        mode: str = "smtp",
        *,
        workers: int = 1,
        rules_cdb: Path | None = None,
        extra: list[str] | None = None,
        wrapper: list[str] | None = None,
        expect_ready: bool = True,
        listen: str = "127.0.0.1:0",
    ) -> Daemon:
        args = [
            *(wrapper or []),
            *smtpd_command(),
            "--root",
            str(qmail_root.path),
            "--listen",
            listen,
            "--mode",
            mode,
            "--workers",
            str(workers),
        ]
        if IS_ROOT:
            args += ["--user", DROP_USER]
        if rules_cdb is not None:
            args += ["--rules", str(rules_cdb)]
        args += extra or []
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        daemon = Daemon(proc, args)
        started.append(daemon)
        daemon.reader = threading.Thread(target=daemon._reader, daemon=True)
        daemon.reader.start()
        if expect_ready:
            m = daemon.wait_for(r"start listen=\[?([^\]\s]+?)\]?:(\d+) ", timeout=30)[0]
            daemon.host, daemon.port = m.group(1), int(m.group(2))
            daemon.wait_for(r"pid=\d+ ready", timeout=30, count=workers)
        return daemon

    yield start
    for daemon in started:
        for client in daemon.clients:
            client.close()
        if daemon.proc.poll() is None:
            daemon.kill()
        # Let the reader see EOF before its pipe is closed under it (a close during a read
        # raises in the reader thread and fails whichever test runs next).
        if daemon.reader is not None:
            daemon.reader.join(10)
        if daemon.proc.stdout is not None and (
            daemon.reader is None or not daemon.reader.is_alive()
        ):
            daemon.proc.stdout.close()
