"""The core's hooks for authenticated sessions (Policy.sender_check, Policy.rcpt_check): called
only after AUTH, after MAIL's (RCPT's) own checks; a 5xx counts as an error, a 4xx does not."""

from __future__ import annotations

import base64

from test_protocol_support import USERS, Server, policy, ready

from pyqmail.protocol import Policy

calls: list[tuple[str, object]] = []


def sender_check(login: str, sender: str) -> str | None:
    calls.append((login, sender))
    if sender.endswith("@bank.example"):
        return "553 5.7.1 not yours"
    return "450 4.7.1 too many" if sender == "busy@example.test" else None


def rcpt_check(login: str, count: int) -> str | None:
    calls.append((login, count))
    return "450 4.7.1 too many recipients" if count > 2 else None


def hooked(**overrides: object) -> Policy:
    return policy(
        auth_mechanisms=("PLAIN",),
        relay_client=False,
        sender_check=sender_check,
        rcpt_check=rcpt_check,
        max_errors=3,
        **overrides,
    )


def login(srv: Server) -> None:
    token = base64.b64encode(f"\0alice@example.test\0{USERS['alice@example.test']}".encode())
    assert srv.cmd(f"AUTH PLAIN {token.decode()}").startswith("235")


def test_not_called_without_auth() -> None:
    calls.clear()
    srv = ready(hooked())
    assert srv.cmd("MAIL FROM:<ceo@bank.example>").startswith("250")
    assert srv.cmd("RCPT TO:<user@example.test>").startswith("250")
    assert calls == []


def test_refusals_and_counts_after_auth() -> None:
    calls.clear()
    srv = ready(hooked())
    login(srv)
    assert srv.cmd("MAIL FROM:<ceo@bank.example>") == "553 5.7.1 not yours"
    assert srv.cmd("MAIL FROM:<busy@example.test>") == "450 4.7.1 too many"
    assert srv.cmd("MAIL FROM:<alice@example.test>").startswith("250")
    assert srv.cmd("RCPT TO:<a@example.test>").startswith("250")
    assert srv.cmd("RCPT TO:<b@example.test>").startswith("250")
    assert srv.cmd("RCPT TO:<c@example.test>") == "450 4.7.1 too many recipients"
    assert srv.cmd("RCPT TO:<d@example.test>") == "450 4.7.1 too many recipients"
    assert calls[:3] == [
        ("alice@example.test", "ceo@bank.example"),
        ("alice@example.test", "busy@example.test"),
        ("alice@example.test", "alice@example.test"),
    ]
    assert calls[3:] == [("alice@example.test", n) for n in (1, 2, 3, 3)]
    # Only the 553 counted as an error (max_errors=3): two more 553s close the session.
    srv.cmd("RSET")
    assert srv.cmd("MAIL FROM:<ceo@bank.example>").startswith("553")
    assert srv.cmd("MAIL FROM:<ceo@bank.example>").startswith("553")
    assert srv.cmd("NOOP").startswith("421")


def test_a_refused_mail_leaves_no_transaction() -> None:
    srv = ready(hooked())
    login(srv)
    assert srv.cmd("MAIL FROM:<ceo@bank.example>").startswith("553")
    assert srv.cmd("RCPT TO:<a@example.test>").startswith("503")
