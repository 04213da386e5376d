"""Endless RCPTs on one connection (s34 review item 1), against a running pyqmail-smtpd.

The reviewer's run: port 25 with greylisting, one connection sent 20,000 pipelined RCPTs in
2.5 s and got 20,000 x 451; the shared greylist database got 20,000 triplets (a write each,
on the event loop) and the log a line each. Now a deferred recipient takes a place under
``maxrcpt``, and after 100 deferred RCPTs in a session every further RCPT gets 452 without
greylisting being asked; 452s past 1000 per transaction count towards ``maxerrors``, which
ends the session. Deferred RCPTs are no errors: the first fix made them errors past 10, and
a list message to more than 20 new recipients then got 421 before DATA on every attempt
(the review's second round), delivered to nobody.
Class: ``rcpt-flood``.
"""

from __future__ import annotations

import re
import sqlite3
import time

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon

OUTSIDE = "127.0.0.9"  # no rule matches it: greylisted like any client from the Internet
GREY = 451


def triplets(root: QmailRoot) -> int:
    with sqlite3.connect(root.path / "smtpd" / "greylist3.sqlite") as db:
        return sum(
            int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
            for table in ("pending", "passed")
        )


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
    assert codes == [GREY] * 100 + [452] * 1010 + [421]  # 1000 452s free, 10 errors
    assert triplets(qmail_root) == 100
    d.wait_for(r"refuse ip=127\.0\.0\.9 code=451 greylist=new", count=100)
    d.wait_for(r"rcpt-defer-limit ip=127\.0\.0\.9 text=100\\x20deferred\\x20RCPTs")
    d.wait_for(r"rcpt-overshoot ip=127\.0\.0\.9 text=more\\x20than\\x201000\\x20RCPTs")
    assert d.output.count("greylist=new") == 100


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


def send_list(d: Daemon, recipients: list[str]) -> tuple[list[int], str | None]:
    """One delivery attempt of a list message, as a pipelining MTA makes it: every RCPT,
    then DATA if one was accepted; the RCPT reply codes and the queue reply (or None)."""
    with Wire(d.port, source=OUTSIDE) as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO lists.example")[0] == 250
        assert w.cmd("MAIL FROM:<list@lists.example>")[0] == 250
        w.send(b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients))
        codes = [w.reply()[0] for _ in recipients]
        queued = None
        if 250 in codes:
            assert w.cmd("DATA")[0] == 354
            code, queued = w.cmd(b"Subject: list\r\n\r\nhello\r\n.")
            assert code == 250, queued
        assert w.cmd("QUIT")[0] == 221
    return codes, queued


def test_a_list_to_150_new_recipients_is_delivered_to_those_that_passed(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """The review's scenario with the real greylisting: no attempt ends in 421; the first
    has 100 recipients greylisted and 50 refused with 452 unchecked, the second delivers
    to those 100 and greylists the other 50, the third delivers to them. (The 100 passes of
    one attempt count once towards ``greylist.AUTO_ALLOW``: postgrey's rule.)"""
    qmail_root.control("greylistdelay", "1\n")
    d = smtpd()
    pending = [f"member-{i}@mx.test" for i in range(150)]
    codes, queued = send_list(d, pending)
    assert (codes, queued) == ([GREY] * 100 + [452] * 50, None)
    assert triplets(qmail_root) == 100
    delivered: list[int] = []
    for wanted in ([250] * 100 + [GREY] * 50, [250] * 50):
        time.sleep(1.2)  # greylistdelay passes for the triplets of the attempt before
        codes, queued = send_list(d, pending)
        assert codes == wanted
        assert queued is not None
        qid = queued.rsplit(" ", 1)[-1]
        (line,) = (m.group(0) for m in d.wait_for(rf"msg qid={re.escape(qid)} .*"))
        delivered.append(line.count("@mx.test"))
        pending = [r for r, code in zip(pending, codes, strict=True) if code != 250]
    assert delivered == [100, 50]
    assert pending == []
