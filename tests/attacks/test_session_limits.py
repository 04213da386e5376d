"""Session limits against a running daemon (issue 14: 465 without AUTH, junk commands, idle
time under load, talking before the greeting, HELO injection).

Classes: ``smtps-unauth-mail`` (MAIL on 465 before AUTH, from an outside address),
``junk-commands`` (NOOP/RSET/VRFY/... floods), ``idle-under-stress`` (idle connections while
the listener is busy), ``pregreet-talk-first`` (input before the 220), ``helo-injection``
(HELO/EHLO arguments built to forge or break the Received header).
"""

from __future__ import annotations

import time

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.conftest import PKI
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

OUTSIDE = "127.0.0.9"
ALICE, PW = "alice@mx.test", "s3cret-alice-pw"


def tls_wire(d: Daemon, pki: PKI, source: str = OUTSIDE) -> Wire:
    w = Wire(d.port, source=source)
    w.sock = client_context(pki).wrap_socket(w.sock, server_hostname="localhost")
    assert w.reply()[0] == 220
    return w


# ----- 465 is submission: no mail without AUTH (RFC 8314) -----------------------------------

UNAUTH_465 = [
    ["EHLO o.test", "MAIL FROM:<>"],
    ["EHLO o.test", "MAIL FROM:<admin@mx.test>"],
    ["EHLO o.test", "MAIL FROM:<x@elsewhere.test>"],
    ["EHLO o.test", "MAIL FROM:<> SIZE=100 BODY=8BITMIME"],
    ["HELO o.test", "MAIL FROM:<>"],
    ["EHLO o.test", "RSET", "MAIL FROM:<>"],
    ["EHLO o.test", "AUTH PLAIN AGFsaWNlQG14LnRlc3QAd3Jvbmc=", "MAIL FROM:<>"],
    ["EHLO o.test", "AUTH LOGIN", "*", "MAIL FROM:<>"],
    ["EHLO o.test", "MAIL FROM:<> AUTH=alice@mx.test"],
    ["EHLO o.test", "MAIL FROM:<> AUTH=<>"],
    ["EHLO o.test", "EHLO again.test", "MAIL FROM:<postmaster@mx.test>"],
]


@pytest.mark.parametrize("lines", UNAUTH_465, ids=[" / ".join(v[1:]) for v in UNAUTH_465])
def test_465_refuses_mail_before_auth(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI, lines: list[str]
) -> None:
    qmail_root.users({ALICE: PW})
    d = smtpd(mode="smtps")
    with tls_wire(d, pki) as w:
        for line in lines[:-1]:
            w.cmd(line)
        text = w.cmd(lines[-1])[1]
        assert text.startswith("530 5.7.0"), (lines, text)
        assert w.cmd("RCPT TO:<admin@mx.test>")[0] == 503
        assert w.cmd("DATA")[0] == 503
    tried("smtps-unauth-mail")
    assert qmail_root.queued() == []


# ----- junk commands ------------------------------------------------------------------------

JUNK = {
    "NOOP": ["NOOP"],
    "RSET": ["RSET"],
    "VRFY": ["VRFY postmaster"],
    "HELP": ["HELP"],
    "EXPN": ["EXPN staff"],
    "ETRN": ["ETRN mx.test"],
    "EHLO": ["EHLO again.test"],
    "mixed": ["NOOP", "RSET", "VRFY x", "HELP", "EHLO x.test"],
    "RCPT dup": ["RCPT TO:<admin@mx.test>"],
}


def test_junk_command_floods_end_with_421(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    """maxjunk=5, maxerrors=3: the 9th junk command at the latest gets 421, whatever the mix."""
    qmail_root.control("maxjunk", "5\n")
    qmail_root.control("maxerrors", "3\n")
    d = smtpd()
    for name, cycle in JUNK.items():
        with Wire(d.port, source=OUTSIDE) as w:
            assert w.reply()[0] == 220
            assert w.cmd("EHLO flood.test")[0] == 250
            if name == "RCPT dup":
                w.cmd("MAIL FROM:<>")
                w.cmd("RCPT TO:<admin@mx.test>")
            replies = []
            for i in range(2000):
                code, text = w.cmd(cycle[i % len(cycle)])
                replies.append(code)
                if code in (0, 421):
                    break
            assert replies[-1] == 421, (name, replies[-5:])
            assert len(replies) <= 5 + 3 + 1, (name, len(replies))
            assert "too many errors" in text
            assert w.closed_within(3)
        tried("junk-commands")
    # EXPN and ETRN (502) are errors anyway: those sessions end before the junk limit
    d.wait_for(r"junk-limit ip=127\.0\.0\.9 text=more\\x20than\\x205", count=len(JUNK) - 2)


def test_junk_count_restarts_with_each_message(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("maxjunk", "5\n")
    qmail_root.control("maxerrors", "3\n")
    d = smtpd()
    with Wire(d.port, source=OUTSIDE) as w:
        assert w.reply()[0] == 220
        w.cmd("EHLO sender.test")
        for n in range(3):
            for _ in range(5):
                assert w.cmd("NOOP")[0] == 250
            w.cmd("MAIL FROM:<>")
            w.cmd("RCPT TO:<admin@mx.test>")
            w.cmd("DATA")
            assert w.cmd(f"Subject: {n}\r\n\r\nx\r\n.")[0] == 250
        assert w.cmd("QUIT")[0] == 221
    assert len(qmail_root.queued()) == 3
    assert "junk-limit" not in d.output


# ----- idle time under stress --------------------------------------------------------------


def test_idle_timeout_is_short_under_stress_across_workers(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """maxconn=4, stresspercent=50: two connections (in any worker) make the listener
    stressed, and an idle client then has timeoutstress=1 s instead of timeoutsmtpd=30 s."""
    for name, value in [("maxconn", 4), ("stresspercent", 50), ("timeoutstress", 1)]:
        qmail_root.control(name, f"{value}\n")
    qmail_root.control("timeoutsmtpd", "30\n")
    d = smtpd(workers=2)
    a = Wire(d.port, source=OUTSIDE)
    assert a.reply()[0] == 220
    assert a.quiet(2.5), "dropped while the listener was not stressed"
    b = Wire(d.port, source=OUTSIDE)
    start = time.monotonic()
    assert b.reply()[0] == 220
    assert b.reply()[1].startswith("421 4.4.2"), "no timeout under stress"
    took = time.monotonic() - start
    assert 0.5 < took < 5, took
    assert b.closed_within(3)
    b.close()
    tried("idle-under-stress")
    # alone again: a's next command gets the normal timeout back
    time.sleep(0.3)
    assert a.cmd("NOOP")[0] == 250
    assert a.quiet(2.5)
    c = Wire(d.port, source=OUTSIDE)
    assert c.reply()[0] == 220
    assert a.cmd("NOOP")[0] == 250  # a talks while the listener is stressed: 1 s from now
    assert a.reply()[1].startswith("421 4.4.2")
    tried("idle-under-stress")
    for w in (a, c):
        w.close()
    d.wait_for(r"timeout ip=127\.0\.0\.9 .*phase=idle", count=2)


# ----- talking before the greeting -----------------------------------------------------------

PREGREET = [
    b"EHLO bot.example\r\n",
    b"HELO bot.example\r\n",
    b"QUIT\r\n",
    b"\r\n",
    b"x",
    b"EHLO bot\r\nMAIL FROM:<spam@bot.example>\r\nRCPT TO:<admin@mx.test>\r\nDATA\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello on port 25
    b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n",
]


def test_clients_that_talk_first_are_dropped(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("greetdelay", "2\n")
    d = smtpd()
    for data in PREGREET:
        with Wire(d.port, source=OUTSIDE) as w:
            w.send(data)
            replies = w.until_eof(5)
            assert replies == [(554, "554 5.5.0 Error: SMTP protocol synchronization")], data
        tried("pregreet-talk-first")
    with Wire(d.port, source=OUTSIDE) as w:  # the halfway talker
        time.sleep(1)
        w.send(b"EHLO impatient.example\r\n")
        assert w.until_eof(5) == [(554, "554 5.5.0 Error: SMTP protocol synchronization")]
    tried("pregreet-talk-first")
    d.wait_for(r"pregreet ip=127\.0\.0\.9 port=\d+ bytes=\d+ after=\d", count=len(PREGREET) + 1)
    assert qmail_root.queued() == []


def test_patient_and_relay_clients_are_greeted(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("greetdelay", "2\n")
    d = smtpd(rules_cdb=qmail_root.rules('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'))
    with Wire(d.port, source=OUTSIDE) as w:
        start = time.monotonic()
        assert w.reply()[0] == 220
        assert time.monotonic() - start > 1.8
        assert w.cmd("EHLO patient.example")[0] == 250
    with Wire(d.port, source="127.0.0.1") as w:  # RELAYCLIENT: no pause
        start = time.monotonic()
        assert w.reply()[0] == 220
        assert time.monotonic() - start < 1.0
    sub = smtpd(mode="submission")  # only port 25 pauses
    with Wire(sub.port, source=OUTSIDE) as w:
        start = time.monotonic()
        assert w.reply()[0] == 220
        assert time.monotonic() - start < 1.0
    assert "pregreet" not in d.output


# ----- HELO injection ------------------------------------------------------------------------

HELO_ATTACKS = [
    b"evil)by(forged.mx.google.com;",
    b"x (forged.example [10.0.0.1])",
    b"mx.google.com)\tby(mx.google.com",
    b"a;by mx.google.com",
    b"<script>",
    b'"quoted.example"',
    b"host.example\\",
    b"a" * 300,
    b"a" * 64 + b".example",
    "hôte.example".encode(),
    b"\xff\xfe.example",
    b"[IPv6:fe80::1%eth0]",
    b"[10.0.0.1]by(x)",
    b"[tag:evil]",
    b"..",
    b"x\x7f",
    b"x\rReceived: from forged",
    b"x\x00y",
    b"x\x1b[31mred",
]


def test_helo_injection_never_reaches_received(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    d = smtpd()
    for arg in HELO_ATTACKS:
        with Wire(d.port, source=OUTSIDE) as w:  # one session each: refusals are errors
            assert w.reply()[0] == 220
            for verb in (b"HELO ", b"EHLO "):
                code, text = w.cmd(verb + arg)
                assert code in (500, 501), (arg, text)
                assert w.cmd("MAIL FROM:<>")[0] == 503, arg  # never greeted by that name
                tried("helo-injection")
    with Wire(d.port, source=OUTSIDE) as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO [IPv6:::1]")[0] == 250
        w.cmd("MAIL FROM:<>")
        w.cmd("RCPT TO:<admin@mx.test>")
        w.cmd("DATA")
        assert w.cmd("Subject: helo\r\n\r\nx\r\n.")[0] == 250
    [(_, body)] = qmail_root.queued()
    assert body.startswith(b"Received: from [IPv6:::1] (unknown [127.0.0.9])\r\n"), body[:80]
    d.wait_for(r"helo-refused ip=127\.0\.0\.9 text=", count=10)
