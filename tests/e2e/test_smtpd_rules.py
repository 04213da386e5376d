"""Per-client policy from a tcprules cdb, applied the way tcpserver applies it."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import MESSAGE, client_context


def test_relayclient_rule_allows_relaying(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    cdb = qmail_root.rules('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    d = smtpd(rules_cdb=cdb)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        assert s.sendmail("app@mx.test", ["far@elsewhere.test"], MESSAGE) == {}
    [(env, _)] = qmail_root.queued()
    assert env.recipients == ("far@elsewhere.test",)


def test_rule_for_other_network_does_not_relay(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    cdb = qmail_root.rules('10.1.2.:allow,RELAYCLIENT=""\n:allow\n')
    d = smtpd(rules_cdb=cdb)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("app@mx.test")
        assert s.rcpt("far@elsewhere.test")[0] == 553


def test_deny_rule_closes_at_once_and_logs(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    cdb = qmail_root.rules("127.:deny\n:allow\n")
    d = smtpd(rules_cdb=cdb)
    c = d.connect()
    assert c.is_closed(5), "a denied client must be dropped without a greeting"
    assert c.buf == b""
    d.wait_for(r"deny ip=127\.0\.0\.1 port=\d+ rule=127\.")


def test_rules_change_takes_effect_without_restart(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    cdb = qmail_root.rules(":allow\n")
    d = smtpd(rules_cdb=cdb)
    c = d.connect()
    assert c.reply()[0] == 220
    c.close()
    qmail_root.rules("127.0.0.1:deny\n")
    c = d.connect()
    assert c.is_closed(5)
    d.wait_for(r"deny ip=127\.0\.0\.1 .*rule=127\.0\.0\.1")


def test_smtpauth_rule_turns_auth_on_for_port_25(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users({"alice@mx.test": "pw-alice-123"})
    cdb = qmail_root.rules('127.0.0.1:allow,SMTPAUTH="1",FORCETLS="1"\n')
    d = smtpd(rules_cdb=cdb)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth"), "FORCETLS=1: no AUTH before STARTTLS"
        s.starttls(context=client_context(pki))
        s.ehlo("client.test")
        assert s.has_extn("auth")
        s.login("alice@mx.test", "pw-alice-123")
        assert s.sendmail("alice@mx.test", ["far@elsewhere.test"], MESSAGE) == {}


def test_smtpauth_zero_turns_auth_off_for_submission(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users({"alice@mx.test": "pw-alice-123"})
    cdb = qmail_root.rules('127.0.0.1:allow,SMTPAUTH="0"\n')
    d = smtpd(mode="submission", rules_cdb=cdb)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.starttls(context=client_context(pki))
        s.ehlo("client.test")
        assert not s.has_extn("auth")


@pytest.mark.parametrize(
    ("env", "accepted"),
    [("", False), ('BARELF="1"', True)],
)
def test_barelf_rule(qmail_root: QmailRoot, smtpd: StartDaemon, env: str, accepted: bool) -> None:
    cdb = qmail_root.rules(f"127.0.0.1:allow{',' + env if env else ''}\n")
    d = smtpd(rules_cdb=cdb)
    c = d.connect()
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd("RCPT TO:<user@example.test>")
    assert c.cmd("DATA")[0] == 354
    code, lines = c.cmd("Subject: lf\r\n\r\nline one\nline two\r\n.")
    if accepted:
        assert code == 250, lines
        [(_, body)] = qmail_root.queued()
        assert body.endswith(b"line one\r\nline two\r\n"), "bare LF must be stored as CRLF"
    else:
        assert code == 550, lines
        assert qmail_root.queued() == []


def test_databytes_and_maxrcpt_rules(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    cdb = qmail_root.rules('127.0.0.1:allow,DATABYTES="2000",MAXRCPT="2"\n')
    d = smtpd(rules_cdb=cdb)
    c = d.connect()
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<s@remote.test> SIZE=5000")[0] == 552
    assert c.cmd("MAIL FROM:<s@remote.test> SIZE=500")[0] == 250
    assert c.cmd("RCPT TO:<a@example.test>")[0] == 250
    assert c.cmd("RCPT TO:<b@example.test>")[0] == 250
    assert c.cmd("RCPT TO:<c@example.test>")[0] == 452
    assert c.cmd("DATA")[0] == 354
    code, _ = c.cmd("Subject: big\r\n\r\n" + "x" * 3000 + "\r\n.")
    assert code == 552
    assert qmail_root.queued() == []
    assert qmail_root.tmp_files() == []
