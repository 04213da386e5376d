"""DKIM signing end to end: pyqmail-smtpd and pyqmail-sendmail queue, pyqmail-send signs.

Real processes: pyqmail-smtpd (AUTH over TLS, a relay client by its tcprules, an
unauthenticated client), pyqmail-sendmail, pyqmail-send with ``control/dkimkeys`` (an RSA
and an Ed25519 key of example.test), and ``Recorder`` (tests/e2e/test_send.py), an SMTP
server on loopback that keeps the bytes it accepted. The public keys are served by a real
knotd (``tests.dnsserver``); dkimpy and OpenDKIM check what arrived
(``tests.dkim_util``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyqmail.queue.state import Signed, signatures
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from tests.conftest import PKI
from tests.dkim_util import (
    KeyPair,
    dkimpy_verify,
    make_keys,
    one_signature,
    opendkim_verify,
    zone,
)
from tests.dkim_util import signatures as header_signatures
from tests.dnsserver import DnsServer
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context, wait_for
from tests.e2e.test_send import BIN, USER, Host, Recorder
from tests.queue_util import commit

DOMAIN = "example.test"


@dataclass
class Signing:
    keys: list[KeyPair]
    dns: DnsServer
    workdir: Path
    next_keys: list[KeyPair]

    @property
    def dkimkeys(self) -> str:
        return "".join(k.line + "\n" for k in self.keys)

    def assert_signed(self, data: bytes, keys: list[KeyPair] | None = None) -> None:
        """Two DKIM-Signature fields on top, each of ``keys`` (default: the current ones),
        and both pass dkimpy and OpenDKIM."""
        keys = keys or self.keys
        sigs = header_signatures(data)
        assert len(sigs) == len(keys), data[:2000]
        assert data.startswith(b"".join(sigs))
        for index, key in enumerate(keys):
            assert f"s={key.selector};".encode() in sigs[index]
            assert dkimpy_verify(data, index, self.dns.host, self.dns.port), key.algorithm
            report = opendkim_verify(
                one_signature(data, index),
                [DOMAIN],
                self.dns.host,
                self.dns.port,
                self.workdir / f"opendkim-{index}",
            )
            assert f"s={key.selector}" in report and report.endswith("succeeded"), report


@pytest.fixture
def signing() -> Iterator[Signing]:
    """Keys a and b of example.test, all four published (b: a rotation's next keys). The
    key files are where pyqmail-send's user reads them (as 0640 root:pyqmails on a host)."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-dkim-"))
    base.chmod(0o755)
    keydir = base / DOMAIN
    keys_a = make_keys(keydir, DOMAIN, "a")
    keys_b = make_keys(keydir, DOMAIN, "b")
    keydir.chmod(0o750)
    if IS_ROOT:
        pw = pwd.getpwnam(DROP_USER)
        for path in [keydir, *keydir.iterdir()]:
            os.chown(path, 0, pw.pw_gid)
    try:
        with DnsServer({f"{DOMAIN}.": zone(keys_a + keys_b)}) as dns:
            yield Signing(keys_a, dns, base / "verify", keys_b)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    """The remote side: accepts everything (no TLS: not what is tested here)."""
    rec = Recorder()
    yield rec
    rec.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """pyqmail-send on a root of its own (tests/e2e/test_send.py's host): mx.test is local."""
    root = tmp_path / "qmail"
    for sub in ("control", "alias", "users"):
        (root / sub).mkdir(parents=True)
    Queue(root / "queue").create()
    h = Host(root)
    h.control("me", "mx.test\n")
    h.control("locals", "mx.test\n")
    (root / "users" / "mailboxes").write_text("# name:homedir\n")
    yield h
    h.stop()


def message(subject: str, author: str = f"alice@{DOMAIN}") -> bytes:
    return (
        f"From: Alice <{author}>\r\nTo: friend@remote.test\r\nSubject: {subject}\r\n"
        f"Date: Wed, 02 Dec 2026 06:00:00 +0000\r\nMessage-ID: <{subject}@{DOMAIN}>\r\n\r\n"
        "Hello,\r\n  with  some   blanks \r\n\r\n"
    ).encode()


def accepted(recorder: Recorder, subject: str) -> bytes:
    found = [d for _, _, d in recorder.accepted if f"Subject: {subject}".encode() in d]
    assert len(found) == 1, [d[:300] for _, _, d in recorder.accepted]
    return found[0]


# -- submitted through pyqmail-smtpd ------------------------------------------------------


def _send_host(qmail_root: QmailRoot, recorder: Recorder, signing: Signing) -> Host:
    """pyqmail-send on pyqmail-smtpd's root: mx.test is local, example.test (in rcpthosts,
    not local) is relayed as a backup MX would, everything remote goes to the recorder."""
    qmail_root.control("locals", "mx.test\n")
    qmail_root.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    qmail_root.control("dkimkeys", signing.dkimkeys)
    home = qmail_root.path / "homes" / "user"
    home.mkdir(parents=True)
    qmail_root._own(home.parent)
    qmail_root._own(home)
    qmail_root.write("users/mailboxes", f"user:{home}\n")
    qmail_root.write("alias/.keep", "")
    return Host(qmail_root.path, user=DROP_USER if IS_ROOT else USER)


def test_auth_and_relay_client_mail_is_signed_inbound_and_backup_mx_mail_is_not(
    qmail_root: QmailRoot,
    smtpd: StartDaemon,
    pki: PKI,
    recorder: Recorder,
    signing: Signing,
) -> None:
    qmail_root.users({f"alice@{DOMAIN}": "pw-alice"})
    submission = smtpd(mode="smtps")
    relay = smtpd(mode="smtp", rules_cdb=qmail_root.rules('127.0.0.1:allow,RELAYCLIENT=""\n'))
    inbound = smtpd(mode="smtp")
    with smtplib.SMTP_SSL(
        submission.host, submission.port, timeout=10, context=client_context(pki)
    ) as s:
        s.login(f"alice@{DOMAIN}", "pw-alice")
        s.sendmail(f"alice@{DOMAIN}", ["friend@remote.test"], message("auth"))
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as s:
        s.sendmail(f"alice@{DOMAIN}", ["friend@remote.test"], message("relay"))
    with smtplib.SMTP(inbound.host, inbound.port, timeout=10) as s:
        s.sendmail(f"alice@{DOMAIN}", ["user@mx.test"], message("inbound"))
        s.sendmail(f"alice@{DOMAIN}", [f"bob@{DOMAIN}"], message("backup-mx"))
    origins = sorted(env.meta.get("origin", "-") for env, _ in qmail_root.queued())
    assert origins == ["-", "-", "auth", "relay"]
    host = _send_host(qmail_root, recorder, signing)
    try:
        host.start()
        wait_for(lambda: len(recorder.accepted) == 3, what="three remote deliveries")
        wait_for(lambda: host.maildir(qmail_root.path / "homes" / "user"), what="Maildir")
    finally:
        host.stop()
    signing.assert_signed(accepted(recorder, "auth"))
    signing.assert_signed(accepted(recorder, "relay"))
    assert b"DKIM-Signature" not in accepted(recorder, "backup-mx")
    [local] = host.maildir(qmail_root.path / "homes" / "user")
    assert b"Subject: inbound" in local and b"DKIM-Signature" not in local
    log = host.log()
    assert log.count("signed d=example.test s=sa-rsa,sa-ed") == 2
    assert "origin=auth" in log and "origin=relay" in log


# -- pyqmail-sendmail, bounces, retries ---------------------------------------------------


def test_sendmail_mail_is_signed_and_local_copies_carry_the_same_signature(
    host: Host, recorder: Recorder, signing: Signing
) -> None:
    host.control("locals", "mx.test\n")
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("dkimkeys", signing.dkimkeys)
    home = host.mailbox("user")
    host.start()
    done = host.sendmail(
        ["-f", f"alice@{DOMAIN}", "friend@remote.test", "user@mx.test"], message("sendmail")
    )
    assert done.returncode == 0, done.stderr
    wait_for(host.queue_empty, what="both deliveries")
    remote = accepted(recorder, "sendmail")
    signing.assert_signed(remote)
    [local] = host.maildir(home)
    assert local.replace(b"\n", b"\r\n").find(b"".join(header_signatures(remote))) > 0
    assert "origin=local" in host.log()


def test_long_lines_are_signed_as_sent_and_every_copy_verifies(
    host: Host, recorder: Recorder, signing: Signing
) -> None:
    """A cron job's one-line HTML (1,500 octets) under a To: of 1,200 octets, through
    pyqmail-sendmail: the remote copy (lines broken at 998 octets on the wire) and the
    Maildir copy carry the same bytes, and both verify."""
    host.control("locals", "mx.test\n")
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("dkimkeys", signing.dkimkeys)
    home = host.mailbox("user")
    host.start()
    to = ",".join(f"u{i:04d}@remote.test" for i in range(80)).encode()
    long = message("cron").replace(b"To: friend@remote.test", b"To: " + to)
    long = long.replace(b"Hello,", b"<html>" + b"<p>x</p>" * 186)
    done = host.sendmail(["-f", f"alice@{DOMAIN}", "friend@remote.test", "user@mx.test"], long)
    assert done.returncode == 0, done.stderr
    wait_for(host.queue_empty, what="both deliveries")
    remote = accepted(recorder, "cron")
    assert max(len(line) for line in remote.split(b"\r\n")) <= 998
    signing.assert_signed(remote)
    [local] = host.maildir(home)
    local = local.replace(b"\n", b"\r\n")
    assert local.endswith(remote)  # Return-Path and Delivered-To in front of the same bytes
    for index in range(len(signing.keys)):
        assert dkimpy_verify(local, index, signing.dns.host, signing.dns.port)


def test_bounce_from_a_signing_domain_is_signed(
    host: Host, recorder: Recorder, signing: Signing
) -> None:
    host.control("locals", "mx.test\n")
    host.control("bouncehost", f"{DOMAIN}\n")
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("dkimkeys", signing.dkimkeys)
    recorder.rcpt_reply["nobody@remote.test"] = "550 5.1.1 no such user"
    host.start()
    host.sendmail(["-f", f"alice@{DOMAIN}", "nobody@remote.test"], message("doomed"))
    wait_for(lambda: recorder.accepted, what="the bounce")
    wait_for(host.queue_empty)
    [(rcpt, sender, dsn)] = recorder.accepted
    assert (rcpt, sender) == (f"alice@{DOMAIN}", "")
    assert f"From: Mail Delivery System <MAILER-DAEMON@{DOMAIN}>".encode() in dsn
    signing.assert_signed(dsn)
    assert "origin=bounce" in host.log()


def test_a_retry_sends_the_recorded_signature_even_after_a_restart_and_a_key_change(
    host: Host, recorder: Recorder, signing: Signing
) -> None:
    """The first attempt is deferred; pyqmail-send restarts with other keys in dkimkeys; the
    retry carries the signature bytes recorded at pickup (old selectors), not new ones."""
    recorder.temp_first = 1
    host.control("locals", "mx.test\n")
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("dkimkeys", signing.dkimkeys)
    host.start()
    host.sendmail(["-f", f"alice@{DOMAIN}", "later@remote.test"], message("retry"))
    wait_for(lambda: "result=deferred" in host.log(), what="the first attempt")
    [queue_id] = host.queue.ids("mess")
    recorded = signatures(host.queue.path("state", queue_id))[queue_id]
    assert recorded.count(b"DKIM-Signature:") == 2
    host.stop()
    new_keys = signing.next_keys
    host.control("dkimkeys", "".join(k.line + "\n" for k in new_keys))
    host.start()
    wait_for(lambda: host.log().count("pyqmail-send started") == 2, what="the restart")
    tool = [BIN / "pyqmail-queue", "--root", str(host.root)]
    subprocess.run([*tool, "flush"], capture_output=True, check=True)
    wait_for(host.queue_empty, what="the retry")
    data = accepted(recorder, "retry")
    assert data.startswith(recorded)
    signing.assert_signed(data)  # the old keys, still published
    assert host.log().count("dkim msg") == 1  # signed at pickup, once
    sent = b"".join(header_signatures(data))
    assert all(f"s={k.selector};".encode() not in sent for k in new_keys)


def _segment(host: Host, parts: list[tuple[str, str | None]]) -> tuple[str, list[str]]:
    """One segment file in new/ as pyqmail-smtpd's group commit makes it: (recipient,
    origin) per message, every message from alice@example.test."""
    writers = []
    queue = host.queue
    for n, (rcpt, origin) in enumerate(parts):
        meta = {} if origin is None else {"origin": origin}
        w = QueueWriter(queue, f"alice@{DOMAIN}", [rcpt], meta, defer=True)
        w.write(message(f"seg{n}"))
        writers.append(w)
    commit(writers)
    (name,) = host.queue.ids("new")
    return name, [w.queue_id for w in writers]


def test_messages_of_a_segment_share_one_signature_file_and_keep_it_across_a_restart(
    host: Host, recorder: Recorder, signing: Signing
) -> None:
    recorder.temp_first = 1
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("dkimkeys", signing.dkimkeys)
    name, ids = _segment(
        host, [("a@remote.test", "auth"), ("b@remote.test", None), ("c@remote.test", "auth")]
    )
    host.start()
    wait_for(lambda: "result=deferred" in host.log(), what="one deferred delivery")
    recorded = signatures(host.queue.path("state", name))
    assert sorted(recorded) == sorted([ids[0], ids[2]])  # in state/<segment>, not state/<id>
    host.stop()
    host.start()
    wait_for(lambda: host.log().count("pyqmail-send started") == 2, what="the restart")
    tool = [BIN / "pyqmail-queue", "--root", str(host.root)]
    subprocess.run([*tool, "flush"], capture_output=True, check=True)
    wait_for(host.queue_empty, what="the segment to end")
    for n, queue_id in ((0, ids[0]), (2, ids[2])):
        data = accepted(recorder, f"seg{n}")
        assert data.startswith(recorded[queue_id])
        signing.assert_signed(data)
    assert b"DKIM-Signature" not in accepted(recorder, "seg1")
    assert host.log().count("dkim msg") == 2


def test_hup_loads_new_keys_and_keeps_the_old_ones_when_the_file_is_bad(
    host: Host, recorder: Recorder, signing: Signing
) -> None:
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    proc = host.start()
    host.sendmail(["-f", f"alice@{DOMAIN}", "a@remote.test"], message("before"))
    wait_for(host.queue_empty, what="the first message")
    host.control("dkimkeys", signing.dkimkeys)
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "HUP: control files reloaded" in host.log(), what="the reload")
    host.sendmail(["-f", f"alice@{DOMAIN}", "b@remote.test"], message("after"))
    wait_for(host.queue_empty, what="the second message")
    host.control("dkimkeys", signing.dkimkeys + f"{DOMAIN}:bad:rsa-sha256:relative.key\n")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the old control files" in host.log(), what="the refused reload")
    assert "dkimkeys:3: key file must be an absolute path" in host.log()
    host.sendmail(["-f", f"alice@{DOMAIN}", "c@remote.test"], message("kept"))
    wait_for(host.queue_empty, what="the third message")
    assert b"DKIM-Signature" not in accepted(recorder, "before")
    signing.assert_signed(accepted(recorder, "after"))
    signing.assert_signed(accepted(recorder, "kept"))
    host.stop()
    result = subprocess.run(
        [BIN / "pyqmail-send", "--root", str(host.root), "--user", host.user],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 111
    assert "dkimkeys:3: key file must be an absolute path, got 'relative.key'" in result.stderr


def test_signatures_of_a_pickup_that_never_completed_are_not_used(
    host: Host, recorder: Recorder, signing: Signing
) -> None:
    """A crash between writing the signatures and the rename into mess/ leaves the file in
    new/ and a state file for it: start-up removes that as an orphan, the pickup signs
    again (nothing was delivered), and the stale record is never sent."""
    host.control("smtproutes", f":127.0.0.1:{recorder.port}\n")
    host.control("dkimkeys", signing.dkimkeys)
    name, (queue_id,) = _segment(host, [("a@remote.test", "auth")])
    stale = Signed(queue_id, b"DKIM-Signature: v=1; stale\r\n")
    host.queue.path("state", name).write_bytes(json.dumps(stale.to_json()).encode() + b"\n")
    host.start()
    wait_for(host.queue_empty, what="the delivery")
    data = accepted(recorder, "seg0")
    assert b"stale" not in data
    signing.assert_signed(data)
