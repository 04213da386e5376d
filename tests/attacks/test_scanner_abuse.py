"""A hostile or broken scanner behind the scanning stage (issue 18, "Bad input").

pyqmail-smtpd trusts rspamd to be there, not to be well-behaved. A loopback server this test
runs plays rspamd and answers each request with one kind of abuse: header fields built to
inject a line or a body into the queued message, a reply larger than any real one, a
Content-Length announcing gigabytes, a reply trickled one byte at a time. Whatever it does,
nothing it sends becomes a header field of its own or part of the body, memory stays bounded
(the reply is refused past its limit), the client has its answer within ``scantimeout``
(plus a margin), and the daemon lives on.
"""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacks.tally import tried
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.scanners import FakeScanner

BODY = b"Hello,\r\nthe figures.\r\n"
MESSAGE = b"From: <a@client.test>\r\nTo: <u@mx.test>\r\nSubject: figures\r\n\r\n" + BODY


def http(body: bytes, head: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if b"Content-Length" not in head else b""
    return b"HTTP/1.1 200 OK\r\n" + head + length + b"\r\n" + body


def verdict(add_headers: dict[str, object]) -> bytes:
    reply = {"action": "no action", "score": 0.5, "required_score": 15,
             "milter": {"add_headers": add_headers}}  # fmt: skip
    return http(json.dumps(reply).encode())


@pytest.fixture
def fake() -> Iterator[list[FakeScanner]]:
    made: list[FakeScanner] = []
    yield made
    for server in made:
        server.close()


@pytest.fixture
def mailbox(qmail_root: QmailRoot) -> Path:
    home = qmail_root.path / "homes" / "u"
    home.mkdir(parents=True)
    qmail_root.write("users/mailboxes", f"u:{home}\n")
    return home


def send(host: str, port: int) -> tuple[int, bytes, float]:
    started = time.monotonic()
    with smtplib.SMTP(host, port, timeout=60) as s:
        s.ehlo("client.test")
        s.mail("a@client.test")
        s.rcpt("u@mx.test")
        code, text = s.data(MESSAGE)
        assert s.noop()[0] == 250  # the session goes on
    return code, text, time.monotonic() - started


INJECTIONS = {
    "empty line into the body": {"X-Spam-Status": "No\r\n\r\nInjected body line"},
    "a field of its own (LF)": {"X-Spam-Status": "No\nX-Injected: 1"},
    "a field of its own (CR LF)": {"X-Spam-Status": {"value": "No\r\nX-Injected: 1", "order": 0}},
    "NUL and escapes": {"X-Spam-Level": "***\x00\x1b[2J\r\n\tX-Injected: 1"},
}


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_header_fields_of_the_scanner_cannot_inject(
    qmail_root: QmailRoot, smtpd: StartDaemon, mailbox: Path, fake: list[FakeScanner], name: str
) -> None:
    fake.append(FakeScanner(verdict(INJECTIONS[name])))
    qmail_root.control("rspamd", f"127.0.0.1:{fake[0].port}\n")
    d = smtpd()
    tried("scanner header injection")
    code, _, _ = send(d.host, d.port)
    assert code == 250
    [(_, queued)] = qmail_root.queued()
    head, body = queued.split(b"\r\n\r\n", 1)
    assert body == BODY
    for line in head.split(b"\r\n"):
        assert not line.startswith(b"X-Injected"), head
        assert line and (b":" in line or line[:1] in (b" ", b"\t")), head
        assert b"\x00" not in line and b"\x1b" not in line, head


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (verdict({"X-A": "x" * (2 * 1024 * 1024)}), "reply-too-long"),
        (http(b"{}", b"Content-Length: 99999999999\r\n"), "reply-too-long"),
        (verdict({"Bad Name:": "x"}), "bad-header-name"),
        (verdict({f"X-{i}": "v" for i in range(100)}), "too-many-headers"),
    ],
    ids=["2 MiB of JSON", "announced 100 GB", "field name with a colon", "100 fields"],
)
def test_oversized_or_malformed_replies_are_refused_bounded(
    qmail_root: QmailRoot,
    smtpd: StartDaemon,
    mailbox: Path,
    fake: list[FakeScanner],
    *,
    reply: bytes,
    why: str,
) -> None:
    fake.append(FakeScanner(reply))
    qmail_root.control("rspamd", f"127.0.0.1:{fake[0].port}\n")
    d = smtpd()
    tried("scanner oversized reply")
    code, text, _ = send(d.host, d.port)
    assert (code, text[:6]) == (451, b"4.7.1 "), text
    assert qmail_root.queued() == []
    d.wait_for(rf"refused .*scan_error=rspamd:{why} ")


def test_a_trickling_scanner_is_cut_off_at_the_time_bound(
    qmail_root: QmailRoot, smtpd: StartDaemon, mailbox: Path, fake: list[FakeScanner]
) -> None:
    fake.append(FakeScanner(verdict({}), trickle=0.5))
    qmail_root.control("rspamd", f"127.0.0.1:{fake[0].port}\n")
    qmail_root.control("scantimeout", "2\n")
    d = smtpd()
    tried("scanner trickle")
    code, _, took = send(d.host, d.port)
    assert code == 451
    assert took < 4, took
    d.wait_for(r"refused .*scan_error=rspamd:timeout")
