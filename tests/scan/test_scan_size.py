"""A message larger than a scanner takes, against a real clamd (``StreamMaxLength 1M``, on
its Unix socket as the role runs it, and over TCP) and a real rspamd (``max_message``
64 KiB): clamd's reason reaches the log instead of ``io:32``, and with ``clamdmaxsize`` /
``rspamdmaxsize`` such a message is not sent to that scanner at all: accepted, logged
``not_scanned=<scanner>:<size>><limit>``, where it used to get 451 on every retry until it
bounced. The safety property holds throughout: a scanner that did not answer never reads
as clean."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.scan import clamd, rspamd, stage
from pyqmail.scan.settings import ScanSettings, parse_address
from pyqmail.scan.wire import ScanError
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.scanners import EICAR, GTUBE, Clamd, Rspamd, with_attachment

LIMIT = 1024 * 1024  # clamd's StreamMaxLength 1M
RSPAMD_LIMIT = 65536
ENV = rspamd.Envelope("127.0.0.1", "client.test", "a@client.test", ("u@mx.test",))


def big(size: int, head: bytes = b"Subject: big\r\n\r\n") -> bytes:
    return head + (b"y" * 76 + b"\r\n") * (size // 78 + 1)


@pytest.fixture(scope="module")
def small_clamd() -> Iterator[Clamd]:
    with Clamd(stream_max="1M") as server:
        yield server


@pytest.fixture(scope="module")
def small_rspamd() -> Iterator[Rspamd]:
    with Rspamd(options=f"max_message = {RSPAMD_LIMIT};\n") as server:
        yield server


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_clamd_says_why_it_stopped_reading(small_clamd: Clamd, where: str) -> None:
    """clamd answers 'INSTREAM size limit exceeded. ERROR' and closes; the write that
    follows fails (EPIPE on the Unix socket), and the reply is read all the same."""
    text = str(small_clamd.socket) if where == "unix" else f"127.0.0.1:{small_clamd.port}"
    with pytest.raises(ScanError, match=r"^error:INSTREAM-size-limit-exceeded"):
        asyncio.run(clamd.scan(parse_address(text, "test"), big(4 * LIMIT)))
    assert asyncio.run(clamd.scan(parse_address(text, "test"), big(LIMIT // 2))) is None


def test_rspamd_resets_above_its_max_message(small_rspamd: Rspamd) -> None:
    """What rspamdmaxsize is for: rspamd drops the connection of a larger message."""
    address = parse_address(small_rspamd.address, "test")
    with pytest.raises(ScanError):
        asyncio.run(rspamd.check(address, ENV, big(4 * RSPAMD_LIMIT)))
    assert asyncio.run(rspamd.check(address, ENV, big(RSPAMD_LIMIT // 2))).action


def test_over_a_limit_the_scanner_is_not_asked() -> None:
    """Neither scanner is reachable here: asked, either would be a 451."""
    nowhere = parse_address("127.0.0.1:1", "test")
    settings = ScanSettings(rspamd=nowhere, clamd=nowhere, rspamd_max=100, clamd_max=200)
    outcome = asyncio.run(stage.run(settings, ENV, b"Subject: x\r\n\r\n" + b"z" * 300))
    assert outcome.verdict.action == "accept", outcome.verdict
    assert "not_scanned=rspamd:314>100,clamd:314>200" in outcome.verdict.log
    assert "virus=" not in outcome.verdict.log and "scan_error" not in outcome.verdict.log
    half = asyncio.run(stage.run(settings, ENV, b"Subject: x\r\n\r\n" + b"z" * 150))
    assert half.verdict.code == 451, half.verdict  # rspamd over, clamd asked (and down)
    assert "not_scanned=rspamd:164>100" in half.verdict.log
    assert "scan_error=clamd:refused" in half.verdict.log


def send(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        s.rcpt("u@mx.test")
        return s.data(data)


@pytest.fixture
def mailbox(qmail_root: QmailRoot) -> Path:
    home = qmail_root.path / "homes" / "u"
    home.mkdir(parents=True)
    qmail_root.write("users/mailboxes", f"u:{home}\n")
    return home


def test_clamd_over_its_limit_through_the_daemon(
    qmail_root: QmailRoot, mailbox: Path, smtpd: StartDaemon, small_clamd: Clamd
) -> None:
    """Without clamdmaxsize (its default is the role's StreamMaxLength, 100 MiB) a larger
    message gets 451 and clamd's reason in the log; with it, the message is accepted
    unscanned and logged; a small virus is still refused."""
    del mailbox
    qmail_root.control("clamd", f"{small_clamd.socket}\n")
    d = smtpd()
    code, _ = send(d.port, big(2 * LIMIT))
    assert code == 451
    d.wait_for(r"refused .*scan_error=clamd:error:INSTREAM-size-limit-exceeded")
    assert qmail_root.queued() == []
    d.stop()
    qmail_root.control("clamdmaxsize", f"{LIMIT}\n")
    d = smtpd()
    padded = with_attachment(EICAR) + big(2 * LIMIT, b"")
    assert send(d.port, padded)[0] == 250
    d.wait_for(rf"msg qid=\S+ .*scan=accept not_scanned=clamd:\d+>{LIMIT} ")
    assert len(qmail_root.queued()) == 1
    code, text = send(d.port, with_attachment(EICAR))
    assert code == 554, text


def test_rspamd_over_its_limit_through_the_daemon(
    qmail_root: QmailRoot, mailbox: Path, smtpd: StartDaemon, small_rspamd: Rspamd
) -> None:
    del mailbox
    qmail_root.control("rspamd", f"{small_rspamd.address}\n")
    qmail_root.control("rspamdmaxsize", f"{RSPAMD_LIMIT}\n")
    d = smtpd()
    assert send(d.port, big(2 * RSPAMD_LIMIT))[0] == 250
    d.wait_for(rf"msg qid=\S+ .*scan=accept not_scanned=rspamd:\d+>{RSPAMD_LIMIT} ")
    code, text = send(d.port, b"Subject: small\r\n\r\n" + GTUBE + b"\r\n")
    assert code == 554, text
