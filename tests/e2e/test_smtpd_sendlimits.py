"""Sending limits per AUTH login (issue 16, item 6): counted across workers, daemons and
restarts, through the shared state file, with real smtplib sessions."""

from __future__ import annotations

import smtplib
import sqlite3
import time

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

USERS = {"alice@mx.test": "alice-pw-123", "bob@mx.test": "bob-pw-12345"}
MESSAGE = b"From: alice@mx.test\r\nSubject: limits\r\n\r\nHello.\r\n"


def session(d: Daemon, pki: PKI, login: str = "alice@mx.test") -> smtplib.SMTP_SSL:
    s = smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=client_context(pki))
    s.ehlo("laptop.test")
    s.login(login, USERS[login])
    return s


def send(d: Daemon, pki: PKI, rcpts: int = 1, login: str = "alice@mx.test") -> None:
    with session(d, pki, login) as s:
        to = [f"friend{i}@elsewhere.test" for i in range(rcpts)]
        s.sendmail(login, to, MESSAGE.replace(b"alice@mx.test", login.encode()))


def counted(root: QmailRoot, login: str = "alice@mx.test") -> tuple[int, int]:
    """What the shared state holds for ``login`` (the daemons write it from a thread)."""
    with sqlite3.connect(root.path / "smtpd" / "authstate.sqlite", timeout=5) as db:
        row = db.execute(
            "SELECT sum(messages), sum(recipients) FROM sent WHERE login=?", (login,)
        ).fetchone()
    return int(row[0] or 0), int(row[1] or 0)


def wait_counted(root: QmailRoot, messages: int) -> None:
    deadline = time.monotonic() + 10
    while counted(root)[0] < messages:
        assert time.monotonic() < deadline, f"only {counted(root)} counted"
        time.sleep(0.05)


@pytest.fixture
def limited(qmail_root: QmailRoot) -> QmailRoot:
    qmail_root.users(USERS)
    qmail_root.control("authmsgsperhour", "3\n")
    qmail_root.control("authrcptsperhour", "5\n")
    return qmail_root


def assert_mail_deferred(d: Daemon, pki: PKI, login: str = "alice@mx.test") -> None:
    with session(d, pki, login) as s:
        code, reply = s.mail(login)
        assert (code, reply[:5]) == (450, b"4.7.1"), reply


def test_messages_per_hour_over_two_daemons_and_a_restart(
    limited: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    """Two daemons (one with two workers) share the root: the limit is the login's, not a
    process's; a restart forgets nothing."""
    one = smtpd(mode="smtps", workers=2)
    two = smtpd(mode="smtps")
    send(one, pki)
    send(two, pki)
    send(one, pki)
    wait_counted(limited, 3)
    assert_mail_deferred(two, pki)
    assert_mail_deferred(one, pki)
    two.wait_for(r"send-limit ip=127\.0\.0\.1 user=alice@mx\.test messages=3 recipients=3 limit=3")
    send(one, pki, login="bob@mx.test")  # another login has its own count
    assert one.stop() == 0
    assert two.stop() == 0
    three = smtpd(mode="smtps")
    assert_mail_deferred(three, pki)
    assert len(limited.queued()) == 4


def test_recipients_per_hour_refuse_the_rcpt_that_passes_the_limit(
    limited: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    d = smtpd(mode="smtps")
    send(d, pki, rcpts=3)
    wait_counted(limited, 1)
    with session(d, pki) as s:
        s.mail("alice@mx.test")
        assert s.rcpt("a@elsewhere.test")[0] == 250
        assert s.rcpt("b@elsewhere.test")[0] == 250
        code, reply = s.rcpt("c@elsewhere.test")  # 3 + 3 > 5
        assert (code, reply[:5]) == (450, b"4.7.1"), reply
        s.data(MESSAGE)  # the two accepted recipients still get it
    d.wait_for(r"send-limit .*user=alice@mx\.test messages=1 recipients=3 adding=3 limit=5")
    wait_counted(limited, 2)
    assert counted(limited) == (2, 5)


def test_only_queued_messages_count(limited: QmailRoot, smtpd: StartDaemon, pki: PKI) -> None:
    """Refused at the end of DATA (a From not hers), RSET, or dropped: nothing counted."""
    limited.write("users/senders", "alice@mx.test: alice@mx.test\n")
    d = smtpd(mode="smtps")
    for _ in range(4):
        with session(d, pki) as s:
            s.mail("alice@mx.test")
            s.rcpt("friend@elsewhere.test")
            code, _ = s.data(b"From: ceo@bank.example\r\n\r\nHi.\r\n")
            assert code == 550
            s.rset()
    send(d, pki)
    wait_counted(limited, 1)
    assert counted(limited) == (1, 1)


def test_zero_is_no_limit_and_unauthenticated_mail_is_not_counted(
    limited: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    limited.control("authmsgsperhour", "0\n")
    limited.control("authrcptsperhour", "0\n")
    d = smtpd(mode="smtps")
    for _ in range(5):
        send(d, pki)
    assert counted(limited) == (0, 0)  # both off: not even counted
    plain = smtpd()
    with smtplib.SMTP(plain.host, plain.port, timeout=10) as s:
        s.sendmail("someone@elsewhere.test", ["user@mx.test"], MESSAGE)
    assert len(limited.queued()) == 6
