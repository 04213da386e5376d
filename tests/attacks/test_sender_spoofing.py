"""An authenticated user tries to send as someone else (issue 16: a leaked password or a
rogue user of the submission port). Every variant goes through one smtplib session against a
real pyqmail-smtpd; each must be refused (553 at MAIL, 550 at the end of DATA) and nothing
queued, while the same session's honest message afterwards still gets through."""

from __future__ import annotations

import smtplib

import pytest

from tests.attacks.tally import tried
from tests.conftest import PKI
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

LOGIN, PASSWORD = "alice@mx.test", "alice-pw-123"
OWN = "alice@mx.test"

# Header sections (CRLF) whose From a receiver would show as someone else's, or cannot read.
FROM_TRICKS: dict[str, bytes] = {
    "second From field": b"From: alice@mx.test\r\nFrom: ceo@bank.example\r\n",
    "From field name in lower case": b"from: ceo@bank.example\r\n",
    "blank before the colon": b"From : ceo@bank.example\r\n",
    "folded address": b"From: Alice\r\n <ceo@bank.example>\r\n",
    "address-like display name": b"From: alice@mx.test <ceo@bank.example>\r\n",
    "owned address in a comment": b"From: ceo@bank.example (alice@mx.test)\r\n",
    "two addresses": b"From: alice@mx.test, ceo@bank.example\r\n",
    "group with a foreign member": b"From: team: alice@mx.test, ceo@bank.example;\r\n",
    "unterminated angle": b"From: <alice@mx.test\r\n",
    "two angle addresses": b"From: <alice@mx.test> <ceo@bank.example>\r\n",
    "source route": b"From: <@mx.test:ceo@bank.example>\r\n",
    "nested comments": b"From: " + b"(" * 5000 + b"x" + b")" * 5000 + b" ceo@bank.example\r\n",
    "unclosed comment": b"From: alice@mx.test (ceo@bank.example\r\n",
    "quoted local part of another": b'From: "ceo"@bank.example\r\n',
    "encoded-word address": b"From: =?utf-8?q?ceo=40bank.example?=\r\n",
    "empty group": b"From: undisclosed-recipients:;\r\n",
    "long From": b"From: " + b"Alice " * 1000 + b"<alice@mx.test>\r\n",
    "From after 100 KiB of header": b"X-Pad: " + b"p" * 110_000 + b"\r\nFrom: ceo@bank.example\r\n",
    "invalid UTF-8 in the domain": b"From: alice@mx.te\xffst\r\n",
}
# Envelope senders that are not hers, however written.
MAIL_TRICKS = [
    "ceo@bank.example",
    "bob@mx.test",
    "alice@mx.test.evil.example",
    "alice@evil.example",
    "alice@sub.mx.test",
    "alice@mx.test.",  # the core refuses its syntax first: 501
    "postmaster@mx.test",
]


@pytest.fixture
def daemon_port(qmail_root: QmailRoot, smtpd: StartDaemon) -> tuple[str, int]:
    qmail_root.users({LOGIN: PASSWORD})
    qmail_root.write("users/senders", f"{LOGIN}: {OWN} alice@example.test\n")
    d = smtpd(mode="smtps")
    return d.host, d.port


def test_header_from_tricks_are_refused(
    daemon_port: tuple[str, int], qmail_root: QmailRoot, pki: PKI
) -> None:
    host, port = daemon_port
    outcomes: dict[str, int] = {}
    with smtplib.SMTP_SSL(host, port, timeout=30, context=client_context(pki)) as s:
        s.login(LOGIN, PASSWORD)
        for name, head in FROM_TRICKS.items():
            try:
                s.sendmail(OWN, ["friend@elsewhere.test"], head + b"Subject: x\r\n\r\nbody\r\n")
                outcomes[name] = 250
            except smtplib.SMTPDataError as exc:
                outcomes[name] = exc.smtp_code
            tried("sender-header-from")
        s.sendmail(OWN, ["friend@elsewhere.test"], b"From: Alice <alice@mx.test>\r\n\r\nhi\r\n")
    assert outcomes == dict.fromkeys(FROM_TRICKS, 550)
    assert len(qmail_root.queued()) == 1
    assert qmail_root.tmp_files() == []


def test_envelope_sender_tricks_are_refused(
    daemon_port: tuple[str, int], qmail_root: QmailRoot, pki: PKI
) -> None:
    host, port = daemon_port
    codes = {}
    with smtplib.SMTP_SSL(host, port, timeout=30, context=client_context(pki)) as s:
        s.login(LOGIN, PASSWORD)
        for sender in MAIL_TRICKS:
            codes[sender] = s.mail(sender)[0]
            s.rset()
            tried("sender-envelope")
        s.sendmail(OWN, ["friend@elsewhere.test"], b"From: alice@mx.test\r\n\r\nhi\r\n")
    assert codes == {**dict.fromkeys(MAIL_TRICKS, 553), "alice@mx.test.": 501}
    assert len(qmail_root.queued()) == 1
