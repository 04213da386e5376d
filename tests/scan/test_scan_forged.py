"""Forged scanner header fields on inbound mail, through a real pyqmail-smtpd and rspamd:
whatever the scan does (accepted, Junk, accepted unscanned with the scanner down), inbound
mail that is to be scanned is queued without a field of the families the scanning stage
writes (``X-Spam``, ``X-Spam-*``, ``X-Spamd-*``, ``X-Rspamd-*``); other fields stay. Mail
from a relay client (not inbound), or from a client exempt from scanning (``SCAN="0"``: a
backup MX whose upstream scanned it), is left as it came, and such a client's spilled
message is not read back into memory (``SpoolBudget.read_back``) only to look at its
header (the review: 32 MiB a worker, 451 after 120 s in line, for nothing)."""

from __future__ import annotations

import asyncio
import smtplib
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from pyqmail.protocol import MessageEnd, MessageStart
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.scan import stage
from pyqmail.scan.settings import Address, ScanSettings
from pyqmail.smtpd.intake import SPOOL_LIMIT, Intake, SpoolBudget
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.scanners import GTUBE_ADD_HEADER, Rspamd

FORGED = (
    b"X-Spam-Flag: NO\r\n"
    b"X-Spam-Level: (forged)\r\n"
    b"X-Spam: No\r\n"
    b"X-Spam-Status: No, score=-100\r\n"
    b"X-Spamd-Result: default: False [-100.00 / 15.00];\r\n\tFORGED(-100.00)[]\r\n"
    b"X-Rspamd-Server: forged.test\r\n"
    b"X-Virus-Scanned: by the sender\r\n"
    b"X-Spammer-Notes: not ours\r\n"
)
KEPT = ("X-Virus-Scanned: by the sender", "X-Spammer-Notes: not ours")


def message(body: bytes) -> bytes:
    return (
        FORGED + b"From: Alice <alice@client.test>\r\nTo: <u@mx.test>\r\nSubject: lunch\r\n"
        b"Message-ID: <1@client.test>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n\r\n"
        + body
        + b"\r\n"
    )


def send(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        s.rcpt("u@mx.test")
        return s.data(data)


def head(root: QmailRoot) -> str:
    [(_, body)] = root.queued()
    return body.split(b"\r\n\r\n", 1)[0].decode()


def assert_no_forgery(text: str) -> None:
    for forged in ("score=-100", "FORGED(", "forged.test", "(forged)", "X-Spam-Flag", "X-Spam: No"):
        assert forged not in text, (forged, text)
    for line in KEPT:
        assert line in text, text


@pytest.fixture
def inbound(qmail_root: QmailRoot, rspamd_server: Rspamd) -> QmailRoot:
    home = qmail_root.path / "homes" / "u"
    home.mkdir(parents=True)
    qmail_root.write("users/mailboxes", f"u:{home}\n")
    qmail_root.control("rspamd", f"{rspamd_server.address}\n")
    return qmail_root


def test_accepted_message(inbound: QmailRoot, smtpd: StartDaemon) -> None:
    d = smtpd()
    assert send(d.port, message(b"Hi Bob, lunch tomorrow at noon?"))[0] == 250
    text = head(inbound)
    assert_no_forgery(text)
    assert text.count("X-Spamd-Result:") == 1 and "default: False [" in text, text


def test_junk_without_rspamds_fields(inbound: QmailRoot, smtpd: StartDaemon) -> None:
    """rspamd skips its rules for a test pattern and asks to remove nothing."""
    d = smtpd()
    assert send(d.port, message(GTUBE_ADD_HEADER))[0] == 250
    text = head(inbound)
    assert_no_forgery(text)
    assert "X-Spamd-Result" not in text, text
    assert text.startswith("X-Spam: Yes\r\nX-Spam-Status: Yes, score="), text


def test_unscanned_with_the_scanner_down(inbound: QmailRoot, smtpd: StartDaemon) -> None:
    """To be scanned, accepted unscanned (scantempfail 0): a mail filter must not read the
    sender's X-Spam-Flag: NO as ours."""
    inbound.control("rspamd", "127.0.0.1:1\n")
    inbound.control("scantempfail", "0\n")
    d = smtpd()
    assert send(d.port, message(b"Hi Bob"))[0] == 250
    assert_no_forgery(head(inbound))


def test_a_client_exempt_from_scanning_keeps_its_fields(
    inbound: QmailRoot, smtpd: StartDaemon
) -> None:
    """SCAN="0": the admin exempted the client on purpose (a backup MX whose upstream
    scanned the mail); its X-Spam fields are the upstream's, and stay."""
    d = smtpd(rules_cdb=inbound.rules('127.0.0.1:allow,SCAN="0"\n'))
    assert send(d.port, message(b"Hi Bob"))[0] == 250
    assert head(inbound).startswith("Received: ")
    assert FORGED.decode() in head(inbound) + "\r\n"


def test_a_relay_clients_message_is_left_as_it_came(inbound: QmailRoot, smtpd: StartDaemon) -> None:
    d = smtpd(rules_cdb=inbound.rules('127.0.0.1:allow,RELAYCLIENT="",SCAN="0"\n'))
    assert send(d.port, message(b"Hi Bob"))[0] == 250
    assert head(inbound).startswith("Received: ")
    assert FORGED.decode() in head(inbound) + "\r\n"


def test_strip_ours_keeps_the_rest_and_the_object_when_nothing_is_ours() -> None:
    clean = b"Subject: x\r\nX-Spammer: y\r\n\r\nX-Spam: body line\r\n"
    assert stage.strip_ours(clean) is clean
    forged = b"x-SPAM-flag: NO\r\n\tcontinued\r\nSubject: x\r\nX-Spam: Yes\r\n\r\nX-Spam: b\r\n"
    assert stage.strip_ours(forged) == b"Subject: x\r\n\r\nX-Spam: b\r\n"


def test_strip_ours_reads_past_a_line_that_is_no_field() -> None:
    """A stray line (no colon, ``pyqmail.headers.raw_fields``) ends neither the field before
    it nor the header section: rspamd and Dovecot read the fields after it, so a forged one
    there goes too. The stray line stays with its continuation lines, unless a reader may
    name it as one of ours (a colon-less ``X-Spam`` line, its continuation lines its value
    for Dovecot)."""
    message = (
        b"X-Spam-Flag: NO\r\nno colon here\r\n continued\r\nSubject: x\r\nX-Spam: No\r\n"
        b"X-Spam\r\n (forged)\r\n\r\nX-Spam: body\r\n"
    )
    assert stage.strip_ours(message) == (
        b"no colon here\r\n continued\r\nSubject: x\r\n\r\nX-Spam: body\r\n"
    )


def test_strip_ours_leaves_the_body_of_a_message_without_header_section() -> None:
    """It starts with the empty line: its first paragraph is body, not fields to strip."""
    body_only = b"\r\nX-Spam: quoted in the body\r\n\r\nmore\r\n"
    assert stage.strip_ours(body_only) is body_only


def test_strip_ours_is_linear_in_a_senders_header() -> None:
    """It runs on the worker's event loop: a field with 400,000 continuation lines (1.6 MB,
    well within databytes) took seconds when each line was added to the field's bytes."""
    folded = b"Subject: x\r\n" + b" a\r\n" * 400_000
    for tail, removed in ((b"X-Spam: yes\r\n", 13), (b"X-Other: 1\r\n", 0)):
        message = folded + tail + b"\r\nbody\r\n"
        started = time.perf_counter()
        out = stage.strip_ours(message)
        took = time.perf_counter() - started
        assert len(message) - len(out) == removed
        assert took < 2.0, f"{took:.1f} s"


class CountingBudget(SpoolBudget):
    """The worker's budget, counting the spilled messages read back into memory."""

    def __init__(self) -> None:
        super().__init__()
        self.read_backs = 0

    def read_back(self, size: int, wait: float | None = None) -> AbstractAsyncContextManager[None]:
        self.read_backs += 1
        return super().read_back(size, wait)


class Spool:
    """The parts of a worker an intake uses; ``submit`` commits and keeps what was queued."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.budget = CountingBudget()
        self.checkpool: Any = None
        self.committed: list[bytes] = []

    def submit(self, writer: QueueWriter, done: Any, owner: object) -> None:
        env = writer.commit()  # the group commit's work, done here at once
        [stored] = self.queue.load("new", env.queue_id)
        self.committed.append(stored.body)

    async def remote_host(self, ip: str) -> str | None:
        return None


def _through_intake(tmp_path: Path, env: dict[str, str]) -> Spool:
    """One inbound message of 256 KiB (spilled: past SPOOL_LIMIT) through an intake whose
    rspamd is down (127.0.0.1:1; scantempfail 0 accepts unscanned), the client's tcprules
    environment ``env``."""
    queue = Queue(tmp_path / "queue")
    queue.create()
    spool = Spool(queue)
    scan = ScanSettings(rspamd=Address(host="127.0.0.1", port=1), timeout=5, tempfail=False)
    body = b"x" * 1000 + b"\r\n"
    data = message(body * (256 * 1024 // len(body)))
    assert len(data) > 3 * SPOOL_LIMIT

    async def run() -> None:
        intake = Intake(spool)  # type: ignore[arg-type]
        start = MessageStart(
            "alice@client.test", ("u@mx.test",), {}, "client.test", None, None, "ESMTP"
        )
        intake.start(start, "127.0.0.1", scan=(scan, env))
        for i in range(0, len(data), 8192):
            intake.data(data[i : i + 8192])
        intake.commit(MessageEnd(len(data), None, len(data)), lambda result: None)
        if intake.tasks:
            await asyncio.wait(set(intake.tasks), timeout=20)

    asyncio.run(run())
    return spool


def test_an_exempt_clients_spilled_message_is_not_read_back(tmp_path: Path) -> None:
    spool = _through_intake(tmp_path, {"SCAN": "0"})
    assert spool.budget.read_backs == 0
    [committed] = spool.committed
    assert committed.startswith(FORGED)  # as it came


def test_a_spilled_message_to_be_scanned_is_read_back_and_stripped(tmp_path: Path) -> None:
    """The scanner is down and scantempfail 0 accepts it: still stripped."""
    spool = _through_intake(tmp_path, {})
    assert spool.budget.read_backs == 1
    [committed] = spool.committed
    assert_no_forgery(committed.split(b"\r\n\r\n", 1)[0].decode())
