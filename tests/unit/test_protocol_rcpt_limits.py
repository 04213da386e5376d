"""The core's RCPT limits (s34 review item 1): deferred recipients take a place under the
recipient limit, and deferrals and 452s past their margins count towards max_errors.

The reviewer's live run: one port-25 connection with greylisting sent 20,000 pipelined RCPTs
in 2.5 s and got 20,000 x 451, each a greylist triplet written and a log line; a 452 past
the limit, or a 4xx from greylisting or a sending limit, was neither an error nor junk, so
nothing ever ended the session. ``screen`` here plays greylisting (it counts its calls: each
call is a triplet written by the real one).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_protocol_support import Server, policy, ready

TOO_MANY = "452 4.5.3 Error: too many recipients"
GREY = "451 4.7.1 Greylisted, please try again in 60 seconds"
CLOSE = "421 4.7.0 mx.example.test Error: too many errors"


class Greylist:
    """``Policy.screen`` deferring every new recipient, as greylisting a new client does."""

    def __init__(self, passes: frozenset[str] = frozenset()) -> None:
        self.asked: list[str] = []
        self.passes = passes

    def __call__(self, _sender: str, rcpt: str | None) -> str | None:
        if rcpt is None:
            return None
        self.asked.append(rcpt)
        return None if rcpt in self.passes else GREY


def greylisted(grey: Greylist | None, **overrides: Any) -> tuple[Server, list[tuple[str, str]]]:
    notices: list[tuple[str, str]] = []
    pol = policy(screen=grey, notice=lambda e, t: notices.append((e, t)), **overrides)
    srv = ready(pol)
    assert srv.cmd("MAIL FROM:<bot@elsewhere.example>") == "250 2.1.0 Ok"
    return srv, notices


def test_deferred_recipients_take_places_and_greylisting_is_not_asked_past_the_limit() -> None:
    grey = Greylist(passes=frozenset({"ok1@example.test", "ok2@example.test"}))
    srv, _ = greylisted(grey, maxrcpt=5)
    replies = [srv.cmd(f"RCPT TO:<{name}@example.test>") for name in ("ok1", "g1", "ok2", "g2")]
    assert replies == ["250 2.1.5 Ok", GREY, "250 2.1.5 Ok", GREY]
    assert srv.cmd("RCPT TO:<g3@example.test>") == GREY  # the 5th place, deferred
    for i in range(8):
        assert srv.cmd(f"RCPT TO:<late{i}@example.test>") == TOO_MANY
    assert len(grey.asked) == 5  # never about a recipient past the limit
    assert srv.cmd("DATA").startswith("354")  # the two accepted ones still go
    srv.send(b"x\r\n.\r\n")
    assert srv.messages[0].start.recipients == ("ok1@example.test", "ok2@example.test")


def test_the_hard_limit_applies_to_deferred_recipients_without_maxrcpt() -> None:
    grey = Greylist()
    srv, _ = greylisted(grey, max_errors=100, hard_max_recipients=50)
    replies = [srv.cmd(f"RCPT TO:<u{i}@example.test>") for i in range(60)]
    assert replies == [GREY] * 50 + [TOO_MANY] * 10
    assert len(grey.asked) == 50


def test_greylisted_rcpt_flood_ends_the_session_after_twenty() -> None:
    """The reviewer's 20,000 pipelined RCPTs, in one read: 10 deferrals free, 10 more
    counted as errors (maxerrors 10), then 421: 20 triplets, not 20,000."""
    grey = Greylist()
    srv, notices = greylisted(grey, maxrcpt=0)
    flood = "".join(f"RCPT TO:<alice-{i}@example.test>\r\n" for i in range(20_000))
    replies = srv.send(flood)
    assert replies == [GREY] * 20 + [CLOSE]
    assert srv.closed
    assert len(grey.asked) == 20
    assert notices == [("defer-limit", "more than 10 deferred MAIL/RCPT")]


def test_a_long_list_reaches_data_but_452s_past_the_margin_end_the_session() -> None:
    """A pipelining MTA sends every RCPT before it reads the first 452: within the margin
    (1000 per transaction) its message goes through; a flood past it counts as errors."""
    srv, notices = greylisted(None, maxrcpt=100)
    replies = srv.send("".join(f"RCPT TO:<u{i}@example.test>\r\n" for i in range(1100)))
    assert replies == ["250 2.1.5 Ok"] * 100 + [TOO_MANY] * 1000
    assert srv.cmd("DATA").startswith("354")
    assert srv.send(b"x\r\n.\r\n")[0].startswith("250 2.0.0 Ok: queued as")
    assert notices == []
    for _ in range(2):  # the margin is per transaction
        assert srv.cmd("RSET") == "250 2.0.0 Ok"
        assert srv.cmd("MAIL FROM:<bot@elsewhere.example>") == "250 2.1.0 Ok"
        replies = srv.send("".join(f"RCPT TO:<v{i}@example.test>\r\n" for i in range(1100)))
        assert replies == ["250 2.1.5 Ok"] * 100 + [TOO_MANY] * 1000
    assert not srv.closed
    flood = "".join(f"RCPT TO:<w{i}@example.test>\r\n" for i in range(5000))
    assert srv.send(flood) == [TOO_MANY] * 10 + [CLOSE]  # 1010 past the limit: 421
    assert notices == [("rcpt-overshoot", "more than 1000 RCPTs past the recipient limit")]


def test_deferrals_count_again_from_zero_after_a_queued_message() -> None:
    grey = Greylist(passes=frozenset({"known@example.test"}))
    srv, notices = greylisted(grey, max_errors=1)
    for _ in range(3):
        for i in range(10):
            assert srv.cmd(f"RCPT TO:<new{i}@example.test>") == GREY
        assert srv.cmd("RCPT TO:<known@example.test>") == "250 2.1.5 Ok"
        assert srv.cmd("DATA").startswith("354")
        assert srv.send(b"x\r\n.\r\n")[0].startswith("250 2.0.0 Ok: queued as")
        assert srv.cmd("MAIL FROM:<x@elsewhere.example>") == "250 2.1.0 Ok"
    assert not srv.closed  # 30 deferrals, never more than 10 between two messages
    for i in range(11):  # the 11th is past 10: one error, and max_errors is 1
        assert srv.cmd(f"RCPT TO:<again{i}@example.test>") == GREY
    assert srv.cmd("RCPT TO:<known@example.test>") == CLOSE
    assert notices == [("defer-limit", "more than 10 deferred MAIL/RCPT")]


def test_deferred_mail_commands_count_too() -> None:
    """A 4xx at MAIL (a login's hourly message limit, RBLSMTPD's 451) cannot be retried for
    ever on one connection either."""
    srv = ready(policy(screen=lambda _s, _r: "451 4.7.1 try later", max_errors=2))
    replies = [srv.cmd("MAIL FROM:<x@elsewhere.example>") for _ in range(13)]
    assert replies == ["451 4.7.1 try later"] * 12 + [CLOSE]


def test_a_sending_limit_defers_rcpts_of_a_login_as_greylisting_does() -> None:
    asked: list[int] = []

    def limit(_login: str, count: int) -> str | None:
        asked.append(count)
        return "450 4.7.1 sending limit reached"

    pol = policy(auth_mechanisms=("PLAIN",), rcpt_check=limit, maxrcpt=3, max_errors=50)
    srv = ready(pol)
    assert srv.cmd("AUTH PLAIN AGJvYgBodW50ZXIy").startswith("235")
    srv.cmd("MAIL FROM:<bob@example.test>")
    replies = [srv.cmd(f"RCPT TO:<x{i}@far.example>") for i in range(6)]
    assert replies == ["450 4.7.1 sending limit reached"] * 3 + [TOO_MANY] * 3
    assert asked == [1, 1, 1]  # the recipients the message would count: none accepted


@pytest.mark.parametrize("name", ["max_deferred", "max_rcpt_overshoot"])
def test_negative_margins_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        policy(**{name: -1})
