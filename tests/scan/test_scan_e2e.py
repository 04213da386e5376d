"""The scanning stage through a real pyqmail-smtpd against the real rspamd and clamd
(``tests/scanners.py``): GTUBE refused with 554, EICAR refused when clamd is on, a clean
message queued with rspamd's header fields, rspamd's "add header" landing in ``.Junk/new``,
a scanner stopped with ``svc -d`` giving 451 and nothing queued, a scanner that hangs
giving 451 within ``scantimeout``, garbage giving 451 (logged, the session goes on), and
who is scanned per client through the tcprules environment (``SCAN``)."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.send.local import LocalDelivery
from tests.e2e.conftest import DROP_USER, IS_ROOT, Daemon, QmailRoot, StartDaemon, smtpd_command
from tests.e2e.helpers import wait_for
from tests.scanners import (
    EICAR,
    GTUBE,
    GTUBE_ADD_HEADER,
    Clamd,
    FakeScanner,
    Rspamd,
    with_attachment,
)

RCPT = "u@mx.test"


def message(body: bytes, subject: str = "lunch") -> bytes:
    return (
        b"From: Alice <alice@client.test>\r\nTo: <u@mx.test>\r\nSubject: "
        + subject.encode()
        + b"\r\nMessage-ID: <1@client.test>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n\r\n"
        + body
        + b"\r\n"
    )


def send(d: Daemon, data: bytes, sender: str = "alice@client.test") -> tuple[int, bytes]:
    with smtplib.SMTP(d.host, d.port, timeout=60) as s:
        s.ehlo("client.test")
        s.mail(sender)
        s.rcpt(RCPT)
        return s.data(data)


@pytest.fixture
def mailbox(qmail_root: QmailRoot) -> Path:
    """``u@mx.test`` exists (users/mailboxes), so RCPT takes it and local delivery finds it."""
    home = qmail_root.path / "homes" / "u"
    home.mkdir(parents=True)
    (qmail_root.path / "alias").mkdir(exist_ok=True)
    qmail_root.write("users/mailboxes", f"u:{home}\n")
    return home


@pytest.fixture
def rspamd_on(qmail_root: QmailRoot, rspamd_server: Rspamd, mailbox: Path) -> QmailRoot:
    qmail_root.control("rspamd", f"{rspamd_server.address}\n")
    return qmail_root


def test_gtube_is_refused_with_554_and_nothing_queued(
    rspamd_on: QmailRoot, smtpd: StartDaemon
) -> None:
    d = smtpd()
    code, text = send(d, message(GTUBE))
    assert code == 554, text
    assert text.startswith(b"5.7.1 "), text
    assert rspamd_on.queued() == []
    assert rspamd_on.tmp_files() == []
    d.wait_for(r"refused ip=127\.0\.0\.1 .*scan=refuse spam=reject spam_score=15\.00/15\.00")
    d.wait_for(r"refused .*scan_secs=\d+\.\d{3}")


def test_clean_message_is_queued_with_rspamds_fields(
    rspamd_on: QmailRoot, smtpd: StartDaemon
) -> None:
    d = smtpd()
    forged = b"X-Spam-Status: No, score=-100\r\nX-Spam: No\r\n"
    code, _ = send(d, forged + message(b"Hi Bob, lunch tomorrow at noon?"))
    assert code == 250
    [(env, body)] = rspamd_on.queued()
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("X-Spam"), head
    assert "X-Spamd-Result: default: False [" in head, head
    assert head.count("X-Spam-Status:") == 1, head  # the forged one is gone
    assert "score=-100" not in head and "X-Spam: No" not in head, head
    for line in head.split("\r\n"):  # every field folded with CRLF + white space
        assert line and (":" in line or line[0] in " \t"), line
    assert "junk" not in env.meta
    d.wait_for(r"msg qid=\S+ .*scan=accept spam=no_action spam_score=[-\d.]+/15\.00 .*scan_secs=")


def test_add_header_action_lands_in_junk(
    rspamd_on: QmailRoot, smtpd: StartDaemon, mailbox: Path
) -> None:
    d = smtpd()
    forged = b"X-Spam: No\r\nX-Spam-Status: No, score=-100\r\n"
    code, _ = send(d, forged + message(GTUBE_ADD_HEADER, "offer"))
    assert code == 250
    [(env, body)] = rspamd_on.queued()
    assert env.meta.get("junk") == "1"
    # rspamd skips its rules for a test pattern and sends no fields: pyqmail's own say why.
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("X-Spam: Yes\r\nX-Spam-Status: Yes, score=6.00, required=15.00,"
                           " action=add_header\r\n"), head  # fmt: skip
    assert "X-Spam: No" not in head and "score=-100" not in head, head
    d.wait_for(r"msg qid=\S+ .*scan=junk spam=add_header")
    local = LocalDelivery(Control.load(rspamd_on.path), rspamd_on.queue)
    assert local.deliver(env, body, RCPT).kind == "ok"
    [delivered] = [p for p in mailbox.rglob("*") if p.is_file()]
    assert delivered.parent == mailbox / "Maildir" / ".Junk" / "new", delivered


@pytest.mark.parametrize("where", ["socket", "tcp"])
def test_eicar_is_refused_when_clamd_is_on(
    rspamd_on: QmailRoot, smtpd: StartDaemon, clamd_server: Clamd, where: str
) -> None:
    address = clamd_server.socket if where == "socket" else f"127.0.0.1:{clamd_server.port}"
    rspamd_on.control("clamd", f"{address}\n")
    d = smtpd()
    code, text = send(d, with_attachment(EICAR))
    assert code == 554, text
    assert text == b"5.7.1 virus found: Eicar-Test-Signature.UNOFFICIAL", text
    assert rspamd_on.queued() == []
    d.wait_for(r"refused .*scan=refuse .*virus=Eicar-Test-Signature\.UNOFFICIAL")
    assert send(d, with_attachment(b"just a text file\n"))[0] == 250
    d.wait_for(r"msg qid=\S+ .*scan=(accept|junk) .*virus=clean")


def test_eicar_passes_while_clamd_is_off(rspamd_on: QmailRoot, smtpd: StartDaemon) -> None:
    """ClamAV is opt-in: without control/clamd only rspamd is asked."""
    d = smtpd()
    assert send(d, with_attachment(EICAR))[0] == 250
    line = d.wait_for(r"msg qid=\S+ .*scan=")[0].string
    assert "virus=" not in line, line


def _svstat_down(service: Path) -> bool:
    done = subprocess.run(["svstat", str(service)], check=False, capture_output=True, text=True)
    return ": down " in done.stdout


@pytest.fixture
def supervised_rspamd() -> Iterator[tuple[Rspamd, Path]]:
    """rspamd under daemontools' supervise, as the role runs it (``svc -d`` stops it)."""
    r = Rspamd()
    r._configure()  # the same configuration, started by supervise instead
    service = r.dir / "service"
    service.mkdir()
    run = service / "run"
    run.write_text("#!/bin/sh\nexec 2>&1\nexec " + " ".join(r.command()) + "\n")
    run.chmod(0o755)
    with (r.dir / "supervise.log").open("wb") as out:
        sup = subprocess.Popen(["supervise", str(service)], stdout=out, stderr=out)
    try:
        wait_for(lambda: _accepts(r.port), 60, "supervised rspamd answers")
        yield r, service
    finally:
        subprocess.run(["svc", "-dx", str(service)], check=False)
        try:
            sup.wait(20)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait(5)
        r.__exit__(None, None, None)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def test_scanner_stopped_with_svc_d_gives_451_and_nothing_queued(
    qmail_root: QmailRoot, smtpd: StartDaemon, mailbox: Path, supervised_rspamd
) -> None:
    r, service = supervised_rspamd
    qmail_root.control("rspamd", f"{r.address}\n")
    d = smtpd()
    assert send(d, message(b"before"))[0] == 250
    subprocess.run(["svc", "-d", str(service)], check=True)
    wait_for(lambda: _svstat_down(service) and not _accepts(r.port), 20, "rspamd down")
    code, text = send(d, message(b"while it is down"))
    assert code == 451, text
    assert text.startswith(b"4.7.1 "), text
    assert len(qmail_root.queued()) == 1
    assert qmail_root.tmp_files() == []
    d.wait_for(r"refused .*scan=defer .*scan_error=rspamd:refused")
    subprocess.run(["svc", "-u", str(service)], check=True)
    wait_for(lambda: _accepts(r.port), 60, "rspamd back")
    assert send(d, message(b"after"))[0] == 250


@pytest.fixture
def fake_scanner() -> Iterator[type[FakeScanner]]:
    made: list[FakeScanner] = []

    def make(reply: bytes | None) -> FakeScanner:
        made.append(FakeScanner(reply))
        return made[-1]

    yield make  # type: ignore[misc]
    for server in made:
        server.close()


def test_a_hanging_scanner_gives_451_within_the_time_bound(
    qmail_root: QmailRoot, smtpd: StartDaemon, mailbox: Path, fake_scanner
) -> None:
    hang = fake_scanner(None)
    qmail_root.control("rspamd", f"127.0.0.1:{hang.port}\n")
    qmail_root.control("scantimeout", "2\n")
    d = smtpd()
    started = time.monotonic()
    code, text = send(d, message(b"anyone there?"))
    took = time.monotonic() - started
    assert code == 451, text
    assert 2 <= took < 4, took
    assert qmail_root.queued() == []
    d.wait_for(r"refused .*scan=defer scan_error=rspamd:timeout scan_secs=2\.\d{3}")


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nnot json", "not-json"),
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "not-http"),
        (b"HTTP/1.1 500 Internal\r\nContent-Length: 2\r\n\r\n{}", "http-500"),
        (b'HTTP/1.1 200 OK\r\n\r\n{"action": "x", "score": 1, "required_score": 2}', "no-action"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "head-too-long"),
        (b"", "eof"),
    ],
)  # fmt: skip
def test_garbage_gives_451_logged_and_the_session_goes_on(
    qmail_root: QmailRoot,
    smtpd: StartDaemon,
    mailbox: Path,
    fake_scanner,
    *,
    reply: bytes,
    why: str,
) -> None:
    bad = fake_scanner(reply)
    qmail_root.control("rspamd", f"127.0.0.1:{bad.port}\n")
    d = smtpd()
    with smtplib.SMTP(d.host, d.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        s.rcpt(RCPT)
        code, text = s.data(message(b"hello"))
        assert (code, text[:6]) == (451, b"4.7.1 "), text
        assert s.noop()[0] == 250  # the session goes on
    assert qmail_root.queued() == []
    d.wait_for(rf"refused .*scan=defer scan_error=rspamd:{why} ")


def test_scantempfail_0_accepts_unscanned_and_logs_it(
    qmail_root: QmailRoot, smtpd: StartDaemon, mailbox: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: refused
    qmail_root.control("rspamd", f"127.0.0.1:{dead}\n")
    qmail_root.control("scantempfail", "0\n")
    d = smtpd()
    assert send(d, message(GTUBE))[0] == 250
    d.wait_for(r"msg qid=\S+ .*scan=accept scan_error=rspamd:refused")


@pytest.mark.parametrize(
    ("rule", "scanclients", "code"),
    [
        ('127.0.0.1:allow,SCAN=""', None, 250),  # this client is never scanned
        ('127.0.0.1:allow,RELAYCLIENT=""', None, 250),  # relay clients: not by default
        ('127.0.0.1:allow,RELAYCLIENT=""', "inbound\nrelay\n", 554),  # ... unless listed
        ('127.0.0.1:allow,RELAYCLIENT="",SCAN="1"', None, 554),  # ... or their rule says so
        (":allow", "relay\n", 250),  # inbound not listed: not scanned
    ],
)
def test_who_is_scanned_per_client_and_listener(
    rspamd_on: QmailRoot, smtpd: StartDaemon, rule: str, scanclients: str | None, code: int
) -> None:
    if scanclients is not None:
        rspamd_on.control("scanclients", scanclients)
    d = smtpd(rules_cdb=rspamd_on.rules(rule + "\n"))
    assert send(d, message(GTUBE))[0] == code


def _check(root: QmailRoot) -> subprocess.CompletedProcess[str]:
    argv = [*smtpd_command(), "--root", str(root.path), "--check", "--mode", "smtp"]
    if IS_ROOT:
        argv += ["--user", DROP_USER]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_check_names_the_scanners_and_a_bad_file(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    """pyqmail-smtpd --check (what the role's reload handler runs) shows the scanners; a bad
    scanning file stops both --check and the daemon with the same line naming it."""
    qmail_root.control("rspamd", "127.0.0.1:11333\n")
    good = _check(qmail_root)
    assert good.returncode == 0, good.stderr
    assert "rspamd 127.0.0.1:11333, clamd off" in good.stdout
    qmail_root.control("rspamdactions", "reject=bounce\n")
    bad = _check(qmail_root)
    assert bad.returncode == 111
    wanted = f"{qmail_root.path}/control/rspamdactions:1: 'bounce' is not a reply"
    assert wanted in bad.stderr, bad.stderr
    d = smtpd(expect_ready=False)
    assert d.wait_exit() != 0
    assert wanted in d.output


@pytest.mark.parametrize("with_rspamd", [False, True], ids=["clamd alone", "clamd and rspamd"])
def test_a_large_message_is_scanned_from_its_tmp_file(
    qmail_root: QmailRoot,
    smtpd: StartDaemon,
    mailbox: Path,
    clamd_server: Clamd,
    rspamd_server: Rspamd,
    *,
    with_rspamd: bool,
) -> None:
    """Past the 64 KiB held in memory the message streams to its tmp file; the scanners read
    it back, a virus in it is refused, and a clean one is queued whole (with rspamd's fields
    on top when rspamd is asked, as it was written when only clamd is)."""
    qmail_root.control("clamd", f"{clamd_server.socket}\n")
    if with_rspamd:
        qmail_root.control("rspamd", f"{rspamd_server.address}\n")
    d = smtpd()
    filler = b"".join(
        b"line %05d of a long report, nothing to see here\r\n" % i for i in range(4000)
    )
    infected = with_attachment(EICAR).replace(b"see attached\r\n", b"see attached\r\n" + filler)
    assert len(infected) > 150_000
    assert send(d, infected)[0] == 554
    clean = message(filler)
    assert send(d, clean)[0] == 250
    [(_, queued)] = qmail_root.queued()
    assert queued.endswith(filler + b"\r\n")
    assert queued.startswith(b"X-Spam") == with_rspamd, queued[:200]
    assert qmail_root.tmp_files() == []
