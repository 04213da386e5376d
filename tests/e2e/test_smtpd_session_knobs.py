"""Port 465 is submission, the AUTH login stays out of Received, the greeting says ESMTP once.

Issue 14 items 5 and 6 and the doubled greeting, against a running pyqmail-smtpd. The attack
variants of the same classes live in tests/attacks/test_session_limits.py.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

OUTSIDE = "127.0.0.9"  # no rule matches it: an ordinary client from the Internet
USERS = {"alice@mx.test": "correct horse battery"}
MESSAGE = b"From: alice@mx.test\r\nSubject: knobs\r\n\r\nbody\r\n"


def smtps_client(port: int, pki: PKI, cert_dir: Path | None = None) -> smtplib.SMTP_SSL:
    ctx = client_context(pki, pki.client, cert_dir) if cert_dir else client_context(pki)
    return smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=ctx, source_address=(OUTSIDE, 0))


def test_465_needs_auth_for_local_mail_from_outside(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users(USERS)
    d = smtpd(mode="smtps")
    with smtps_client(d.port, pki) as s:
        s.ehlo("outside.test")
        code, text = s.mail("")
        assert (code, text[:5]) == (530, b"5.7.0"), text
        code, _ = s.rcpt("admin@mx.test")
        assert code == 503  # no transaction: the RCPT goes nowhere
        s.login("alice@mx.test", USERS["alice@mx.test"])
        assert s.mail("")[0] == 250
        assert s.rcpt("admin@mx.test")[0] == 250
        assert s.data(MESSAGE)[0] == 250
    [(env, _)] = qmail_root.queued()
    assert env.meta["auth"] == "alice@mx.test"


def test_465_relay_rule_or_certificate_needs_no_auth(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, tmp_path: Path
) -> None:
    """As on 587: RELAYCLIENT, or a listed client certificate, stands in for AUTH."""
    qmail_root.users(USERS)
    qmail_root.control("clientca.pem", pki.ca.cert_pem)
    qmail_root.control("tlsclients", "relay.test\n")
    d = smtpd(mode="smtps", rules_cdb=qmail_root.rules(f'{OUTSIDE}:allow,RELAYCLIENT=""\n'))
    with smtps_client(d.port, pki) as s:
        s.ehlo("relay-rule.test")
        assert s.mail("")[0] == 250
        assert s.rcpt("admin@mx.test")[0] == 250
    d2 = smtpd(mode="smtps")
    with smtps_client(d2.port, pki, tmp_path) as s:
        s.ehlo("relay.test")
        assert s.mail("app@relay.test")[0] == 250
        assert s.rcpt("admin@mx.test")[0] == 250


@pytest.mark.parametrize(("setting", "named"), [(None, False), ("0\n", False), ("1\n", True)])
def test_received_names_the_login_only_with_authheader(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, setting: str | None, named: bool
) -> None:
    qmail_root.users(USERS)
    if setting is not None:
        qmail_root.control("authheader", setting)
    d = smtpd(mode="smtps")
    with smtps_client(d.port, pki) as s:
        s.login("alice@mx.test", USERS["alice@mx.test"])
        s.sendmail("alice@mx.test", ["friend@elsewhere.test"], b"Subject: x\r\n\r\nx\r\n")
    [(env, body)] = qmail_root.queued()
    received = body.split(b"\r\n\r\n", 1)[0].split(b"\r\nSubject:")[0].decode()
    assert ("alice@mx.test" in received) is named, received
    assert "with ESMTPSA;" in received
    assert env.meta["auth"] == "alice@mx.test"  # the envelope and the log still know


def test_bad_authheader_is_refused_at_start(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("authheader", "yes\n")
    d = smtpd(expect_ready=False)
    assert d.wait_exit() == 111
    assert "control/authheader:1: not a non-negative integer: 'yes'" in d.output


@pytest.mark.parametrize(
    ("greeting", "line"),
    [(None, "220 mx.test ESMTP"), ("mail.example.test here\n", "220 mail.example.test here ESMTP")],
)
def test_greeting_says_esmtp_once(
    qmail_root: QmailRoot, smtpd: StartDaemon, greeting: str | None, line: str
) -> None:
    if greeting is not None:
        qmail_root.control("smtpgreeting", greeting)
    d = smtpd()
    c = d.connect()
    code, text = c.reply()
    assert (code, text) == (220, [line])
