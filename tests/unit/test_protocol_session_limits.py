"""The core's session limits: HELO syntax, junk commands, the AUTH login in Received.

Issue 14: ``EHLO evil)by(forged.mx.google.com;`` reached the Received header, 2,000 RSETs
were all answered 250, and the Received header named the AUTH login on relayed mail.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_protocol_support import Server, policy, ready

from pyqmail.protocol import helo as protocol_helo

ACCEPTED_HELO = [
    "mx.example.net",
    "MX.Example.NET",
    "localhost",  # bare words: real clients send them
    "DESKTOP-4711",
    "host_name.example",  # underscores: Windows machine names
    "mail.example.com.",  # one trailing dot
    "xn--bcher-kva.example",  # IDN as A-labels
    "a" * 63 + ".example",
    ".".join(["a" * 63] * 3 + ["a" * 61]),  # 253 characters: the longest DNS name
    ".".join(["a" * 63] * 3 + ["a" * 61]) + ".",  # and its trailing dot
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
    "[ipv6:::1]",
    "[IPv6:::ffff:192.0.2.1]",
]

REFUSED_HELO = [
    "evil)by(forged.mx.google.com;",  # the example: comment delimiters
    "host(comment)",
    "a;b",
    "by.example;with",
    "<host.example>",
    '"quoted"',
    "host,example",
    "a@b.example",
    "a/b",
    "a\\b",
    "smtp.example.com:25",
    "host.example\x7f",
    "hôte.example",  # non-ASCII
    "主机.example",
    "a..b",
    ".lead.example",
    "trail.example..",
    "a" * 64 + ".example",  # label too long
    ".".join(["a" * 63] * 3 + ["a" * 62]),  # 254 characters: no DNS name is as long
    ".".join(["a" * 63] * 4),  # 255 characters
    ".".join(["a" * 63] * 4) + "a",  # 256 characters
    "[1.2.3]",
    "[192.0.2.1",
    "[01.2.3.4]",
    "[]",
    "[IPv6:fe80::1%eth0]",
    "[IPv6:zz::1]",
    "[tag:content]",
    "[192.0.2.1]x",
]


@pytest.mark.parametrize("name", ACCEPTED_HELO)
def test_helo_accepted_and_verbatim_in_received(name: str) -> None:
    assert protocol_helo.refusal(name) is None
    srv = ready(helo=f"EHLO {name}")
    srv.cmd("MAIL FROM:<>")
    srv.cmd("RCPT TO:<u@example.test>")
    srv.cmd("DATA")
    srv.send(b"x\r\n.\r\n")
    first = bytes(srv.messages[0].data).split(b"\r\n", 1)[0]
    assert first == f"Received: from {name} (client.example.net [192.0.2.7])".encode()


@pytest.mark.parametrize("name", REFUSED_HELO)
@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_helo_refused_and_logged(verb: str, name: str) -> None:
    notices: list[tuple[str, str]] = []
    srv = Server(policy(notice=lambda event, text: notices.append((event, text))))
    assert srv.cmd(f"{verb} {name}") == f"501 5.5.4 Error: invalid {verb} hostname"
    assert srv.conn.helo is None
    assert srv.cmd("MAIL FROM:<>") == "503 5.5.1 Error: send HELO/EHLO first"
    assert len(notices) == 1
    event, text = notices[0]
    assert event == "helo-refused"
    assert text.startswith(f"{verb} ") and ": " in text


@pytest.mark.parametrize(
    "raw",
    [
        b"EHLO a\rReceived: from forged\r\n",  # CR: header injection
        b"EHLO a\x00b\r\n",
    ],
)
def test_helo_with_cr_or_nul_never_becomes_the_name(raw: bytes) -> None:
    srv = Server()
    assert srv.send(raw) == ["501 5.5.2 Syntax error: CR or NUL in command"]
    assert srv.conn.helo is None


def test_helo_refusal_reasons_are_specific() -> None:
    assert protocol_helo.refusal("") == "empty"
    assert protocol_helo.refusal("hôte") == "non-ASCII characters"
    assert protocol_helo.refusal("a b") == "control characters or blanks"
    assert protocol_helo.refusal("[IPv6:fe80::1%1]") == "IPv6 literal with a zone index"
    assert protocol_helo.refusal("x" * 254) == "longer than 253 characters"


# ----- junk commands -------------------------------------------------------------------


def junk_server(**overrides: Any) -> tuple[Server, list[tuple[str, str]]]:
    notices: list[tuple[str, str]] = []
    pol = policy(max_junk=3, max_errors=2, notice=lambda e, t: notices.append((e, t)), **overrides)
    return ready(pol), notices


@pytest.mark.parametrize(
    ("name", "setup", "junk", "reply"),
    [
        ("NOOP", [], "NOOP", "250 2.0.0 Ok"),
        ("RSET", [], "RSET", "250 2.0.0 Ok"),
        ("VRFY", [], "VRFY postmaster", "252 2.0.0 Send some mail, I'll try my best"),
        ("HELP", [], "HELP", "214 2.0.0 Commands:"),
        ("repeated EHLO", [], "EHLO again.example", "250 SMTPUTF8"),
        ("repeated HELO", [], "HELO again.example", "250 mx.example.test"),
        (
            "duplicate RCPT",
            ["MAIL FROM:<>", "RCPT TO:<u@example.test>"],
            "RCPT TO:<u@example.test>",
            "250 2.1.5 Ok",
        ),
    ],
)
def test_junk_past_the_limit_counts_as_errors_then_421(
    name: str, setup: list[str], junk: str, reply: str
) -> None:
    srv, notices = junk_server()
    for line in setup:
        assert srv.cmd(line).startswith("250"), line
    for i in range(3 + 2):  # the limit, then max_errors more
        assert srv.cmd(junk).startswith(reply), f"{name} #{i + 1}"
    assert not srv.closed
    assert srv.cmd(junk) == "421 4.7.0 mx.example.test Error: too many errors"
    assert srv.closed
    assert notices == [("junk-limit", "more than 3 junk commands")]


def test_rcpt_over_the_recipient_limit_is_not_junk() -> None:
    """A pipelining MTA sends all its RCPTs before it reads the 452s: its message must
    still reach DATA for the recipients that were taken."""
    srv, notices = junk_server(maxrcpt=1)
    srv.cmd("MAIL FROM:<>")
    assert srv.cmd("RCPT TO:<a@example.test>") == "250 2.1.5 Ok"
    for i in range(300):
        assert srv.cmd(f"RCPT TO:<b{i}@example.test>") == "452 4.5.3 Error: too many recipients"
    assert srv.cmd("DATA").startswith("354")
    assert notices == []


def test_junk_count_restarts_after_a_queued_message() -> None:
    srv, notices = junk_server()
    for _ in range(3):
        for _ in range(3):
            assert srv.cmd("NOOP") == "250 2.0.0 Ok"
        srv.cmd("MAIL FROM:<>")
        srv.cmd("RCPT TO:<u@example.test>")
        srv.cmd("DATA")
        assert srv.send(b"x\r\n.\r\n")[0].startswith("250 2.0.0 Ok: queued as")
    assert srv.cmd("NOOP") == "250 2.0.0 Ok"
    assert notices == []
    assert srv.queued == 3


def test_ehlo_after_starttls_is_not_junk() -> None:
    srv, notices = junk_server(starttls_available=True)
    for _ in range(3):
        srv.cmd("NOOP")
    assert srv.cmd("STARTTLS").startswith("220")
    assert srv.send("EHLO again\r\n")[0].startswith("250-")
    assert notices == []


def test_default_limit_ends_2000_rsets_early() -> None:
    srv = ready()  # Policy defaults: max_junk 100, max_errors 10
    replies = [srv.cmd("RSET") for _ in range(2000) if not srv.closed]
    assert replies.count("250 2.0.0 Ok") == 110
    assert replies[-1] == "421 4.7.0 mx.example.test Error: too many errors"


def test_junk_limit_zero_means_no_limit() -> None:
    srv = ready(policy(max_junk=0, max_errors=1))
    assert all(srv.cmd("NOOP") == "250 2.0.0 Ok" for _ in range(1000))


def test_negative_junk_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_junk must be >= 0"):
        policy(max_junk=-1)


# ----- the AUTH login in Received ----------------------------------------------------------


@pytest.mark.parametrize(("auth_header", "named"), [(False, False), (True, True)])
def test_received_names_the_login_only_when_asked(auth_header: bool, named: bool) -> None:
    srv = ready(policy(auth_mechanisms=("PLAIN",), auth_header=auth_header))
    assert srv.cmd("AUTH PLAIN AGJvYgBodW50ZXIy").startswith("235")
    srv.cmd("MAIL FROM:<a@example.net>")
    srv.cmd("RCPT TO:<x@elsewhere.test>")
    srv.cmd("DATA")
    srv.send(b"x\r\n.\r\n")
    header = bytes(srv.messages[0].data)
    assert (b"(authenticated user: bob)" in header) is named
    assert b"bob" in header or not named
    assert b"with ESMTPA;" in header  # RFC 3848 still says that AUTH was used
