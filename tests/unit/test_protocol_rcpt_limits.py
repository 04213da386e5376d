"""The core's RCPT limits (s34 review item 1): deferred recipients take a place under the
recipient limit, 100 deferred RCPTs in a session stop further RCPTs with 452 unchecked, and
deferred MAILs and 452s past their margins count towards max_errors.

The reviewer's live run: one port-25 connection with greylisting sent 20,000 pipelined RCPTs
in 2.5 s and got 20,000 x 451, each a greylist triplet written and a log line; a 452 past
the limit, or a 4xx from greylisting or a sending limit, was neither an error nor junk, so
nothing ever ended the session. ``screen`` here plays greylisting (it counts its calls: each
call is a triplet written by the real one).

The first fix counted deferred RCPTs past 10 as errors, which ended a session with 421 after
20 of them, before DATA: a list message to more than 20 new recipients of a greylisting
server was delivered to nobody, not even those already accepted, until greylisting had let
all of them through (the s34 review's second round: 100 recipients, five 421s in a row).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_protocol_support import Server, policy, ready

TOO_MANY = "452 4.5.3 Error: too many recipients"
DEFERRED = "452 4.5.3 Error: too many recipients deferred in this session, try the rest later"
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


def test_greylisted_rcpt_flood_writes_100_triplets_then_452s_end_the_session() -> None:
    """The reviewer's 20,000 pipelined RCPTs, in one read: 100 deferred, then 452 without
    greylisting being asked; those 452s count as overshoot, so 1000 are free and the 10
    after them (maxerrors 10) end the session: 100 triplets, not 20,000."""
    grey = Greylist()
    srv, notices = greylisted(grey, maxrcpt=0)
    flood = "".join(f"RCPT TO:<alice-{i}@example.test>\r\n" for i in range(20_000))
    replies = srv.send(flood)
    assert replies == [GREY] * 100 + [DEFERRED] * 1010 + [CLOSE]
    assert srv.closed
    assert len(grey.asked) == 100
    assert notices == [
        ("rcpt-defer-limit", "100 deferred RCPTs, further ones 452"),
        ("rcpt-overshoot", "more than 1000 RCPTs answered 452 in one transaction"),
    ]


def test_deferred_rcpts_are_no_errors_and_the_accepted_recipients_are_delivered() -> None:
    """The reviewer's scenario: a list message to 150 new recipients, retried as an MTA
    does. Each attempt reaches DATA (never 421) and is delivered to those that passed."""
    grey = Greylist()
    seen: set[str] = set()

    def greylisting(sender: str, rcpt: str | None) -> str | None:  # a triplet passes next time
        if rcpt is None or rcpt in seen:
            return None
        seen.add(rcpt)
        return grey(sender, rcpt)

    delivered: list[tuple[str, ...]] = []
    pending = [f"u{i}@example.test" for i in range(150)]
    while pending:
        srv = ready(policy(screen=greylisting))  # max_errors 10, as maxerrors
        assert srv.cmd("MAIL FROM:<list@lists.example>") == "250 2.1.0 Ok"
        replies = srv.send("".join(f"RCPT TO:<{r}>\r\n" for r in pending))
        assert not srv.closed
        accepted = [r for r, reply in zip(pending, replies, strict=True) if reply[0] == "2"]
        assert all(reply[0] in "24" for reply in replies)
        if accepted:
            assert srv.cmd("DATA").startswith("354")
            assert srv.send(b"x\r\n.\r\n")[0].startswith("250 2.0.0 Ok: queued as")
            delivered.append(srv.messages[0].start.recipients)
        pending = [r for r in pending if r not in accepted]
    assert [len(batch) for batch in delivered] == [100, 50]
    assert len(grey.asked) == 150  # each recipient greylisted once


def test_recipients_accepted_before_the_deferral_limit_still_get_the_message() -> None:
    grey = Greylist(passes=frozenset({"known@example.test"}))
    srv, notices = greylisted(grey, max_deferred_rcpt=3)
    assert srv.cmd("RCPT TO:<known@example.test>") == "250 2.1.5 Ok"
    replies = [srv.cmd(f"RCPT TO:<new{i}@example.test>") for i in range(5)]
    assert replies == [GREY] * 3 + [DEFERRED] * 2
    assert srv.cmd("RCPT TO:<known2@example.test>") == DEFERRED  # not looked at
    assert len(grey.asked) == 4
    assert srv.cmd("DATA").startswith("354")
    assert srv.send(b"x\r\n.\r\n")[0].startswith("250 2.0.0 Ok: queued as")
    assert srv.messages[0].start.recipients == ("known@example.test",)
    assert notices == [("rcpt-defer-limit", "3 deferred RCPTs, further ones 452")]


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
    assert notices == [("rcpt-overshoot", "more than 1000 RCPTs answered 452 in one transaction")]


def test_deferrals_count_again_from_zero_after_a_queued_message() -> None:
    grey = Greylist(passes=frozenset({"known@example.test"}))
    srv, notices = greylisted(grey, max_errors=1, max_deferred_rcpt=10)
    for _ in range(3):
        assert srv.cmd("RCPT TO:<known@example.test>") == "250 2.1.5 Ok"
        for i in range(10):
            assert srv.cmd(f"RCPT TO:<new{i}@example.test>") == GREY
        assert srv.cmd("RCPT TO:<new10@example.test>") == DEFERRED
        assert srv.cmd("DATA").startswith("354")
        assert srv.send(b"x\r\n.\r\n")[0].startswith("250 2.0.0 Ok: queued as")
        assert srv.cmd("MAIL FROM:<x@elsewhere.example>") == "250 2.1.0 Ok"
    assert not srv.closed  # neither the deferrals nor the 452s were errors
    assert len(grey.asked) == 33
    assert notices == [("rcpt-defer-limit", "10 deferred RCPTs, further ones 452")] * 3


def test_deferred_mail_commands_count_too() -> None:
    """A 4xx at MAIL (a login's hourly message limit, RBLSMTPD's 451) cannot be retried for
    ever on one connection either."""
    notices: list[tuple[str, str]] = []
    pol = policy(
        screen=lambda _s, _r: "451 4.7.1 try later",
        max_errors=2,
        notice=lambda e, t: notices.append((e, t)),
    )
    srv = ready(pol)
    replies = [srv.cmd("MAIL FROM:<x@elsewhere.example>") for _ in range(13)]
    assert replies == ["451 4.7.1 try later"] * 12 + [CLOSE]
    assert notices == [("defer-limit", "more than 10 deferred MAILs")]


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


def test_a_deferred_rcpt_limit_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="max_deferred_rcpt must be >= 1, got 0"):
        policy(max_deferred_rcpt=0)
