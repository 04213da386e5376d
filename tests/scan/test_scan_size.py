"""A message larger than a scanner takes, against a real clamd (``StreamMaxLength 1M``, on
its Unix socket as the role runs it, and over TCP) and a real rspamd (``max_message``
64 KiB): clamd's reason reaches the log instead of ``io:32``, and with ``clamdmaxsize`` /
``rspamdmaxsize`` such a message is not sent to that scanner at all: accepted, logged
``not_scanned=<scanner>:<size>><limit>``, where it used to get 451 on every retry until it
bounced. The safety property holds throughout: a scanner that did not answer never reads
as clean. The limits are compared with what the client sent, and the scanners as the role
configures them take the copy with our Received field and Authentication-Results on top: a
virus padded to ``databytes`` (= ``clamdmaxsize``) is found, where it was queued unscanned.
A message clamd cannot scan completely (a virus 16 zips deep, or behind 400 MiB of unpacked
zeros in a 600 KB message) is refused as such, where clamd answered ``OK`` and it was queued."""

from __future__ import annotations

import asyncio
import io
import smtplib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control import table
from pyqmail.scan import clamd, rspamd, stage
from pyqmail.scan.settings import ScanSettings, parse_address
from pyqmail.scan.wire import ScanError
from tests.dnsserver import DnsServer
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.scanners import EICAR, GTUBE, Clamd, Rspamd, clamd_limits, role_var, with_attachment

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
    # what the client sent decides, not the copy with our fields on top: both are asked
    grown = b"Received: from client.test\r\n" + b"Subject: x\r\n\r\n" + b"z" * 300
    both = asyncio.run(stage.run(settings, ENV, grown, sent=100))
    assert both.verdict.code == 451, both.verdict
    assert "scan_error=rspamd:refused,clamd:refused" in both.verdict.log
    over = asyncio.run(stage.run(settings, ENV, grown, sent=201))
    assert "not_scanned=rspamd:201>100,clamd:201>200" in over.verdict.log


def test_the_roles_headroom_is_the_daemons() -> None:
    """The role's scanners take what the daemon's defaults leave room for."""
    assert role_var("pyqmail_scanners__headroom") == table.SCANNER_HEADROOM
    assert table.RSPAMDMAXSIZE.value + table.SCANNER_HEADROOM == 52_428_800  # rspamd's own
    assert table.CLAMDMAXSIZE.value + table.SCANNER_HEADROOM == 104_857_600  # clamd's own


@pytest.mark.parametrize(("timeout", "limit"), [(20, 120000), (110, 120000), (300, 310000)])
def test_clamds_time_limit_stays_above_scantimeout(timeout: int, limit: int) -> None:
    """clamd stopped by its own MaxScanTime answers Heuristics.Limits.Exceeded.MaxScanTime, a
    refusal for good; a slow scan must be the listeners' timeout instead (451, tried again):
    clamd's limit is its default, 120 s, or 10 s above ``scantimeout`` (at most 300 s)."""
    assert f"\nMaxScanTime {limit}\n" in clamd_limits(LIMIT, timeout)


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


# A scanner as the role configures it for a limit of databytes (1 MiB): its control file says
# 1 MiB, the scanner itself takes the role's headroom more (our Received field and
# Authentication-Results ride on what the client sent).
DATABYTES = 1024 * 1024


def exactly(message: bytes, size: int) -> bytes:
    """``message`` padded with lines of text to ``size`` bytes (what the client sends)."""
    rest = size - len(message)
    assert rest >= 80, rest
    lines, tail = divmod(rest - 80, 78)
    return message + (b"y" * 76 + b"\r\n") * lines + b"y" * (tail + 78) + b"\r\n"


@pytest.fixture(scope="module")
def role_clamd() -> Iterator[Clamd]:
    with Clamd(limits=clamd_limits(DATABYTES)) as server:
        yield server


@pytest.fixture(scope="module")
def role_rspamd() -> Iterator[Rspamd]:
    with Rspamd(max_size=DATABYTES) as server:
        yield server


def test_a_virus_padded_to_databytes_is_found(
    qmail_root: QmailRoot, mailbox: Path, smtpd: StartDaemon, role_clamd: Clamd
) -> None:
    """clamdmaxsize = databytes, and a client sends an EICAR attachment padded to just
    under databytes: clamd is asked, and the virus refused. The copy clamd got was larger
    than clamdmaxsize (our Received field on top); that was compared with the limit, and the
    message passed as ``not_scanned=clamd:1048693>1048576``, queued."""
    del mailbox
    qmail_root.control("clamd", f"{role_clamd.socket}\n")
    qmail_root.control("clamdmaxsize", f"{DATABYTES}\n")
    qmail_root.control("databytes", f"{DATABYTES}\n")
    d = smtpd()
    padded = exactly(with_attachment(EICAR), DATABYTES - 2)
    assert len(padded) == 1_048_574
    code, text = send(d.port, padded)
    line = d.wait_for(r"(?:refused|msg) .* scan=")[0].string
    assert (code, text) == (554, b"5.7.1 virus found: Eicar-Test-Signature.UNOFFICIAL"), line
    assert " scan=refuse virus=Eicar-Test-Signature.UNOFFICIAL " in line, line
    assert qmail_root.queued() == []
    code, _ = send(d.port, exactly(b"Subject: clean\r\n\r\n", DATABYTES - 2))
    assert code == 250  # clean at the limit: scanned (virus=clean), not refused
    d.wait_for(r"msg qid=\S+ .*scan=accept virus=clean ")
    assert "not_scanned" not in "".join(d.lines)


@pytest.fixture(scope="module")
def empty_dns() -> Iterator[DnsServer]:
    """A DNS server that knows the sender's domains, without SPF, DKIM or DMARC records."""
    with DnsServer({"client.test.": "@ A 127.0.0.1\n"}) as server:
        yield server


def signatures(count: int) -> bytes:
    """``count`` DKIM-Signature fields, each one more result in our Authentication-Results."""
    field = b"DKIM-Signature: v=1; a=rsa-sha256; d=client.test; s=s%d; h=from; bh=AA==; b=AA==\r\n"
    return b"".join(field % i for i in range(count))


@pytest.mark.usefixtures("mailbox")
def test_results_a_sender_lengthens_stay_within_the_scanners_headroom(
    qmail_root: QmailRoot,
    smtpd: StartDaemon,
    role_clamd: Clamd,
    role_rspamd: Rspamd,
    empty_dns: DnsServer,
) -> None:
    """With the inbound checks on, a sender adds 900 DKIM-Signature fields (a result each in
    our Authentication-Results, some 40 KB) to a message padded to databytes: each scanner
    is asked, as the role configures it (rspamd's max_message, clamd's StreamMaxLength and
    MaxFileSize the headroom above the control files), and refuses GTUBE and EICAR. (The
    log line, cut after the 900 DKIM results, cannot show it.)"""
    qmail_root.control("authchecks", "1\n")
    qmail_root.control("dnsresolver", f"{empty_dns.host}@{empty_dns.port}\n")
    qmail_root.control("rspamd", f"{role_rspamd.address}\n")
    qmail_root.control("clamd", f"{role_clamd.socket}\n")
    qmail_root.control("rspamdmaxsize", f"{DATABYTES}\n")
    qmail_root.control("clamdmaxsize", f"{DATABYTES}\n")
    qmail_root.control("databytes", f"{DATABYTES}\n")
    d = smtpd()
    head = signatures(900) + b"From: <alice@client.test>\r\nSubject: offer\r\n"
    spam = exactly(  # GTUBE in a text part of its own: rspamd looks for it in small ones
        head + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain\r\n\r\n" + GTUBE + b"\r\n--b1--\r\n",
        DATABYTES - 2,
    )
    assert send(d.port, spam) == (554, b"5.7.1 message refused as spam")
    virus = exactly(head + with_attachment(EICAR).split(b"Subject: notes\r\n", 1)[1], DATABYTES - 2)
    code, text = send(d.port, virus)
    assert (code, text) == (554, b"5.7.1 virus found: Eicar-Test-Signature.UNOFFICIAL")
    d.wait_for(r"refused .*error=5\.7\.1\\x20virus\\x20found", timeout=5)
    assert qmail_root.queued() == []


def nested_zip(depth: int, inner: bytes) -> bytes:
    """``inner`` in a zip in a zip ... ``depth`` zips deep."""
    data, name = inner, "notes.com"
    for level in range(depth):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(name, data)
        data, name = out.getvalue(), f"level{level}.zip"
    return data


@pytest.fixture(scope="module")
def behind_zeros() -> bytes:
    """A zip of 215 files of 2,000,000 zero bytes (each under the role's MaxFileSize) and
    then EICAR: 430 MB unpacked, over the role's MaxScanSize (400 MiB), in a 600 KB message."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(215):
            archive.writestr(f"zeros{i}.bin", bytes(2_000_000))
        archive.writestr("notes.com", EICAR)
    return out.getvalue()


def test_clamd_as_the_role_runs_it_says_where_it_stopped(
    role_clamd: Clamd, behind_zeros: bytes
) -> None:
    """clamd with the role's limits (its own MaxRecursion, 17) finds EICAR 14 zips deep;
    deeper, or behind more unpacked data than its MaxScanSize, it stops scanning, and says so
    (``AlertExceedsMax``) where it answered ``stream: OK``."""
    address = parse_address(str(role_clamd.socket), "test")

    def scan(payload: bytes) -> str | None:
        return asyncio.run(clamd.scan(address, with_attachment(payload)))

    assert scan(nested_zip(14, EICAR)) == "Eicar-Test-Signature.UNOFFICIAL"
    assert scan(nested_zip(16, EICAR)) == "Heuristics.Limits.Exceeded.MaxRecursion"
    assert scan(behind_zeros) == "Heuristics.Limits.Exceeded.MaxScanSize"
    assert scan(nested_zip(3, b"just text\r\n")) is None


@pytest.mark.usefixtures("mailbox")
def test_a_message_clamd_cannot_scan_completely_is_refused_as_such(
    qmail_root: QmailRoot, smtpd: StartDaemon, role_clamd: Clamd, behind_zeros: bytes
) -> None:
    """Through pyqmail-smtpd: 554 for good (the same message exceeds the same limit on every
    retry), with a reply and a log line that name the limit and do not call it a virus; a
    clean zip in zips is accepted."""
    qmail_root.control("clamd", f"{role_clamd.socket}\n")
    d = smtpd()
    for payload, limit in ((nested_zip(16, EICAR), "MaxRecursion"), (behind_zeros, "MaxScanSize")):
        code, text = send(d.port, with_attachment(payload))
        line = d.wait_for(rf"refused .* scan=refuse scan_limit=clamd:{limit} ")[0].string
        expected = f"5.7.1 message could not be scanned completely ({limit} exceeded)"
        assert (code, text) == (554, expected.encode()), line
        assert "virus" not in line, line
    assert qmail_root.queued() == []
    assert send(d.port, with_attachment(nested_zip(3, b"just text\r\n")))[0] == 250
    d.wait_for(r"msg qid=\S+ .*scan=accept virus=clean ")
    assert len(qmail_root.queued()) == 1
