"""Mutually untrusting daemons, as the role sets them up ("Permissions" in pyqmail.queue.store).

pyqmail-smtpd runs as its own user (group pyqmail, plus pyqmaila to read the AUTH hashes),
pyqmail-send as the queue's owner (group pyqmail only). Proven with real processes started
under those identities (spare numeric ids, see ``tests.runas``) and a third process with the
smtpd user's identity that tries what a compromised pyqmail-smtpd would:

- it cannot list tmp/, mess/, state/ or bad/, cannot open a picked-up message (its own
  sessions' included), a state file, a bounce or a message injected by pyqmail-sendmail
  (not even while it waits in new/, which it may list: it must fsync new/), nor remove or
  rename someone else's message in new/;
- the delivery user cannot read control/smtpusers, while AUTH on pyqmail-smtpd works, and
  pyqmail-smtpd cannot read the relays' passwords (control/smtproutes-auth);
- and mail still flows: AUTH, queue, pickup, local delivery, bounces.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyqmail import authdb
from pyqmail.queue.store import Queue
from tests.attacks import tally
from tests.conftest import IMPOSSIBLE_HERE, PKI
from tests.e2e.conftest import Daemon
from tests.e2e.helpers import client_context, wait_for
from tests.queue_util import messages
from tests.runas import IS_ROOT, Ident, chown_tree, daemon_command, probe, spare_ids

pytestmark = pytest.mark.skipif(
    not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} starting daemons as other users needs root"
)

BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery"
MSG = b"From: <alice@mx.test>\r\nSubject: %s\r\n\r\nbody\r\n"


@dataclass
class Site:
    """A qmail root laid out as the roles lay it out, with the daemons' identities."""

    root: Path
    smtpd_user: Ident  # pyqmaild: group pyqmail + pyqmaila
    send_user: Ident  # pyqmails: group pyqmail, owns the queue
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    send_log: Path | None = None

    @property
    def queue(self) -> Queue:
        return Queue(self.root / "queue")

    def q(self, *parts: str) -> Path:
        return self.root.joinpath("queue", *parts)

    def start_send(self) -> subprocess.Popen[bytes]:
        """pyqmail-send as the queue's owner (as its run script's setuidgid would)."""
        self.send_log = self.root / f"send-{len(self.procs)}.log"
        with self.send_log.open("wb") as out:
            proc = subprocess.Popen(
                daemon_command(self.send_user, "pyqmail.send.manager", ["--root", str(self.root)]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        wait_for(lambda: "started" in self.log(), 15, "pyqmail-send to start")
        return proc

    def stop_send(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)

    def log(self) -> str:
        logs = sorted(self.root.glob("send-*.log"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def start_smtpd(self) -> Daemon:
        """pyqmail-smtpd (smtps: AUTH on) as the smtpd user, as after its --user drop."""
        args = daemon_command(
            self.smtpd_user,
            "pyqmail.smtpd.cli",
            [
                *("--root", str(self.root), "--listen", "127.0.0.1:0"),
                *("--mode", "smtps", "--workers", "1"),
            ],
            preload=("pyqmail.smtpd.start",),
        )
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        daemon = Daemon(proc, args)
        self.daemons.append(daemon)
        daemon.reader = threading.Thread(target=daemon._reader, daemon=True)
        daemon.reader.start()
        m = daemon.wait_for(r"start listen=([^\s:]+):(\d+) ", timeout=30)[0]
        daemon.host, daemon.port = m.group(1), int(m.group(2))
        daemon.wait_for(r"pid=\d+ ready", timeout=30)
        return daemon

    def sendmail(self, *args: str, subject: bytes) -> None:
        """pyqmail-sendmail as root (cron)."""
        done = subprocess.run(
            [BIN / "pyqmail-sendmail", "--root", str(self.root), *args],
            input=MSG % subject,
            capture_output=True,
            check=False,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr

    def close(self) -> None:
        self.stop_send()
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.stop()
            if daemon.reader is not None:
                daemon.reader.join(10)
            if daemon.proc.stdout is not None:
                daemon.proc.stdout.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def site(pki: PKI) -> Iterator[Site]:
    smtpd_uid, send_uid, queue_gid, auth_gid = spare_ids(4)
    base = Path(tempfile.mkdtemp(prefix="pyqmail-privs-"))
    base.chmod(0o755)
    s = Site(
        base,
        smtpd_user=Ident(smtpd_uid, queue_gid, (queue_gid, auth_gid)),
        send_user=Ident(send_uid, queue_gid, (queue_gid,)),
    )
    control = base / "control"
    control.mkdir(mode=0o755)
    files = {
        "me": "mx.test\n",
        "locals": "mx.test\n",
        "rcpthosts": "mx.test\n",
        # every remote domain to a port nobody listens on: remote mail stays queued
        "smtproutes": f":127.0.0.1:{_closed_port()}\n",
    }
    for name, text in files.items():
        (control / name).write_text(text)
        (control / name).chmod(0o644)
    cert = control / "servercert.pem"  # qmail-tls: owner qmaild, 0400
    cert.write_bytes(pki.server.key_pem + pki.server.cert_pem + pki.ca.cert_pem)
    cert.chmod(0o400)
    os.chown(cert, smtpd_uid, queue_gid)
    relay_auth = control / "smtproutes-auth"  # the role: pyqmails:root 0400
    relay_auth.write_text("127.0.0.1:relayuser:relay-secret\n")
    relay_auth.chmod(0o400)
    os.chown(relay_auth, send_uid, 0)
    users = control / "smtpusers"  # the role: root:pyqmaila 0640
    user = authdb.User("alice@mx.test", authdb.hash_password(PASSWORD), None)
    users.write_text(authdb.format_line(user) + "\n")
    users.chmod(0o640)
    os.chown(users, 0, auth_gid)
    for sub in ("alias", "users"):
        (base / sub).mkdir(mode=0o755)
    home = base / "homes" / "alice"
    (home / "Maildir").mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (home / "Maildir" / sub).mkdir()
    (base / "homes").chmod(0o755)
    chown_tree(home, send_uid, queue_gid)  # the mailboxes role: pyqmails, 0700
    for path in [home, *home.rglob("*")]:
        path.chmod(0o700)
    (base / "users" / "mailboxes").write_text(f"alice:{home}\n")
    s.queue.create()
    chown_tree(base / "queue", send_uid, queue_gid)  # the control role: pyqmails:pyqmail
    (base / "smtpd").mkdir(mode=0o700)  # the control role: the shared AUTH failure state
    os.chown(base / "smtpd", smtpd_uid, queue_gid)
    (base / "auth").mkdir()  # the control role: the login locks IMAP shares, root:pyqmaila
    os.chown(base / "auth", 0, auth_gid)
    (base / "auth").chmod(0o2770)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(base, ignore_errors=True)


def _denied(who: Ident, ops: list[tuple[str, Path | str, Path | str]]) -> list[str]:
    """Probe as ``who``, counting each attempt as an attack variant of the class."""
    tally.tried("privileges (queue, secrets)", len(ops))
    return probe(who, ops)


def _smtps(d: Daemon, pki: PKI) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL(d.host, d.port, timeout=15, context=client_context(pki))


def test_smtpd_cannot_read_the_queue_and_delivery_cannot_read_the_hashes(
    site: Site, pki: PKI
) -> None:
    d = site.start_smtpd()
    site.start_send()
    # smtpd verifies AUTH (it is in the verifiers' group): a wrong password fails, the right
    # one works, and mail goes through the queue to a Maildir and to the (dead) remote route.
    with _smtps(d, pki) as s:
        s.ehlo("laptop.test")
        wrong = base64.b64encode(b"\0alice@mx.test\0wrong").decode()
        assert s.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
    with _smtps(d, pki) as s:
        s.ehlo("laptop.test")
        s.login("alice@mx.test", PASSWORD)
        s.sendmail("alice@mx.test", ["alice@mx.test"], MSG % b"local")
        s.sendmail("alice@mx.test", ["far@remote.test"], MSG % b"remote")
    site.sendmail("-f", "root@mx.test", "far2@remote.test", subject=b"injected")
    site.sendmail("-f", "far3@remote.test", "nosuch@mx.test", subject=b"bounced")
    maildir = Path(site.root / "homes" / "alice" / "Maildir" / "new")
    wait_for(lambda: len(os.listdir(maildir)) == 1, what="local delivery")
    wait_for(lambda: site.log().count("result=deferred") >= 3, what="three deferrals")
    assert site.queue.ids("new") == []

    # What waits in mess/: one message of each writer, with the modes each writer gives
    smtpd, send = site.smtpd_user, site.send_user
    owners: dict[str, tuple[int, int]] = {}
    for name, stored in messages(site.queue, "mess"):
        st = os.stat(site.q("mess", name))
        kind = (
            "bounce"
            if stored.env.sender == ""
            else "injected"
            if "injected_by_uid" in stored.env.meta
            else "smtpd"
        )
        owners[kind] = (st.st_uid, stat.S_IMODE(st.st_mode))
    assert owners == {
        "smtpd": (smtpd.uid, 0o640),  # pyqmail-send reads it through the group
        "injected": (send.uid, 0o600),  # root handed it to the queue's owner
        "bounce": (send.uid, 0o600),  # written by the owner
    }
    state_files = os.listdir(site.q("state"))
    assert len(state_files) == 3

    # A compromised pyqmail-smtpd: no listing anywhere, no picked-up message, no state
    ops: list[tuple[str, Path | str, Path | str]] = [
        ("list", site.q(sub), "") for sub in ("tmp", "mess", "state", "bad")
    ]
    ops += [("read", site.q("mess", n), "") for n in os.listdir(site.q("mess"))]
    ops += [("stat", site.q("mess", n), "") for n in os.listdir(site.q("mess"))]
    ops += [("read", site.q("state", n), "") for n in state_files]
    assert _denied(smtpd, ops) == ["EACCES"] * len(ops)

    # ... nor what waits in new/ for the next pickup, though it sees its name there
    site.stop_send()
    site.sendmail("-f", "root@mx.test", "far4@remote.test", subject=b"waiting")
    (waiting,) = site.queue.ids("new")
    entry = site.q("new", waiting)
    assert (os.stat(entry).st_uid, stat.S_IMODE(os.stat(entry).st_mode)) == (send.uid, 0o600)
    got = _denied(
        smtpd,
        [
            ("list", site.q("new"), ""),
            ("read", entry, ""),
            ("unlink", entry, ""),  # sticky new/: not someone else's file
            ("rename", entry, site.q("new", "x")),
            ("rename", entry, site.q("tmp", "x")),
        ],
    )
    assert got == ["ok", "EACCES", "EPERM", "EPERM", "EPERM"]
    assert entry.exists()

    # The delivery user never sees a password hash; the verifier does. The relays'
    # password is pyqmail-send's alone (it read it at start).
    control = site.root / "control"
    assert _denied(send, [("read", control / "smtpusers", "")]) == ["EACCES"]
    assert _denied(
        smtpd, [("read", control / "smtpusers", ""), ("read", control / "smtproutes-auth", "")]
    ) == ["ok", "EACCES"]
    # The login locks (which names were guessed) are the verifiers' alone, too.
    locks = site.root / "auth" / "accounts.sqlite"
    assert _denied(send, [("list", site.root / "auth", ""), ("read", locks, "")]) == [
        "EACCES",
        "EACCES",
    ]
    assert _denied(smtpd, [("write", locks, "")]) == ["ok"]

    # and pyqmail-send still picks up what waited, out of smtpd's reach again; a member of
    # the group may inject too (it cannot read the relays' password and needs not)
    site.start_send()
    member = Ident(spare_ids(1, start=62000)[0], send.gid, (send.gid,))
    injected = subprocess.run(
        daemon_command(
            member,
            "pyqmail.tools.sendmail",
            ["--root", str(site.root), "-f", "m@mx.test", "far5@remote.test"],
        ),
        input=MSG % b"member",
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert injected.returncode == 0, injected.stderr
    wait_for(lambda: not site.queue.ids("new"), what="pickup")
    wait_for(lambda: site.log().count("result=deferred") >= 5, what="two more deferrals")
    assert _denied(smtpd, [("read", site.q("mess", waiting), "")]) == ["EACCES"]
    assert "warning" not in site.log()


def test_an_upgraded_smtpd_starts_before_the_role_made_the_login_locks(
    site: Site, pki: PKI
) -> None:
    """An upgrade restarts pyqmail-smtpd before the pyqmail_control role has made <root>/auth
    (root's /var/qmail: the daemon cannot): it starts and warns, AUTH alone answers 454 and
    works once the role made the directory; a temporary refusal, never a password checked
    without the lock."""
    shutil.rmtree(site.root / "auth")
    d = site.start_smtpd()
    d.wait_for(r"warning text=\S+/auth/accounts\.sqlite:\\x20cannot\\x20open\\x20the\\x20login")
    with _smtps(d, pki) as s:
        s.ehlo("laptop.test")
        good = base64.b64encode(f"\0alice@mx.test\0{PASSWORD}".encode()).decode()
        assert s.docmd("AUTH", f"PLAIN {good}")[0] == 454
    (site.root / "auth").mkdir()  # what the role does next, in the same run
    os.chown(site.root / "auth", 0, site.smtpd_user.groups[1])
    (site.root / "auth").chmod(0o2770)
    with _smtps(d, pki) as s:
        s.ehlo("laptop.test")
        assert s.docmd("AUTH", f"PLAIN {good}")[0] == 235
