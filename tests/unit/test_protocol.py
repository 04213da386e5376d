"""Table-driven tests of the sans-I/O SMTP core: sessions, envelope, relay, AUTH, STARTTLS."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from test_protocol_support import HOST, TLS, Server, in_data, policy, ready

from pyqmail.protocol import (
    AuthRejected,
    AuthRequest,
    Close,
    MessageStart,
    Policy,
    ProtocolUsageError,
    Send,
    SMTPConnection,
    StartTLS,
    State,
    TLSInfo,
)
from tests.core_buffers import held_bytes


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


# ----- greeting, EHLO, HELO ---------------------------------------------------------------


def test_greeting_is_220_with_policy_text() -> None:
    srv = Server()
    assert srv.lines() == [f"220 {HOST} ESMTP"]
    assert srv.conn.state is State.GREETED


EHLO_CASES = [
    (
        "plain port 25, cert loaded",
        {"starttls_available": True, "databytes": 10_000_000},
        ["PIPELINING", "SIZE 10000000", "STARTTLS", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"],
    ),
    (
        "no cert, no size limit",
        {},
        ["PIPELINING", "SIZE", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"],
    ),
    (
        "smtps: TLS from the start, AUTH on",
        {
            "tls_active": True,
            "tls_info": TLS,
            "starttls_available": True,
            "auth_mechanisms": ("PLAIN", "LOGIN"),
        },
        ["PIPELINING", "SIZE", "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"],
    ),
    (
        "submission before TLS: AUTH hidden",
        {
            "starttls_available": True,
            "force_tls": True,
            "auth_mechanisms": ("PLAIN", "LOGIN", "CRAM-MD5"),
        },
        ["PIPELINING", "SIZE", "STARTTLS", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"],
    ),
    (
        "AUTH over plaintext allowed when not forced",
        {"auth_mechanisms": ("CRAM-MD5",)},
        ["PIPELINING", "SIZE", "AUTH CRAM-MD5", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"],
    ),
]


@pytest.mark.parametrize(("name", "overrides", "caps"), EHLO_CASES, ids=[c[0] for c in EHLO_CASES])
def test_ehlo_capabilities(name: str, overrides: dict[str, object], caps: list[str]) -> None:
    srv = Server(policy(**overrides))
    lines = srv.send("EHLO client.example.net\r\n")
    assert lines[0] == f"250-{HOST}"
    assert [line[4:] for line in lines[1:]] == caps
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")
    assert len(set(lines)) == len(lines)


def test_ehlo_after_starttls_no_longer_offers_starttls_but_offers_auth() -> None:
    srv = ready(policy(starttls_available=True, force_tls=True, auth_mechanisms=("PLAIN",)))
    assert srv.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    assert srv.tls_starts == 1
    caps = [line[4:] for line in srv.send("EHLO again\r\n")]
    assert "STARTTLS" not in caps
    assert "AUTH PLAIN" in caps


HELO_CASES = [
    ("HELO client.example.net", f"250 {HOST}"),
    ("helo [192.0.2.7]", f"250 {HOST}"),
    ("HELO", "501 5.5.4 Syntax: HELO hostname"),
    ("EHLO ", "501 5.5.4 Syntax: EHLO hostname"),
    ("EHLO bad\tname", "501 5.5.4 Error: invalid EHLO hostname"),
    ("EHLO two words", "501 5.5.4 Error: invalid EHLO hostname"),
    ("EHLO " + "a" * 256, "501 5.5.4 Error: invalid EHLO hostname"),
    ("EHLO hôte", "501 5.5.4 Error: invalid EHLO hostname"),
]


@pytest.mark.parametrize(("line", "reply"), HELO_CASES)
def test_helo_syntax(line: str, reply: str) -> None:
    assert Server().cmd(line) == reply


# ----- sequencing and simple commands -----------------------------------------------------

SEQUENCE_CASES = [
    ("MAIL before HELO", [], "MAIL FROM:<a@example.net>", "503 5.5.1 Error: send HELO/EHLO first"),
    (
        "RCPT before MAIL",
        ["EHLO x"],
        "RCPT TO:<u@example.test>",
        "503 5.5.1 Error: need MAIL command",
    ),
    ("DATA before MAIL", ["EHLO x"], "DATA", "503 5.5.1 Error: need MAIL command"),
    ("DATA before RCPT", ["EHLO x", "MAIL FROM:<>"], "DATA", "503 5.5.1 Error: need RCPT command"),
    (
        "DATA with only rejected RCPTs",
        ["EHLO x", "MAIL FROM:<>", "RCPT TO:<u@elsewhere.test>"],
        "DATA",
        "554 5.5.1 Error: no valid recipients",
    ),
    (
        "nested MAIL",
        ["EHLO x", "MAIL FROM:<>"],
        "MAIL FROM:<>",
        "503 5.5.1 Error: nested MAIL command",
    ),
    ("RSET ends a transaction", ["EHLO x", "MAIL FROM:<>", "RSET"], "MAIL FROM:<>", "250 2.1.0 Ok"),
    (
        "HELO ends a transaction",
        ["EHLO x", "MAIL FROM:<>", "HELO y"],
        "RCPT TO:<u@example.test>",
        "503 5.5.1 Error: need MAIL command",
    ),
    ("RSET with argument", ["EHLO x"], "RSET now", "501 5.5.4 Syntax: RSET"),
    ("DATA with argument", ["EHLO x"], "DATA x", "503 5.5.1 Error: need MAIL command"),
    ("NOOP", [], "NOOP", "250 2.0.0 Ok"),
    ("NOOP with text", [], "noop hello there", "250 2.0.0 Ok"),
    ("VRFY", ["EHLO x"], "VRFY root", "252 2.0.0 Send some mail, I'll try my best"),
    ("EXPN", ["EHLO x"], "EXPN staff", "502 5.5.1 Error: command not implemented"),
    (
        "BDAT not offered",
        ["EHLO x", "MAIL FROM:<>"],
        "BDAT 10 LAST",
        "502 5.5.1 Error: command not implemented",
    ),
    ("unknown", ["EHLO x"], "XYZZY", "502 5.5.2 Error: command not recognized"),
    ("empty line", ["EHLO x"], "", "502 5.5.2 Error: command not recognized"),
    (
        "HELP",
        [],
        "HELP",
        "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
    ),
    ("AUTH when off", ["EHLO x"], "AUTH PLAIN", "503 5.5.1 Error: authentication not enabled"),
    ("STARTTLS without cert", ["EHLO x"], "STARTTLS", "502 5.5.1 Error: command not implemented"),
    ("NUL in command", ["EHLO x"], "NOOP a\0b", "501 5.5.2 Syntax error: CR or NUL in command"),
    (
        "CR in command",
        ["EHLO x"],
        "MAIL FROM:<a@b.example>\rRCPT TO:<x@y.test>",
        "501 5.5.2 Syntax error: CR or NUL in command",
    ),
]


@pytest.mark.parametrize(
    ("name", "setup", "line", "reply"), SEQUENCE_CASES, ids=[c[0] for c in SEQUENCE_CASES]
)
def test_sequencing(name: str, setup: list[str], line: str, reply: str) -> None:
    srv = Server()
    for cmd in setup:
        srv.cmd(cmd)
    assert srv.cmd(line) == reply
    assert not srv.closed


def test_invalid_utf8_command() -> None:
    srv = ready()
    assert srv.send(b"NOOP \xff\xfe\r\n") == ["500 5.5.2 Error: command is not valid UTF-8"]


def test_quit_closes() -> None:
    srv = ready()
    assert srv.cmd("QUIT") == f"221 2.0.0 {HOST} Bye"
    assert srv.closed and isinstance(srv.events[-1], Close)
    assert srv.conn.receive(b"NOOP\r\n") == []


def test_quit_with_argument_is_syntax_error() -> None:
    assert ready().cmd("QUIT now") == "501 5.5.4 Syntax: QUIT"


def test_commands_are_case_insensitive() -> None:
    srv = Server()
    assert srv.cmd("ehlo x").startswith("250 ")
    assert srv.cmd("mail from:<a@example.net>") == "250 2.1.0 Ok"
    assert srv.cmd("rcpt to:<u@example.test>") == "250 2.1.5 Ok"


# ----- MAIL FROM ---------------------------------------------------------------------------

MAIL_CASES = [
    ("<a@example.net>", "250 2.1.0 Ok", "a@example.net"),
    ("<>", "250 2.1.0 Ok", ""),
    (" <a@Example.NET>", "250 2.1.0 Ok", "a@example.net"),
    ("<a@example.net> SIZE=1000", "250 2.1.0 Ok", "a@example.net"),
    ("<a@example.net> BODY=8BITMIME", "250 2.1.0 Ok", "a@example.net"),
    ("<a@example.net> body=7bit", "250 2.1.0 Ok", "a@example.net"),
    ("<a@example.net> AUTH=<>", "250 2.1.0 Ok", "a@example.net"),
    ("<ü@exämple.net> SMTPUTF8", "250 2.1.0 Ok", "ü@exämple.net"),
    ("<a@[192.0.2.9]>", "250 2.1.0 Ok", "a@[192.0.2.9]"),
    ("<a@[IPv6:2001:DB8::1]>", "250 2.1.0 Ok", "a@[IPv6:2001:db8::1]"),
    ("<@relay.example,@r2.example:a@example.net>", "250 2.1.0 Ok", "a@example.net"),
    ("a@example.net", "501 5.1.7 Bad address syntax: angle brackets required", None),
    ("<a@example.net", "501 5.1.7 Bad address syntax: missing '>'", None),
    ("<a@example.net>SIZE=10", "501 5.1.7 Bad address syntax: text after '>'", None),
    ("<<a@example.net>>", "501 5.1.7 Bad address syntax: '<' inside the address", None),
    ("<a@b@example.net>", "501 5.1.7 Bad address syntax: more than one '@'", None),
    ("<a b@example.net>", "501 5.1.7 Bad address syntax: ' ' not allowed", None),
    ("<a\x01@example.net>", "501 5.1.7 Bad address syntax: '\\x01' not allowed", None),
    ('<"a b"@example.net>', "553 5.1.7 sorry, quoted local parts are not accepted", None),
    ("<a@exa_mple.net>", "501 5.1.7 Bad address syntax: bad domain 'exa_mple.net'", None),
    ("<a@example.net.>", "501 5.1.7 Bad address syntax: bad domain 'example.net.'", None),
    ("<a@-example.net>", "501 5.1.7 Bad address syntax: bad domain '-example.net'", None),
    ("<a@[999.1.1.1]>", "501 5.1.7 Bad address syntax: bad address literal", None),
    ("<a@[192.0.2.1>", "501 5.1.7 Bad address syntax: unterminated address literal", None),
    ("<a@>", "501 5.1.7 Bad address syntax: bad domain", None),
    ("<@x:>", "501 5.1.7 Bad address syntax: bad local part", None),
    ("<@x a@example.net>", "501 5.1.7 Bad address syntax: bad source route", None),
    ("<a>", "501 5.1.7 Bad address syntax: domain required", None),
    (
        "<" + "a" * 250 + "@example.net>",
        "501 5.1.7 Bad address syntax: address longer than 254",
        None,
    ),
    ("<ü@example.net>", "553 5.6.7 sorry, non-ASCII address needs SMTPUTF8", None),
    ("<a@exämple.net>", "553 5.6.7 sorry, non-ASCII address needs SMTPUTF8", None),
    ("<a@example.net> SIZE=99999999999999999999", "555 5.5.4 Bad SIZE parameter", None),
    ("<a@example.net> SIZE=-1", "555 5.5.4 Bad SIZE parameter", None),
    ("<a@example.net> SIZE", "555 5.5.4 Bad SIZE parameter", None),
    ("<a@example.net> SIZE=1 SIZE=2", "555 5.5.4 Repeated parameter: SIZE", None),
    ("<a@example.net> size=1 SIZE=1", "555 5.5.4 Repeated parameter: SIZE", None),
    ("<a@example.net> BODY=BINARYMIME", "555 5.5.4 Unsupported BODY parameter", None),
    ("<a@example.net> RET=FULL", "555 5.5.4 Unsupported option: RET", None),
    ("<a@example.net> X-FOO=bar", "555 5.5.4 Unsupported option: X-FOO", None),
    ("<a@example.net> SMTPUTF8=yes", "555 5.5.4 SMTPUTF8 takes no value", None),
    ("<a@example.net> =x", "555 5.5.4 Bad parameter syntax: =x", None),
    ("<a@example.net> A=B=C", "555 5.5.4 Bad parameter syntax: A=B=C", None),
    (
        "<a@example.net> " + " ".join(f"X{i}=1" for i in range(9)),
        "555 5.5.4 Too many parameters",
        None,
    ),
]


@pytest.mark.parametrize(("arg", "reply", "sender"), MAIL_CASES)
def test_mail_from(arg: str, reply: str, sender: str | None) -> None:
    srv = ready()
    assert srv.cmd("MAIL FROM:" + arg) == reply
    if sender is None:
        assert srv.conn.state is State.READY
        return
    assert srv.cmd("RCPT TO:<u@example.test>") == "250 2.1.5 Ok"
    assert srv.cmd("DATA").startswith("354")
    assert srv.messages[-1].start.sender == sender


def test_mail_size_over_databytes_refused() -> None:
    srv = ready(policy(databytes=1000))
    assert (
        srv.cmd("MAIL FROM:<a@example.net> SIZE=1001")
        == "552 5.3.4 Message size exceeds fixed limit"
    )
    assert srv.cmd("MAIL FROM:<a@example.net> SIZE=1000") == "250 2.1.0 Ok"


def test_mail_without_from_keyword() -> None:
    assert ready().cmd("MAIL TO:<a@example.net>") == "501 5.5.4 Syntax: MAIL FROM:<address>"


def test_mail_params_reach_message_start() -> None:
    srv = ready()
    srv.cmd("MAIL FROM:<a@example.net> SIZE=12 body=8bitmime SMTPUTF8 AUTH=<>")
    srv.cmd("RCPT TO:<u@example.test>")
    srv.cmd("DATA")
    start = srv.messages[0].start
    assert dict(start.params) == {"SIZE": "12", "BODY": "8BITMIME", "SMTPUTF8": "", "AUTH": "<>"}
    assert start.protocol == "UTF8SMTP"


# ----- RCPT TO: relay decision and address tricks ------------------------------------------

DENY = "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"
RCPT_CASES = [
    ("<u@example.test>", "250 2.1.5 Ok", "u@example.test"),
    ("<U@EXAMPLE.TEST>", "250 2.1.5 Ok", "U@example.test"),
    ("<postmaster>", "250 2.1.5 Ok", f"postmaster@{HOST}"),
    ("<PostMaster>", "250 2.1.5 Ok", f"postmaster@{HOST}"),
    ("<@evil.example:u@example.test>", "250 2.1.5 Ok", "u@example.test"),
    ("<u@[192.0.2.1]>", "250 2.1.5 Ok", "u@[192.0.2.1]"),
    ("<u@elsewhere.test>", DENY, None),
    ("<@example.test:u@elsewhere.test>", DENY, None),
    ("<u@elsewhere.test@example.test>", "501 5.1.3 Bad address syntax: more than one '@'", None),
    (
        "<u%elsewhere.test@example.test>",
        "553 5.1.3 sorry, '%' and '!' are not accepted in recipients",
        None,
    ),
    (
        "<elsewhere.test!u@example.test>",
        "553 5.1.3 sorry, '%' and '!' are not accepted in recipients",
        None,
    ),
    (
        '<"u@elsewhere.test"@example.test>',
        "553 5.1.3 sorry, quoted local parts are not accepted",
        None,
    ),
    ('<"u"@example.test>', "553 5.1.3 sorry, quoted local parts are not accepted", None),
    (
        "<u\\@elsewhere.test@example.test>",
        "553 5.1.3 sorry, quoted local parts are not accepted",
        None,
    ),
    ("<u@[192.0.2.99]>", DENY, None),
    ("<u@example.test.>", "501 5.1.3 Bad address syntax: bad domain 'example.test.'", None),
    ("<u@example.test\x00.evil>", "501 5.5.2 Syntax error: CR or NUL in command", None),
    ("<>", "501 5.1.3 Bad address syntax: empty address", None),
    ("<u>", "501 5.1.3 Bad address syntax: domain required", None),
    ("u@example.test", "501 5.1.3 Bad address syntax: angle brackets required", None),
    ("<u@example.test> NOTIFY=NEVER", "555 5.5.4 Unsupported option: NOTIFY", None),
    ("<u@example.test> ORCPT=rfc822;u@example.test", "555 5.5.4 Unsupported option: ORCPT", None),
]


@pytest.mark.parametrize(("arg", "reply", "recipient"), RCPT_CASES)
def test_rcpt_to(arg: str, reply: str, recipient: str | None) -> None:
    srv = ready()
    srv.cmd("MAIL FROM:<a@example.net>")
    assert srv.cmd("RCPT TO:" + arg) == reply
    if recipient is not None:
        srv.cmd("DATA")
        assert srv.messages[0].start.recipients == (recipient,)


RELAY_CASES = [
    # (policy overrides, authenticate, client cert relay, domain, expected)
    ({}, False, False, "example.test", "250 2.1.5 Ok"),
    ({}, False, False, "elsewhere.test", DENY),
    ({"relay_client": True}, False, False, "elsewhere.test", "250 2.1.5 Ok"),
    (
        {"tls_active": True, "auth_mechanisms": ("PLAIN",)},
        True,
        False,
        "elsewhere.test",
        "250 2.1.5 Ok",
    ),
    ({"tls_active": True, "auth_mechanisms": ("PLAIN",)}, False, False, "elsewhere.test", DENY),
    (
        {"tls_active": True, "tls_info": TLSInfo("TLSv1.3", "X", client_cert_relay=True)},
        False,
        True,
        "elsewhere.test",
        "250 2.1.5 Ok",
    ),
    (
        {"tls_active": True, "tls_info": TLSInfo("TLSv1.3", "X", client_cert_relay=False)},
        False,
        False,
        "elsewhere.test",
        DENY,
    ),
]


@pytest.mark.parametrize(("overrides", "auth", "cert", "domain", "reply"), RELAY_CASES)
def test_relay_decision(
    overrides: dict[str, object], auth: bool, cert: bool, domain: str, reply: str
) -> None:
    srv = ready(policy(**overrides))
    if auth:
        assert srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2")).startswith("235")
    assert srv.cmd("MAIL FROM:<a@example.net>") == "250 2.1.0 Ok"
    assert srv.cmd(f"RCPT TO:<u@{domain}>") == reply


def test_client_cert_relay_granted_by_the_starttls_handshake() -> None:
    """The server grants relaying for a listed client certificate through the TLSInfo it
    passes to tls_started: denied before the handshake, allowed after it."""
    pol = policy(starttls_available=True)
    conn = SMTPConnection(pol)
    conn.start()

    def cmd(line: str) -> bytes:
        return b"".join(
            e.data for e in conn.receive(line.encode() + b"\r\n") if isinstance(e, Send)
        )

    cmd("EHLO client.example.net")
    cmd("MAIL FROM:<a@example.net>")
    assert cmd("RCPT TO:<u@elsewhere.test>") == f"{DENY}\r\n".encode()
    cmd("RSET")
    assert cmd("STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
    conn.tls_started(TLSInfo("TLSv1.3", "X", client_cert_relay=True))
    cmd("EHLO client.example.net")
    cmd("MAIL FROM:<a@example.net>")
    assert cmd("RCPT TO:<u@elsewhere.test>") == b"250 2.1.5 Ok\r\n"


def test_validrcptto_refuses_unknown_local_users_only() -> None:
    known = {"u@example.test"}
    srv = ready(policy(validrcptto=lambda addr: addr in known, relay_client=True))
    srv.cmd("MAIL FROM:<a@example.net>")
    assert srv.cmd("RCPT TO:<u@example.test>") == "250 2.1.5 Ok"
    assert (
        srv.cmd("RCPT TO:<nobody@example.test>") == "550 5.1.1 sorry, no mailbox here by that name"
    )
    assert srv.cmd("RCPT TO:<x@elsewhere.test>") == "250 2.1.5 Ok"  # remote: not ours to check


def test_maxrcpt_keeps_earlier_recipients() -> None:
    srv = ready(policy(maxrcpt=3))
    srv.cmd("MAIL FROM:<a@example.net>")
    replies = [srv.cmd(f"RCPT TO:<u{i}@example.test>") for i in range(5)]
    assert replies == ["250 2.1.5 Ok"] * 3 + ["452 4.5.3 Error: too many recipients"] * 2
    assert srv.cmd("DATA").startswith("354")
    assert srv.messages[0].start.recipients == (
        "u0@example.test",
        "u1@example.test",
        "u2@example.test",
    )


def test_maxrcpt_zero_still_has_a_hard_cap_and_overflow_is_not_an_error() -> None:
    srv = ready(policy(hard_max_recipients=150, max_errors=2))
    srv.cmd("MAIL FROM:<a@example.net>")
    replies = [srv.cmd(f"RCPT TO:<u{i}@example.test>") for i in range(160)]
    assert replies.count("250 2.1.5 Ok") == 150
    assert replies[150:] == ["452 4.5.3 Error: too many recipients"] * 10
    assert srv.cmd("DATA").startswith("354")  # 452s did not count towards max_errors


def test_duplicate_recipient_is_stored_once() -> None:
    srv = ready()
    srv.cmd("MAIL FROM:<a@example.net>")
    assert srv.cmd("RCPT TO:<u@example.test>") == "250 2.1.5 Ok"
    assert srv.cmd("RCPT TO:<u@EXAMPLE.test>") == "250 2.1.5 Ok"
    srv.cmd("DATA")
    assert srv.messages[0].start.recipients == ("u@example.test",)


def test_utf8_recipient_needs_smtputf8_on_mail() -> None:
    srv = ready(policy(relay_client=True))
    srv.cmd("MAIL FROM:<a@example.net>")
    assert (
        srv.cmd("RCPT TO:<ü@exämple.test>") == "553 5.6.7 sorry, non-ASCII address needs SMTPUTF8"
    )
    srv.cmd("RSET")
    srv.cmd("MAIL FROM:<a@example.net> SMTPUTF8")
    assert srv.cmd("RCPT TO:<ü@exämple.test>") == "250 2.1.5 Ok"


# ----- force_tls / auth_required (submission) -----------------------------------------------


def test_force_tls_refuses_mail_and_auth_before_starttls() -> None:
    pol = policy(
        starttls_available=True, force_tls=True, auth_required=True, auth_mechanisms=("PLAIN",)
    )
    srv = ready(pol)
    assert srv.cmd("MAIL FROM:<a@example.net>") == "530 5.7.0 Must issue a STARTTLS command first"
    assert (
        srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2"))
        == "530 5.7.0 Must issue a STARTTLS command first"
    )
    assert srv.cmd("STARTTLS").startswith("220")
    srv.cmd("EHLO x")
    assert srv.cmd("MAIL FROM:<a@example.net>") == "530 5.7.0 Authentication required"
    assert srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2")) == "235 2.7.0 Authentication successful"
    assert srv.cmd("MAIL FROM:<a@example.net>") == "250 2.1.0 Ok"
    assert srv.cmd("RCPT TO:<x@elsewhere.test>") == "250 2.1.5 Ok"
    srv.cmd("DATA")
    start = srv.messages[0].start
    assert (start.auth_user, start.protocol, start.tls) == ("bob", "ESMTPSA", TLS)


# ----- STARTTLS -----------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext() -> None:
    """CVE-2011-0411: commands sent with STARTTLS are never executed after the handshake."""
    srv = ready(policy(starttls_available=True))
    conn = srv.conn
    events = conn.receive(
        b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<u@example.test>\r\n"
    )
    assert events == [Send(b"220 2.0.0 Ready to start TLS\r\n"), StartTLS()]
    assert conn.paused
    assert conn.receive(b"DATA\r\n") == []  # late plaintext before the handshake: discarded too
    assert conn.tls_started(TLS) == []
    assert conn.state is State.GREETED
    assert held_bytes(conn) == 0
    assert conn.receive(b"MAIL FROM:<a@example.net>\r\n") == [
        Send(b"503 5.5.1 Error: send HELO/EHLO first\r\n")
    ]


def test_starttls_resets_helo_and_auth_is_never_in_clear_where_tls_is_offered() -> None:
    """Postfix's smtpd_tls_auth_only: where STARTTLS is offered, AUTH waits for it (not
    even announced before), whatever FORCETLS says; inside TLS it works."""
    srv = ready(policy(starttls_available=True, auth_mechanisms=("PLAIN",)))
    assert not any("AUTH" in line for line in srv.send("EHLO client.example\r\n"))
    reply = srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2"))
    assert reply == "530 5.7.0 Must issue a STARTTLS command first"
    assert srv.conn.auth_user is None
    assert srv.cmd("STARTTLS").startswith("220")
    assert srv.conn.helo is None
    assert srv.conn.tls == TLS


def test_auth_in_clear_only_on_a_listener_without_tls() -> None:
    srv = ready(policy(starttls_available=False, auth_mechanisms=("PLAIN",)))
    assert "250-AUTH PLAIN" in srv.send("EHLO client.example\r\n")
    assert srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2")).startswith("235")


STARTTLS_CASES = [
    (
        "with argument",
        {"starttls_available": True},
        ["EHLO x"],
        "STARTTLS now",
        "501 5.5.4 Syntax: STARTTLS",
    ),
    (
        "inside TLS",
        {"starttls_available": True, "tls_active": True},
        ["EHLO x"],
        "STARTTLS",
        "503 5.5.1 Error: TLS already active",
    ),
    (
        "before EHLO",
        {"starttls_available": True},
        [],
        "STARTTLS",
        "503 5.5.1 Error: send HELO/EHLO first",
    ),
    (
        "in a transaction",
        {"starttls_available": True},
        ["EHLO x", "MAIL FROM:<>"],
        "STARTTLS",
        "503 5.5.1 Error: MAIL transaction in progress",
    ),
    (
        "second STARTTLS",
        {"starttls_available": True},
        ["EHLO x", "STARTTLS", "EHLO x"],
        "STARTTLS",
        "503 5.5.1 Error: TLS already active",
    ),
]


@pytest.mark.parametrize(
    ("name", "overrides", "setup", "line", "reply"),
    STARTTLS_CASES,
    ids=[c[0] for c in STARTTLS_CASES],
)
def test_starttls_refusals(
    name: str, overrides: dict[str, object], setup: list[str], line: str, reply: str
) -> None:
    srv = Server(policy(**overrides))
    for cmd in setup:
        srv.cmd(cmd)
    starts = srv.tls_starts
    assert srv.cmd(line) == reply
    assert srv.tls_starts == starts


# ----- AUTH -------------------------------------------------------------------------------

AUTH_POLICY = {
    "tls_active": True,
    "tls_info": TLS,
    "auth_mechanisms": ("PLAIN", "LOGIN", "CRAM-MD5"),
}

AUTH_CASES = [
    (
        "PLAIN initial",
        ["AUTH PLAIN " + b64("\0bob\0hunter2")],
        ["235 2.7.0 Authentication successful"],
    ),
    (
        "PLAIN with authzid = authcid",
        ["AUTH PLAIN " + b64("bob\0bob\0hunter2")],
        ["235 2.7.0 Authentication successful"],
    ),
    (
        "PLAIN other authzid",
        ["AUTH PLAIN " + b64("root\0bob\0hunter2")],
        ["535 5.7.8 Error: authentication failed"],
    ),
    (
        "PLAIN 334 then response",
        ["AUTH PLAIN", b64("\0bob\0hunter2")],
        ["334 ", "235 2.7.0 Authentication successful"],
    ),
    (
        "PLAIN lower-case mechanism",
        ["auth plain " + b64("\0bob\0hunter2")],
        ["235 2.7.0 Authentication successful"],
    ),
    (
        "PLAIN wrong password",
        ["AUTH PLAIN " + b64("\0bob\0wrong")],
        ["535 5.7.8 Error: authentication failed"],
    ),
    (
        "PLAIN unknown user",
        ["AUTH PLAIN " + b64("\0mallory\0hunter2")],
        ["535 5.7.8 Error: authentication failed"],
    ),
    ("PLAIN '=' empty initial", ["AUTH PLAIN ="], ["501 5.5.2 Error: malformed PLAIN response"]),
    (
        "PLAIN two fields",
        ["AUTH PLAIN " + b64("bob\0hunter2")],
        ["501 5.5.2 Error: malformed PLAIN response"],
    ),
    (
        "PLAIN bad base64",
        ["AUTH PLAIN AGJvYgBodW50ZXIy!"],
        ["501 5.5.2 Error: cannot decode response"],
    ),
    (
        "PLAIN bad padding",
        ["AUTH PLAIN AGJvYgBodW50ZXIy="],
        ["501 5.5.2 Error: cannot decode response"],
    ),
    (
        "PLAIN not UTF-8",
        ["AUTH PLAIN " + b64(b"\0b\xffb\0x")],
        ["501 5.5.2 Error: response is not UTF-8"],
    ),
    (
        "PLAIN user with CR",
        ["AUTH PLAIN " + b64("\0bo\rb\0hunter2")],
        ["535 5.7.8 Error: authentication failed"],
    ),
    ("PLAIN cancelled", ["AUTH PLAIN", "*"], ["334 ", "501 5.7.0 Error: authentication aborted"]),
    (
        "LOGIN",
        ["AUTH LOGIN", b64("bob"), b64("hunter2")],
        ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"],
    ),
    (
        "LOGIN initial user",
        ["AUTH LOGIN " + b64("bob"), b64("hunter2")],
        ["334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"],
    ),
    (
        "LOGIN wrong",
        ["AUTH LOGIN", b64("bob"), b64("nope")],
        ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "535 5.7.8 Error: authentication failed"],
    ),
    (
        "LOGIN cancelled at password",
        ["AUTH LOGIN", b64("bob"), "*"],
        ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "501 5.7.0 Error: authentication aborted"],
    ),
    (
        "LOGIN bad base64",
        ["AUTH LOGIN", "%%%"],
        ["334 VXNlcm5hbWU6", "501 5.5.2 Error: cannot decode response"],
    ),
    (
        "unknown mechanism",
        ["AUTH GSSAPI"],
        ["504 5.5.4 Error: unsupported authentication mechanism"],
    ),
    ("no mechanism", ["AUTH"], ["501 5.5.4 Syntax: AUTH mechanism [initial-response]"]),
    ("too many words", ["AUTH PLAIN a b"], ["501 5.5.4 Syntax: AUTH mechanism [initial-response]"]),
    (
        "CRAM-MD5 with initial response",
        ["AUTH CRAM-MD5 abc"],
        ["501 5.5.4 Error: CRAM-MD5 takes no initial response"],
    ),
]


@pytest.mark.parametrize(("name", "lines", "replies"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_auth(name: str, lines: list[str], replies: list[str]) -> None:
    srv = ready(policy(**AUTH_POLICY))
    got = [srv.cmd(line) for line in lines]
    assert got == replies
    assert srv.conn.auth_user == ("bob" if replies[-1].startswith("235") else None)
    assert srv.conn.state is State.READY


@pytest.mark.parametrize(
    ("lines", "reason", "user"),
    [
        (["AUTH PLAIN !!!"], "bad-base64", None),
        (["AUTH PLAIN", "*"], "aborted", None),
        (["AUTH PLAIN " + b64(b"\0bob\0\xff")], "bad-utf8", None),
        (["AUTH PLAIN " + b64("no nuls")], "malformed", None),
        (["AUTH PLAIN " + b64("eve\0bob\0pw")], "authzid", "bob"),
        (["AUTH PLAIN " + b64("\0bad:name\0pw")], "bad-name", "bad:name"),
        (["AUTH LOGIN", "="], "bad-name", None),
        (["AUTH LOGIN", b64("bob"), "x" * 5000], "too-long", "bob"),
    ],
)
def test_auth_refused_by_the_core_is_reported(
    lines: list[str], reason: str, user: str | None
) -> None:
    """Every AUTH failure the server never sees as an AuthRequest still reaches its log."""
    srv = ready(policy(**AUTH_POLICY))
    for line in lines:
        srv.cmd(line)
    assert srv.auth_rejected == [AuthRejected(lines[0].split()[1], user, reason)]
    assert not any(isinstance(e, AuthRequest) for e in srv.events)
    assert srv.conn.state is State.READY


def test_auth_temporary_failure_is_454_and_not_counted() -> None:
    conn = SMTPConnection(policy(**AUTH_POLICY))
    conn.start()
    conn.receive(b"EHLO x\r\n")
    for _ in range(5):
        conn.receive(("AUTH PLAIN " + b64("\0bob\0pw") + "\r\n").encode())
        (reply,) = conn.auth_result(None, temporary=True)
        assert reply == Send(b"454 4.7.0 Temporary authentication failure, try again later\r\n")
    assert conn.state is State.READY


def test_auth_request_keeps_password_out_of_repr() -> None:
    conn = SMTPConnection(policy(**AUTH_POLICY))
    conn.start()
    conn.receive(b"EHLO x\r\n")
    (event,) = conn.receive(("AUTH PLAIN " + b64("\0bob\0hunter2") + "\r\n").encode())
    assert event == AuthRequest("PLAIN", "bob", password="hunter2")
    assert "hunter2" not in repr(event)
    assert conn.paused


def test_cram_md5_challenge_and_response() -> None:
    srv = ready(policy(**AUTH_POLICY))
    challenge_line = srv.cmd("AUTH CRAM-MD5")
    assert challenge_line.startswith("334 ")
    challenge = base64.b64decode(challenge_line[4:]).decode()
    assert challenge.startswith("<") and challenge.endswith(f"@{HOST}>")
    digest = hmac.new(b"s3cret pass", challenge.encode(), hashlib.md5).hexdigest()
    assert srv.cmd(b64(f"alice@example.test {digest}")) == "235 2.7.0 Authentication successful"
    assert srv.conn.auth_user == "alice@example.test"
    request = next(e for e in srv.events if isinstance(e, AuthRequest))
    assert (request.challenge, request.response, request.password) == (challenge, digest, None)


def test_cram_md5_challenges_differ_and_bad_response_fails() -> None:
    srv = ready(policy(**AUTH_POLICY))
    first = srv.cmd("AUTH CRAM-MD5")
    assert (
        srv.cmd(b64("alice@example.test " + "0" * 32)) == "535 5.7.8 Error: authentication failed"
    )
    second = srv.cmd("AUTH CRAM-MD5")
    assert first != second
    assert (
        srv.cmd(b64("alice@example.test nothex")) == "501 5.5.2 Error: malformed CRAM-MD5 response"
    )


def test_second_auth_refused() -> None:
    srv = ready(policy(**AUTH_POLICY))
    srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2"))
    assert (
        srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2")) == "503 5.5.1 Error: already authenticated"
    )


def test_auth_in_transaction_and_before_ehlo_refused() -> None:
    srv = Server(policy(**AUTH_POLICY))
    assert srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2")) == "503 5.5.1 Error: send HELO/EHLO first"
    srv.cmd("EHLO x")
    srv.cmd("MAIL FROM:<>")
    assert (
        srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2"))
        == "503 5.5.1 Error: MAIL transaction in progress"
    )


def test_auth_mechanism_not_offered_is_refused() -> None:
    srv = ready(policy(tls_active=True, auth_mechanisms=("PLAIN",)))
    assert srv.cmd("AUTH CRAM-MD5") == "504 5.5.4 Error: unsupported authentication mechanism"


def test_auth_failures_drop_the_session() -> None:
    srv = ready(policy(**AUTH_POLICY, max_auth_failures=3, max_errors=50))
    for _ in range(3):
        assert (
            srv.cmd("AUTH PLAIN " + b64("\0bob\0wrong")) == "535 5.7.8 Error: authentication failed"
        )
    assert (
        srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2")) == f"421 4.7.0 {HOST} Error: too many errors"
    )
    assert srv.closed


def test_auth_line_too_long() -> None:
    srv = ready(policy(**AUTH_POLICY))
    srv.cmd("AUTH PLAIN")
    assert srv.cmd("A" * 5000) == "500 5.5.2 Error: line too long"
    assert srv.conn.state is State.READY


def test_pipelined_input_waits_for_auth_result() -> None:
    conn = SMTPConnection(policy(**AUTH_POLICY))
    conn.start()
    conn.receive(b"EHLO x\r\n")
    data = ("AUTH PLAIN " + b64("\0bob\0hunter2") + "\r\nMAIL FROM:<a@example.net>\r\n").encode()
    events = conn.receive(data)
    assert [type(e) for e in events] == [AuthRequest]
    assert conn.receive(b"RCPT TO:<x@elsewhere.test>\r\n") == []  # buffered, not executed
    assert conn.auth_result("bob") == [
        Send(b"235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    ]


# ----- errors, limits, pipelining, shutdown, timeout ----------------------------------------


def test_too_many_errors_closes_with_421() -> None:
    srv = ready(policy(max_errors=3))
    for _ in range(3):
        assert srv.cmd("BOGUS").startswith("502")
    assert srv.cmd("NOOP") == f"421 4.7.0 {HOST} Error: too many errors"
    assert srv.closed


def test_command_line_too_long() -> None:
    srv = ready()
    assert srv.send("NOOP " + "x" * 5000 + "\r\n") == ["500 5.5.2 Error: line too long"]
    assert held_bytes(srv.conn) < 4096 + 1
    assert srv.cmd("NOOP") == "250 2.0.0 Ok"


def test_command_line_limit_is_exact() -> None:
    srv = ready()
    line = "NOOP " + "x" * (4096 - len("NOOP ") - 2)
    assert srv.cmd(line) == "250 2.0.0 Ok"
    assert srv.cmd(line + "x") == "500 5.5.2 Error: line too long"


def test_long_line_in_pieces_stays_bounded() -> None:
    srv = ready()
    for _ in range(100):
        assert srv.send("y" * 1000) == []
        assert held_bytes(srv.conn) <= 4096
    assert srv.send("\r\n") == ["500 5.5.2 Error: line too long"]


def test_bare_lf_in_command_strict_closes() -> None:
    srv = ready()
    assert srv.send("NOOP\n") == [f"550 5.5.2 {HOST} Error: bare <LF> received"]
    assert srv.closed


def test_bare_lf_in_command_tolerated_when_enabled() -> None:
    srv = ready(policy(bare_lf=True))
    assert srv.send("NOOP\n") == ["250 2.0.0 Ok"]


REPLY = "554 5.5.0 Error: SMTP protocol synchronization"
PIPELINING_CASES = [
    ("pre-greeting", None, b"EHLO x\r\n", [REPLY], True),
    ("EHLO + MAIL", "", b"EHLO x\r\nMAIL FROM:<a@example.net>\r\n", [REPLY], True),
    (
        "HELO then pipelined group",
        "HELO x",
        b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.test>\r\n",
        [REPLY],
        True,
    ),
    (
        "DATA + content",
        "EHLO x",
        b"MAIL FROM:<>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nSubject: x\r\n",
        ["250 2.1.0 Ok", "250 2.1.5 Ok", REPLY],
        True,
    ),
    ("NOOP not last", "EHLO x", b"NOOP\r\nNOOP\r\n", [REPLY], True),
    (
        "legal group",
        "EHLO x",
        b"MAIL FROM:<>\r\nRCPT TO:<u@example.test>\r\nRCPT TO:<v@example.test>\r\nDATA\r\n",
        ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"],
        False,
    ),
    (
        "RSET MAIL RCPT NOOP",
        "EHLO x",
        b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.test>\r\nNOOP\r\n",
        ["250 2.0.0 Ok", "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok"],
        False,
    ),
    ("QUIT with trailing junk", "EHLO x", b"QUIT\r\ngarbage", [f"221 2.0.0 {HOST} Bye"], True),
]


@pytest.mark.parametrize(
    ("name", "helo", "data", "replies", "closed"),
    PIPELINING_CASES,
    ids=[c[0] for c in PIPELINING_CASES],
)
def test_pipelining(
    name: str, helo: str | None, data: bytes, replies: list[str], closed: bool
) -> None:
    srv = Server(auto_start=helo is not None)
    if helo is None:
        srv.handle(srv.conn.receive(data))
        srv.handle(srv.conn.start())
        assert srv.lines() == replies
    else:
        if helo:
            srv.cmd(helo)
        assert srv.send(data) == replies
    assert srv.closed == closed


def test_pipelining_check_can_be_disabled() -> None:
    srv = Server(policy(reject_unauth_pipelining=False), auto_start=False)
    srv.handle(srv.conn.receive(b"EHLO x\r\nNOOP\r\n"))
    srv.handle(srv.conn.start())
    assert srv.lines()[0] == f"220 {HOST} ESMTP"
    assert srv.lines()[-1] == "250 2.0.0 Ok"


def test_pipelined_next_transaction_waits_for_queue() -> None:
    conn = SMTPConnection(policy())
    conn.start()
    conn.receive(b"EHLO x\r\n")
    conn.receive(b"MAIL FROM:<>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    events = conn.receive(
        b"hello\r\n.\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<v@example.test>\r\nDATA\r\n"
    )
    assert conn.state is State.WAIT_QUEUE and conn.paused
    assert not any(isinstance(e, Send) for e in events)
    events = conn.message_queued("ABC")
    assert events[0] == Send(
        b"250 2.0.0 Ok: queued as ABC\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    assert isinstance(events[1], MessageStart) and events[1].recipients == ("v@example.test",)


def test_pending_input_is_bounded_while_waiting() -> None:
    srv = in_data(policy(max_pending=8192))
    conn = srv.conn  # driven by hand from here: the queue never answers
    events = conn.receive(b"x\r\n.\r\n")
    assert conn.state is State.WAIT_QUEUE
    assert events[-1].__class__.__name__ == "MessageEnd"
    assert conn.receive(b"NOOP\r\n" * 1000) == []
    events = conn.receive(b"NOOP\r\n" * 500)
    assert events == [Send(b"421 4.7.0 Error: too much pipelined input\r\n"), Close()]
    assert held_bytes(conn) == 0


def test_shutdown_when_idle_and_mid_transaction() -> None:
    srv = ready()
    srv.handle(srv.conn.shutdown())
    assert srv.lines()[-1] == f"421 4.3.2 {HOST} Service shutting down, closing channel"
    assert srv.closed

    srv = in_data()
    srv.handle(srv.conn.shutdown())
    assert not srv.closed  # the message in flight may finish
    assert srv.send("body\r\n.\r\n") == [
        "250 2.0.0 Ok: queued as Q1",
        f"421 4.3.2 {HOST} Service shutting down, closing channel",
    ]
    assert srv.closed


def test_mail_after_shutdown_request_gets_421() -> None:
    conn = SMTPConnection(policy())
    conn.start()
    conn.receive(b"EHLO x\r\n")
    conn.receive(b"MAIL FROM:<")  # a partial command is in the buffer: not idle
    assert conn.shutdown() == []
    events = conn.receive(b"a@example.net>\r\n")
    assert events == [
        Send(f"421 4.3.2 {HOST} Service shutting down, closing channel\r\n".encode()),
        Close(),
    ]


def test_timeout() -> None:
    srv = in_data()
    srv.handle(srv.conn.timeout())
    assert srv.lines()[-1] == f"421 4.4.2 {HOST} Error: timeout exceeded"
    assert srv.messages[0].aborted == "timeout"
    assert srv.closed


def test_connection_lost_in_data_aborts() -> None:
    srv = in_data()
    srv.handle(srv.conn.connection_lost())
    assert srv.messages[0].aborted == "connection lost"
    assert srv.conn.closed


def test_message_failed_replies_and_resets() -> None:
    srv = Server(fail_queue=True)
    srv.cmd("EHLO x")
    srv.cmd("MAIL FROM:<>")
    srv.cmd("RCPT TO:<u@example.test>")
    srv.cmd("DATA")
    assert srv.send("x\r\n.\r\n") == ["451 4.3.0 Error: queue file write error"]
    assert srv.conn.state is State.READY
    assert srv.cmd("RCPT TO:<u@example.test>") == "503 5.5.1 Error: need MAIL command"


USAGE_ERRORS = [
    ("auth_result outside AUTH", lambda c: c.auth_result("bob")),
    ("message_queued outside DATA", lambda c: c.message_queued("Q")),
    ("message_failed outside DATA", lambda c: c.message_failed()),
    ("tls_started without STARTTLS", lambda c: c.tls_started(TLS)),
    ("start twice", lambda c: c.start()),
]


@pytest.mark.parametrize(("name", "call"), USAGE_ERRORS, ids=[c[0] for c in USAGE_ERRORS])
def test_out_of_turn_calls_raise(name: str, call: object) -> None:
    conn = SMTPConnection(policy())
    conn.start()
    with pytest.raises(ProtocolUsageError, match=r"called in state greeted"):
        call(conn)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("reply", "queue_id"), [("250 ok", "Q"), ("451 4.3.0 x\r\n", "Q"), ("451 ok", "a b")]
)
def test_bad_server_replies_raise(reply: str, queue_id: str) -> None:
    conn = in_data().conn
    conn.receive(b"x\r\n.\r\n")
    with pytest.raises(ProtocolUsageError):
        if queue_id == "Q":
            conn.message_failed(reply)
        else:
            conn.message_queued(queue_id)


POLICY_ERRORS = [
    ({"hostname": "mx\r\nevil"}, "Policy.hostname contains CR, LF or NUL"),
    ({"hostname": ""}, "Policy.hostname must be one non-empty word"),
    ({"greeting": "hi\nthere"}, "Policy.greeting contains CR, LF or NUL"),
    ({"greeting": "h\x7fllo"}, "Policy.greeting must be printable"),
    ({"hostname": "mx\x7f"}, "Policy.hostname must be printable ASCII"),
    ({"auth_mechanisms": ("PLAIN", "NTLM")}, "unknown mechanisms \\['NTLM'\\]"),
    ({"auth_mechanisms": ("PLAIN", "PLAIN")}, "repeats a name"),
    ({"databytes": -1}, "Policy.databytes must be >= 0"),
    ({"max_line": 100}, "Policy.max_line must be >= 512"),
    ({"max_errors": 0}, "Policy.max_errors must be >= 1"),
    ({"max_pending": 600}, "Policy.max_pending must be at least Policy.max_line"),
]


@pytest.mark.parametrize(("overrides", "message"), POLICY_ERRORS)
def test_policy_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy(**overrides)


def test_policy_is_frozen() -> None:
    pol: Policy = policy()
    with pytest.raises(AttributeError):
        pol.relay_client = True  # type: ignore[misc]


def test_empty_read_and_calls_after_close_do_nothing() -> None:
    srv = ready()
    assert srv.conn.receive(b"") == []
    srv.cmd("QUIT")
    assert srv.conn.timeout() == []
    assert srv.conn.shutdown() == []
    assert srv.conn.receive(b"NOOP\r\n") == []


def test_login_with_empty_user_name() -> None:
    srv = ready(policy(**AUTH_POLICY))
    assert srv.cmd("AUTH LOGIN =") == "501 5.5.2 Error: empty user name"


def test_second_ehlo_resets_transaction_but_not_auth() -> None:
    srv = ready(policy(**AUTH_POLICY))
    srv.cmd("AUTH PLAIN " + b64("\0bob\0hunter2"))
    srv.cmd("MAIL FROM:<a@example.net>")
    assert srv.cmd("EHLO again").startswith("250 ")
    assert srv.cmd("RCPT TO:<u@example.test>") == "503 5.5.1 Error: need MAIL command"
    assert srv.conn.auth_user == "bob"


def test_auth_result_with_invalid_name_is_a_failure() -> None:
    conn = SMTPConnection(policy(**AUTH_POLICY))
    conn.start()
    conn.receive(b"EHLO x\r\n")
    conn.receive(("AUTH PLAIN " + b64("\0bob\0hunter2") + "\r\n").encode())
    assert conn.auth_result("bad name\r\n") == [Send(b"535 5.7.8 Error: authentication failed\r\n")]
    assert conn.auth_user is None


def test_shutdown_while_waiting_for_auth_closes_after_the_answer() -> None:
    conn = SMTPConnection(policy(**AUTH_POLICY))
    conn.start()
    conn.receive(b"EHLO x\r\n")
    conn.receive(("AUTH PLAIN " + b64("\0bob\0hunter2") + "\r\n").encode())
    assert conn.shutdown() == []
    assert conn.auth_result("bob") == [
        Send(
            b"235 2.7.0 Authentication successful\r\n"
            + f"421 4.3.2 {HOST} Service shutting down, closing channel\r\n".encode()
        ),
        Close(),
    ]


def test_utf8_greeting_is_sent_as_utf8() -> None:
    srv = Server(policy(greeting="mx.example.test ESMTP h\u00e9"))
    assert bytes(srv.out) == "220 mx.example.test ESMTP h\u00e9\r\n".encode()
