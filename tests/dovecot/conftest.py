"""A real Dovecot on loopback over a throw-away pyqmail host: the IMAP/POP3 harness.

``mailhost`` builds a qmail root (the e2e ``qmail_root``) with one mailbox, its login in
``users/logins`` and its scrypt hash in ``control/smtpusers``, and can start pyqmail-send on
it. ``dovecot`` starts ``dovecot -F`` with the role's own template
(roles/pyqmail_dovecot/templates/etc/dovecot/dovecot.conf.j2) rendered for this host: kernel
chosen ports on 127.0.0.1, its own base_dir, never the system configuration. Dovecot needs
root (it switches to the mail user); the tests run as root, as ``make test`` does.
``clients`` opens the IMAPS and POP3S sessions a test makes to it (from CLIENT_IP, or from an
address of the test's choosing) and closes whatever is left open when the test ends.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import poplib
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pytest

import pyqmail
from pyqmail import authdb
from tests.conftest import IMPOSSIBLE_HERE, PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, qmail_root, smtpd  # noqa: F401
from tests.e2e.helpers import client_context, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
# The sources of the pyqmail this test process imported (PYTHONPATH): the checker Dovecot
# runs is the same code, not whatever the checkout or an installed copy holds.
SOURCES = Path(pyqmail.__file__).resolve().parents[1]
TEMPLATE = REPO / "roles" / "pyqmail_dovecot" / "templates" / "etc" / "dovecot" / "dovecot.conf.j2"
BIN = Path(sys.executable).parent
DOMAIN = "mx.test"
USERNAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_@+"


# Clients connect from another loopback address: Dovecot counts a client on the server's own
# address as a local, secured connection and would offer LOGIN in clear to it.
CLIENT_IP = "127.0.0.2"
TIMEOUT = 30  # seconds a client waits for Dovecot (a loaded machine, a checker starting)


class IMAP(imaplib.IMAP4):
    """imaplib.IMAP4 from CLIENT_IP."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (CLIENT_IP, 0))


class IMAPS(imaplib.IMAP4_SSL):
    """imaplib.IMAP4_SSL from ``source``: CLIENT_IP, or another loopback address (one per
    guessing bot in the login-lock tests)."""

    def __init__(self, host: str, port: int, *, source: str = CLIENT_IP, **kwargs: Any) -> None:
        self.source = source  # before connecting: imaplib connects in __init__
        super().__init__(host, port, **kwargs)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout, (self.source, 0))
        return self.ssl_context.wrap_socket(raw, server_hostname=self.host)


class POP3(poplib.POP3):
    """poplib.POP3 from CLIENT_IP."""

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (CLIENT_IP, 0))


class POP3S(poplib.POP3_SSL):
    """poplib.POP3_SSL from ``source`` (CLIENT_IP unless told)."""

    def __init__(self, host: str, port: int, *, source: str = CLIENT_IP, **kwargs: Any) -> None:
        self.source = source  # before connecting: poplib connects in __init__
        super().__init__(host, port, **kwargs)

    def _create_socket(self, timeout: float) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout, (self.source, 0))
        return self.context.wrap_socket(raw, server_hostname=self.host)


@dataclass
class Clients:
    """The IMAPS and POP3S sessions of one test, each closed when the test ends (logged out,
    kicked or left half-way): an open socket is a ResourceWarning, and warnings are errors."""

    ctx: ssl.SSLContext
    sessions: list[imaplib.IMAP4 | poplib.POP3] = field(default_factory=list)

    def imaps(self, port: int, *, source: str = CLIENT_IP) -> IMAPS:
        m = IMAPS("127.0.0.1", port, ssl_context=self.ctx, timeout=TIMEOUT, source=source)
        self.sessions.append(m)
        return m

    def pop3s(self, port: int, *, source: str = CLIENT_IP) -> POP3S:
        pop = POP3S("127.0.0.1", port, context=self.ctx, timeout=TIMEOUT, source=source)
        self.sessions.append(pop)
        return pop

    def imap_login(self, port: int, login: str, password: str, *, source: str = CLIENT_IP) -> str:
        """ "OK", or the error Dovecot answered LOGIN with; the session is ended either way."""
        with self.imaps(port, source=source) as m:
            try:
                m.login(login, password)
            except imaplib.IMAP4.error as exc:
                return str(exc)
            m.logout()
            return "OK"

    def close(self) -> None:
        for session in self.sessions:
            # one logged out or kicked is closed already: its error here is no finding
            with contextlib.suppress(OSError, imaplib.IMAP4.error, poplib.error_proto):
                if isinstance(session, imaplib.IMAP4):
                    session.shutdown()
                else:
                    session.close()


@pytest.fixture
def ctx(pki: PKI) -> ssl.SSLContext:
    """A client's TLS context: trusts the test CA, as a mail client trusts the public ones."""
    return client_context(pki)


@pytest.fixture
def clients(ctx: ssl.SSLContext) -> Iterator[Clients]:
    opened = Clients(ctx)
    yield opened
    opened.close()


@dataclass
class MailHost:
    """The pyqmail side: mailboxes, logins, passwords, and pyqmail-send delivering."""

    qroot: QmailRoot
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.qroot.path

    def home(self, name: str) -> Path:
        return self.root / "homes" / name

    def add(self, name: str, password: str) -> str:
        """Mailbox ``name`` with login ``name@mx.test`` and its password; returns the login."""
        home = self.home(name)
        for sub in ("", "/Maildir", "/Maildir/cur", "/Maildir/new", "/Maildir/tmp"):
            path = Path(f"{home}{sub}")
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.qroot._own(path)
        self.qroot._own(home.parent)
        login = f"{name}@{DOMAIN}"
        self._edit("users/mailboxes", name, f"{name}:{home}")
        self._edit("users/logins", login, f"{login}:{name}", 0o640)  # the role's mode
        self.password(login, password)
        return login

    def _edit(self, relpath: str, key: str, line: str | None, mode: int = 0o644) -> None:
        """Replace (or with None remove) the line of ``key`` in a name:value file."""
        path = self.root / relpath
        old = path.read_text().splitlines() if path.exists() else []
        kept = [x for x in old if x.rpartition(":")[0] != key and x.partition(":")[0] != key]
        text = "".join(f"{x}\n" for x in [*kept, *([line] if line else [])])
        self.qroot.write(relpath, text, mode)

    def password(self, login: str, password: str) -> None:
        """Set the password of ``login`` in control/smtpusers (as pyqmail_smtp_user does)."""
        path = self.root / "control" / "smtpusers"
        db = authdb.AuthDB.load(str(path)) if path.exists() else authdb.AuthDB()
        db.set(authdb.User(login, authdb.hash_password(password)))
        self.qroot.control("smtpusers", db.dump(), 0o640)

    def remove(self, name: str) -> None:
        """What the role does for ``state: absent``: mailbox line, login and AUTH user go."""
        login = f"{name}@{DOMAIN}"
        self._edit("users/mailboxes", name, None)
        self._edit("users/logins", login, None, 0o640)
        db = authdb.AuthDB.load(str(self.root / "control" / "smtpusers"))
        db.remove(login)
        self.qroot.control("smtpusers", db.dump(), 0o640)

    def start_send(self) -> None:
        """pyqmail-send on this root as the delivery user (as the daemontools run script)."""
        self.qroot.control("locals", f"{DOMAIN}\n")
        (self.root / "alias").mkdir(exist_ok=True)
        self.qroot._own(self.root / "alias")
        log = self.root / "send.log"
        with log.open("wb") as out:
            self.procs.append(
                subprocess.Popen(
                    [BIN / "pyqmail-send", "--root", str(self.root), "--user", DROP_USER],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        wait_for(lambda: "started" in log.read_text(errors="replace"), 15, "pyqmail-send")

    def new_mail(self, name: str) -> list[Path]:
        return sorted((self.home(name) / "Maildir" / "new").iterdir())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def mailhost(qmail_root: QmailRoot) -> Iterator[MailHost]:  # noqa: F811 - the imported fixture
    if not IS_ROOT:
        pytest.skip(f"{IMPOSSIBLE_HERE} Dovecot switches to the mail user, which needs root")
    for sub in ("users", "homes"):
        (qmail_root.path / sub).mkdir(exist_ok=True)
        qmail_root._own(qmail_root.path / sub)
    # What the password verifiers share (the login locks, the checker's slots), as the
    # pyqmail_control role makes it: root, the auth group (here the drop user's, which
    # the template gives Dovecot's auth process), 2770.
    shared = qmail_root.path / "auth"
    shared.mkdir()
    os.chown(shared, 0, pwd.getpwnam(DROP_USER).pw_gid)
    shared.chmod(0o2770)
    host = MailHost(qmail_root)
    yield host
    host.stop()


@dataclass
class Dovecot:
    """A running ``dovecot -F`` and the ports of its four listeners."""

    proc: subprocess.Popen[bytes]
    config: Path
    ports: dict[str, int]
    log: Path
    base_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def reload(self) -> None:
        """SIGHUP, as ``svc -h`` sends it: Dovecot re-reads its configuration and certificate."""
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def render_config(
    mailhost: MailHost,
    base_dir: Path,
    ports: dict[str, int],
    mail_user_name: str = DROP_USER,
    **extra: object,
) -> str:
    """The role's dovecot.conf template, filled in for the test host; the mailboxes belong to
    ``mail_user_name`` and its primary group (a test that runs the mailbox role needs a user
    whose group has its name, as the role's delivery user has)."""
    mail_user = pwd.getpwnam(mail_user_name)
    mail_group = grp.getgrgid(mail_user.pw_gid)
    users_group = grp.getgrgid(pwd.getpwnam(DROP_USER).pw_gid)  # the auth/ directory's
    # Debian's Python with the imported pyqmail's sources (what
    # /opt/pyqmail/bin/pyqmail-checkpassword runs on a host): the test venv's interpreter lives
    # under /root, which the auth process (user dovecot) cannot enter. Dovecot splits these
    # arguments at spaces.
    checkpassword = (
        f"/usr/bin/env PYTHONPATH={SOURCES} /usr/bin/python3 -m pyqmail.tools.checkpassword"
        f" --root {mailhost.root} "
        f"--mail-user {mail_user.pw_name} --mail-group {mail_group.gr_name}"
    )
    values: dict[str, object] = {
        "ansible_managed": "written by tests/dovecot/conftest.py",
        "dovecot_protocols": ["imap", "pop3"],
        "dovecot_listen": "127.0.0.1",
        "dovecot_base_dir": str(base_dir / "run"),
        "dovecot_state_dir": str(base_dir / "state"),
        "dovecot_instance": f"pyqmail-test-{base_dir.name}",
        "dovecot_greeting": "pyqmail test IMAP/POP3",
        "dovecot_servercert": str(mailhost.root / "control" / "servercert.pem"),
        "dovecot_username_chars": USERNAME_CHARS,
        "dovecot_failure_delay": 1,
        "dovecot_checkpassword": checkpassword,
        "dovecot_users_group": users_group.gr_name,
        "dovecot_mail_user": mail_user.pw_name,
        "dovecot_mail_group": mail_group.gr_name,
        "dovecot_mail_uid": mail_user.pw_uid,
        "dovecot_mail_gid": mail_user.pw_gid,
        "dovecot_ports": ports,
    }
    values.update(extra)
    # A configuration file, not HTML: nothing to escape.
    env = jinja2.Environment(  # noqa: S701
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    return env.from_string(TEMPLATE.read_text()).render(values)


StartDovecot = Callable[..., Dovecot]


@pytest.fixture
def dovecot(mailhost: MailHost) -> Iterator[StartDovecot]:
    started: list[Dovecot] = []
    base = Path(tempfile.mkdtemp(prefix="pyqmail-dovecot-"))
    base.chmod(0o755)

    def start(mail_user_name: str = DROP_USER, **extra: object) -> Dovecot:
        ports = {name: free_port() for name in ("imap", "imaps", "pop3", "pop3s")}
        config = base / "dovecot.conf"
        config.write_text(render_config(mailhost, base, ports, mail_user_name, **extra))
        log = base / "dovecot.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ["dovecot", "-F", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        d = Dovecot(proc, config, ports, log, base)
        started.append(d)

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dovecot exited {proc.returncode}: {d.output()}")
            for port in ports.values():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
            return True

        wait_for(listening, 20, "dovecot to listen on its four ports")
        return d

    yield start
    for d in started:
        d.stop()
        print(f"--- {d.log}:\n{d.output()}")  # shown when the test failed
    shutil.rmtree(base, ignore_errors=True)


def os_owner(path: Path) -> tuple[str, str, int]:
    """(user, group, mode) of ``path``, for the permission checks."""
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o7777


__all__ = [
    "CLIENT_IP",
    "DOMAIN",
    "IMAP",
    "IMAPS",
    "POP3",
    "POP3S",
    "Clients",
    "Dovecot",
    "MailHost",
    "StartDovecot",
    "os_owner",
    "wait_for",
]
