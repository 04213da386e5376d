"""The greeting pause per client (issue 17 item 5, postscreen's ``greet_wait``).

``control/greetdelay`` holds port 25's 220 back (tests/attacks/test_session_limits.py covers
the talk-first refusal and the relay clients); here the tcprules cdb decides per client:
``GREETDELAY=n`` sets one client's pause (0 = allow-listed), ``RBLSMTPD=""`` (rblsmtpd's
allow-list mark) skips it, a malformed value is logged and the control file's pause kept.
Class: ``pregreet-talk-first``.
"""

from __future__ import annotations

import time

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon

SYNC = [(554, "554 5.5.0 Error: SMTP protocol synchronization")]


def waited(d: Daemon, source: str) -> float:
    """Seconds until the 220 greeting reaches a patient client from ``source``."""
    with Wire(d.port, source=source) as w:
        start = time.monotonic()
        assert w.reply()[0] == 220
        took = time.monotonic() - start
        assert w.cmd("QUIT")[0] == 221
    return took


def test_a_rule_allow_lists_a_client_or_sets_its_pause(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    qmail_root.control("greetdelay", "2\n")
    rules = (
        '127.0.0.2:allow,GREETDELAY="0"\n'  # allow-listed: greeted at once
        '127.0.0.3:allow,RBLSMTPD=""\n'  # rblsmtpd's allow-list mark
        '127.0.0.4:allow,GREETDELAY="3"\n'  # a suspicious range: a longer pause
        '127.0.0.5:allow,GREETDELAY="soon"\n'  # malformed: the control file's pause
        ":allow\n"
    )
    d = smtpd(rules_cdb=qmail_root.rules(rules))
    assert waited(d, "127.0.0.2") < 1.0
    assert waited(d, "127.0.0.3") < 1.0
    assert waited(d, "127.0.0.4") > 2.8
    assert 1.8 < waited(d, "127.0.0.5") < 2.8
    assert 1.8 < waited(d, "127.0.0.9") < 2.8  # no rule of its own
    d.wait_for(r"warning text=rule\\x20sets\\x20GREETDELAY='soon'")
    with Wire(d.port, source="127.0.0.4") as w:  # its own pause still catches talkers
        time.sleep(2.2)
        w.send(b"EHLO bot.example\r\n")
        assert w.until_eof(5) == SYNC
    tried("pregreet-talk-first")
    d.wait_for(r"pregreet ip=127\.0\.0\.4 port=\d+ bytes=\d+ after=2\.")
    assert "pregreet ip=127.0.0.2" not in d.output


def test_a_rule_pause_applies_without_the_control_file(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """greetdelay 0 (the default) for everyone, a pause for one range only."""
    d = smtpd(rules_cdb=qmail_root.rules('127.0.0.4:allow,GREETDELAY="2"\n:allow\n'))
    assert waited(d, "127.0.0.9") < 1.0
    with Wire(d.port, source="127.0.0.4") as w:
        w.send(b"HELO bot.example\r\n")
        assert w.until_eof(5) == SYNC
    tried("pregreet-talk-first")
    d.wait_for(r"pregreet ip=127\.0\.0\.4 ")
    assert waited(d, "127.0.0.4") > 1.8
