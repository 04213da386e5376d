"""Senders held to their addresses (issue 16, item 5): real smtplib sessions against a real
pyqmail-smtpd, with ``users/senders`` as the pyqmail_mailboxes role writes it.

alice owns her mailbox address in both local domains and the alias ``sales`` that delivers
to her; boss has ``senders: ['@example.test']``; carol owns nothing but her own address.
"""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import Daemon, QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

USERS = {"alice@mx.test": "alice-pw-123", "boss@mx.test": "boss-pw-1234", "carol": "carol-pw-12"}
SENDERS = """\
# login: addresses and @domains it may send as
alice@mx.test: alice@mx.test alice@example.test sales@mx.test sales@example.test
boss@mx.test: boss@mx.test boss@example.test @example.test
carol: carol@mx.test carol@example.test
"""


def message(header_from: str | None, subject: str = "senders") -> bytes:
    lines = [f"From: {header_from}"] if header_from is not None else []
    lines += ["To: friend@elsewhere.test", f"Subject: {subject}", "", "Hello."]
    return ("\r\n".join(lines) + "\r\n").encode()


@pytest.fixture
def daemon(qmail_root: QmailRoot, smtpd: StartDaemon) -> Daemon:
    qmail_root.users(USERS)
    qmail_root.write("users/senders", SENDERS)
    return smtpd(mode="smtps")


def session(d: Daemon, pki: PKI, login: str) -> smtplib.SMTP_SSL:
    s = smtplib.SMTP_SSL(d.host, d.port, timeout=10, context=client_context(pki))
    s.ehlo("laptop.test")
    s.login(login, USERS[login])
    return s


def mail_from(d: Daemon, pki: PKI, login: str, sender: str) -> int:
    with session(d, pki, login) as s:
        code, _ = s.mail(sender)
        return code


@pytest.mark.parametrize(
    ("login", "sender"),
    [
        ("alice@mx.test", "alice@mx.test"),  # own mailbox address
        ("alice@mx.test", "Alice@Example.TEST"),  # the same in the other local domain, any case
        ("alice@mx.test", "sales@example.test"),  # an alias that delivers to her
        ("boss@mx.test", "anyone@example.test"),  # senders: ['@example.test']
        ("carol", "carol@mx.test"),  # a login that is not an address
    ],
)
def test_owned_envelope_senders_are_accepted(
    daemon: Daemon, qmail_root: QmailRoot, pki: PKI, login: str, sender: str
) -> None:
    with session(daemon, pki, login) as s:
        s.sendmail(sender, ["friend@elsewhere.test"], message(sender))
    [(env, _body)] = qmail_root.queued()
    assert env.sender.lower() == sender.lower()
    assert env.meta["auth"] == login


@pytest.mark.parametrize(
    ("login", "sender"),
    [
        ("alice@mx.test", "ceo@bank.example"),  # a foreign domain
        ("alice@mx.test", "boss@mx.test"),  # another user's address
        ("alice@mx.test", "anyone@example.test"),  # boss's @domain is not hers
        ("boss@mx.test", "anyone@sub.example.test"),  # @domain is that domain, not below it
        ("boss@mx.test", "alice@mx.test"),  # @example.test does not cover mx.test
    ],
)
def test_foreign_envelope_senders_get_553_and_a_log_line(
    daemon: Daemon, qmail_root: QmailRoot, pki: PKI, login: str, sender: str
) -> None:
    with session(daemon, pki, login) as s:
        code, reply = s.mail(sender)
        assert (code, reply[:5]) == (553, b"5.7.1"), reply
        # The session goes on: an owned address is still accepted after the refusal.
        own = login if "@" in login else f"{login}@mx.test"
        s.sendmail(own, ["friend@elsewhere.test"], message(own))
    assert [env.sender for env, _ in qmail_root.queued()] == [own]
    daemon.wait_for(rf"sender-refused ip=127\.0\.0\.1 user={login} address={sender} where=mail")


@pytest.mark.parametrize(
    ("sender", "header_from"),
    [
        ("alice@mx.test", "CEO <ceo@bank.example>"),  # differs from the envelope: foreign
        ("alice@mx.test", "boss@mx.test"),  # another user's
        ("alice@mx.test", "Alice <alice@mx.test>, ceo@bank.example"),  # every one must be hers
        ("alice@mx.test", '"alice@mx.test" <ceo@bank.example>'),  # the display name is a name
        ("alice@mx.test", "<ceo@bank.example"),  # unreadable: unterminated angle address
        ("alice@mx.test", "undisclosed:;"),  # a group without a member names nobody
        ("", None),  # null sender without From: nothing ties the message to alice
        ("", "ceo@bank.example"),  # null sender, foreign From
    ],
)
def test_header_from_not_owned_gets_550_at_end_of_data(
    daemon: Daemon, qmail_root: QmailRoot, pki: PKI, sender: str, header_from: str | None
) -> None:
    with session(daemon, pki, "alice@mx.test") as s:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail(sender, ["friend@elsewhere.test"], message(header_from))
        assert refused.value.smtp_code == 550
        assert refused.value.smtp_error.startswith(b"5.7.1"), refused.value.smtp_error
        # The session goes on and its next message is judged afresh.
        s.sendmail("alice@mx.test", ["friend@elsewhere.test"], message("alice@mx.test"))
    assert [env.sender for env, _ in qmail_root.queued()] == ["alice@mx.test"]
    daemon.wait_for(r"sender-refused ip=127\.0\.0\.1 user=alice@mx\.test address=\S+ where=from")
    assert qmail_root.tmp_files() == []


@pytest.mark.parametrize(
    ("sender", "header_from"),
    [
        ("alice@mx.test", "Alice Example <alice@mx.test>"),
        ("alice@mx.test", "sales@example.test"),  # From an alias of hers, envelope her own
        ("alice@mx.test", "John Q. Public <alice@example.test>"),  # obsolete syntax is fine
        ("alice@mx.test", None),  # no From: the envelope rule already held
        ("", "alice@mx.test"),  # null sender (a vacation reply) with her From
    ],
)
def test_owned_header_from_is_accepted(
    daemon: Daemon, qmail_root: QmailRoot, pki: PKI, sender: str, header_from: str | None
) -> None:
    with session(daemon, pki, "alice@mx.test") as s:
        s.sendmail(sender, ["friend@elsewhere.test"], message(header_from))
    [(env, body)] = qmail_root.queued()
    assert env.sender == sender
    if header_from is not None:
        assert f"From: {header_from}".encode() in body


def test_null_sender_is_accepted_at_mail(daemon: Daemon, pki: PKI) -> None:
    """As Postfix's reject_sender_login_mismatch, which skips the empty sender."""
    assert mail_from(daemon, pki, "alice@mx.test", "") == 250


def test_a_long_header_with_from_at_its_end_is_still_judged(
    daemon: Daemon, qmail_root: QmailRoot, pki: PKI
) -> None:
    """The From after 60 KiB of other fields (several reads, a spilled message) counts."""
    filler = "".join(f"X-Filler-{i}: {'y' * 70}\r\n" for i in range(800)).encode()
    body = filler + message("ceo@bank.example")
    with session(daemon, pki, "alice@mx.test") as s:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("alice@mx.test", ["friend@elsewhere.test"], body + b"z" * 200_000)
        assert refused.value.smtp_code == 550
    assert qmail_root.queued() == []
    assert qmail_root.tmp_files() == []


def test_relay_clients_keep_todays_rules(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    """A relay client by IP did not log in: no map applies to it."""
    qmail_root.users(USERS)
    qmail_root.write("users/senders", SENDERS)
    cdb = qmail_root.rules('127.0.0.1:allow,RELAYCLIENT=""\n')
    d = smtpd(rules_cdb=cdb)
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.sendmail("app@bank.example", ["friend@elsewhere.test"], message("ceo@bank.example"))
    [(env, _)] = qmail_root.queued()
    assert env.sender == "app@bank.example"


def test_without_the_map_there_are_no_sender_rules(
    qmail_root: QmailRoot, smtpd: StartDaemon, pki: PKI
) -> None:
    qmail_root.users(USERS)
    d = smtpd(mode="smtps")
    with session(d, pki, "alice@mx.test") as s:
        s.sendmail("ceo@bank.example", ["friend@elsewhere.test"], message("ceo@bank.example"))
    assert len(qmail_root.queued()) == 1


def test_a_changed_map_applies_without_restart_and_a_broken_one_keeps_the_old(
    daemon: Daemon, qmail_root: QmailRoot, pki: PKI
) -> None:
    assert mail_from(daemon, pki, "carol", "helpdesk@mx.test") == 553
    qmail_root.write("users/senders", SENDERS.replace("carol: ", "carol: helpdesk@mx.test "))
    assert mail_from(daemon, pki, "carol", "helpdesk@mx.test") == 250
    broken = SENDERS.replace("carol: ", "carol: helpdesk@mx.test ") + "dave: not-an-address\n"
    qmail_root.write("users/senders", broken)
    assert mail_from(daemon, pki, "carol", "helpdesk@mx.test") == 250  # the old map stays
    daemon.wait_for(r"warning text=\S*/users/senders:5:\\x20'not-an-address'\\x20is\\x20neither")
