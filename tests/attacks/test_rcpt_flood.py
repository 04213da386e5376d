"""Endless RCPTs on one connection (s34 review item 1), against a running pyqmail-smtpd.

The reviewer's run: port 25 with greylisting, one connection sent 20,000 pipelined RCPTs in
2.5 s and got 20,000 x 451; the shared greylist database got 20,000 triplets (a write each,
on the event loop) and the log a line each. Now a deferred recipient takes a place under
``maxrcpt``, the RCPTs past it get 452 without greylisting being asked, and deferrals past
10 and 452s past 1000 count towards ``maxerrors``, which ends the session.
Class: ``rcpt-flood``.
"""

from __future__ import annotations

import sqlite3

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon

OUTSIDE = "127.0.0.9"  # no rule matches it: greylisted like any client from the Internet
GREY = 451


def triplets(root: QmailRoot) -> int:
    with sqlite3.connect(root.path / "smtpd" / "greylist.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM triplet").fetchone()[0])


def flood(d: Daemon, count: int, batch: int = 50) -> list[int]:
    """EHLO, MAIL, then ``count`` RCPTs pipelined ``batch`` at a time (each batch is read
    whole by the server, so its close is never a reset); the reply codes until EOF."""
    codes: list[int] = []
    with Wire(d.port, source=OUTSIDE) as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO flood.example")[0] == 250
        assert w.cmd("MAIL FROM:<bot@flood.example>")[0] == 250
        for start in range(0, count, batch):
            lines = range(start, min(start + batch, count))
            w.send(b"".join(b"RCPT TO:<alice-%d@mx.test>\r\n" % i for i in lines))
            tried("rcpt-flood", len(lines))
            for _ in lines:
                code, _text = w.reply()
                if code == 0:
                    return codes
                codes.append(code)
            if codes[-1] == 421:
                assert w.reply() == (0, "")  # and the server closed
                return codes
    return codes


def test_greylisted_rcpt_flood_ends_the_connection(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    qmail_root.control("greylistdelay", "60\n")
    d = smtpd()
    codes = flood(d, 20_000)
    assert codes == [GREY] * 20 + [421]
    assert triplets(qmail_root) == 20
    d.wait_for(r"refuse ip=127\.0\.0\.9 code=451 greylist=new", count=20)
    d.wait_for(r"defer-limit ip=127\.0\.0\.9 text=more\\x20than\\x2010\\x20deferred")
    assert d.output.count("greylist=new") == 20


def test_past_maxrcpt_greylisting_is_not_asked(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    qmail_root.control("greylistdelay", "60\n")
    qmail_root.control("maxrcpt", "5\n")
    qmail_root.control("maxerrors", "100\n")  # the deferrals alone do not end it here
    d = smtpd()
    codes = flood(d, 1200)
    assert codes[:5] == [GREY] * 5
    assert set(codes[5:-1]) == {452}
    assert codes[-1] == 421  # the 452s past 1000 counted as errors
    assert len(codes) == 5 + 1000 + 100 + 1
    assert triplets(qmail_root) == 5
    d.wait_for(r"rcpt-overshoot ip=127\.0\.0\.9 text=more\\x20than\\x201000\\x20RCPTs")
