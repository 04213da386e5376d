"""Inbound SPF, DKIM and DMARC through a real pyqmail-smtpd (control/authchecks=1), its
resolver pointed at a real knotd by control/dnsresolver: one Authentication-Results field of
ours on top, forged ones of ours gone and other hosts' kept, p=reject refused with 550 5.7.1,
p=quarantine queued with the Junk flag, the verdicts in the log line."""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checks.test_dkimverify import dkimsign
from tests.dkim_util import KeyPair, make_keys, zone
from tests.dnsserver import DnsServer, free_port
from tests.e2e.conftest import QmailRoot, StartDaemon

SIGNER = "signer.test"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[KeyPair]:
    return make_keys(tmp_path_factory.mktemp("keys"), SIGNER)


@pytest.fixture(scope="module")
def dns_server(keys: list[KeyPair]) -> Iterator[DnsServer]:
    spf = '@ TXT "v=spf1 ip4:127.0.0.1 -all"\n'
    zones = {
        f"{SIGNER}.": zone(keys) + '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
        "bank.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
        "junk.test.": '_dmarc TXT "v=DMARC1; p=quarantine"\n@ TXT "v=spf1 -all"\n',
        "xn--bcher-kva.example.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
        "client.test.": spf,
    }
    with DnsServer(zones) as server:
        yield server


def message(from_: str, extra: str = "") -> bytes:
    return (
        f"{extra}From: <{from_}>\r\nTo: <u@mx.test>\r\nSubject: figures\r\n"
        f"Message-ID: <1@{from_.split('@')[1]}>\r\n\r\nHello,\r\nthe figures.\r\n"
    ).encode()


@pytest.fixture
def daemon(qmail_root: QmailRoot, smtpd: StartDaemon, dns_server: DnsServer):
    qmail_root.control("authchecks", "1\n")
    qmail_root.control("dnsresolver", f"{dns_server.host}@{dns_server.port}\n")
    qmail_root.control("authtimeout", "5\n")
    return smtpd()


def send(d, sender: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(d.host, d.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail(sender)
        s.rcpt("u@mx.test")
        return s.data(data)


FORGED = (
    "Authentication-Results: mx.test; dkim=pass header.d=bank.test; dmarc=pass\r\n"
    "Authentication-Results: other.example; spf=pass smtp.mailfrom=x.test\r\n"
)


def test_signed_message_passes_and_forged_results_go(
    daemon, qmail_root: QmailRoot, keys: list[KeyPair], tmp_path: Path
) -> None:
    signed = dkimsign(keys[1], message(f"alice@{SIGNER}"), tmp_path)
    code, _ = send(daemon, "bounce@client.test", FORGED.encode() + signed)
    assert code == 250
    [(env, body)] = qmail_root.queued()
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Authentication-Results: mx.test;"), head
    ours = re.findall(r"(?im)^authentication-results:\s*mx\.test;", head)
    assert len(ours) == 1, head
    assert "Authentication-Results: other.example; spf=pass" in head
    first = head.split("\r\nReceived", 1)[0]
    for part in (
        "spf=pass smtp.mailfrom=client.test",
        f"dkim=pass header.d={SIGNER}",
        f"dmarc=pass (p=reject dis=none) header.from={SIGNER}",
    ):
        assert part in first, first
    assert "junk" not in env.meta
    daemon.wait_for(r"msg qid=\S+ .*spf=pass .*dkim=pass:signer\.test .*dmarc=pass")


def test_dmarc_reject_is_refused(daemon, qmail_root: QmailRoot) -> None:
    code, text = send(daemon, "bounce@client.test", message("ceo@bank.test"))
    assert code == 550
    assert text.startswith(b"5.7.1 DMARC policy of bank.test"), text
    assert qmail_root.queued() == []
    daemon.wait_for(r"refused ip=127\.0\.0\.1 .*dmarc=fail .*dmarc_action=reject")


def test_dmarc_reject_of_an_internationalised_domain_is_answered(
    daemon, qmail_root: QmailRoot
) -> None:
    """The refusal names the A-label form: a reply line is ASCII, and the non-ASCII one
    was never sent (the client waited for the idle timeout's 421, then retried for days)."""
    code, text = send(daemon, "bounce@client.test", message("ceo@bücher.example"))
    assert code == 550
    assert text == b"5.7.1 DMARC policy of xn--bcher-kva.example rejects this message"
    assert qmail_root.queued() == []
    daemon.wait_for(r"refused ip=127\.0\.0\.1 .*dmarc=fail .*dmarc_action=reject")


def test_dmarc_quarantine_is_flagged_junk(daemon, qmail_root: QmailRoot) -> None:
    code, _ = send(daemon, "bounce@client.test", message("news@junk.test"))
    assert code == 250
    [(env, body)] = qmail_root.queued()
    assert env.meta.get("junk") == "1"
    assert b"dmarc=fail" in body.split(b"\r\n\r\n", 1)[0]


def test_actions_are_configurable(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns_server: DnsServer
) -> None:
    qmail_root.control("authchecks", "1\n")
    qmail_root.control("dnsresolver", f"{dns_server.host}@{dns_server.port}\n")
    qmail_root.control("dmarcreject", "quarantine\n")
    d = smtpd()
    assert send(d, "bounce@client.test", message("ceo@bank.test"))[0] == 250
    [(env, _)] = qmail_root.queued()
    assert env.meta.get("junk") == "1"


def test_a_large_message_is_checked_and_rewritten_too(
    daemon, qmail_root: QmailRoot, keys: list[KeyPair], tmp_path: Path
) -> None:
    """Past the 64 KiB held in memory the message streams to its tmp file; the checks read it
    back and the queued copy still has our header on top and no forged one."""
    big = message(f"alice@{SIGNER}").replace(
        b"the figures.", b"the figures.\r\n" + (b"x" * 76 + b"\r\n") * 4000
    )
    signed = dkimsign(keys[0], big, tmp_path)
    code, _ = send(daemon, "bounce@client.test", FORGED.encode() + signed)
    assert code == 250
    [(_env, body)] = qmail_root.queued()
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Authentication-Results: mx.test;"), head
    assert len(re.findall(r"(?im)^authentication-results:\s*mx\.test;", head)) == 1
    assert f"dkim=pass header.d={SIGNER}" in head
    assert len(body) > 300_000
    assert qmail_root.tmp_files() == []


def test_relay_clients_are_not_checked(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns_server: DnsServer
) -> None:
    """A relay client's own mail (origin relay) is signed later, never checked here."""
    qmail_root.control("authchecks", "1\n")
    qmail_root.control("dnsresolver", f"{dns_server.host}@{dns_server.port}\n")
    d = smtpd(rules_cdb=qmail_root.rules('127.0.0.1:allow,RELAYCLIENT=""\n'))
    assert send(d, "ceo@bank.test", message("ceo@bank.test"))[0] == 250
    [(env, body)] = qmail_root.queued()
    assert env.meta.get("origin") == "relay"
    assert b"Authentication-Results" not in body


def test_a_dead_dns_server_costs_the_budget_and_blocks_no_one(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """DNS that never answers: the message is accepted after about authtimeout seconds with
    temperror results; meanwhile the worker's loop serves other clients at once."""
    qmail_root.control("authchecks", "1\n")
    qmail_root.control("dnsresolver", f"127.0.0.1@{free_port()}\n")
    qmail_root.control("authtimeout", "2\n")
    d = smtpd()
    with smtplib.SMTP(d.host, d.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("bounce@client.test")
        s.rcpt("u@mx.test")
        s.putcmd("data")
        assert s.getreply()[0] == 354
        start = time.monotonic()
        s.send(message("ceo@bank.test").replace(b"\r\n.", b"\r\n..") + b".\r\n")
        time.sleep(0.3)
        other = d.connect()  # the loop is free while the checks wait on DNS
        assert other.reply()[0] == 220
        assert time.monotonic() - start < 1.5
        other.close()
        code, _ = s.getreply()
        elapsed = time.monotonic() - start
    assert code == 250
    assert 1.5 < elapsed < 6, elapsed
    [(_env, body)] = qmail_root.queued()
    head = body.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"Authentication-Results: mx.test;")
    assert b"dmarc=temperror" in head
