"""rspamd is told the client's forward-confirmed host name (``Hostname``), through a real
pyqmail-smtpd, a real knotd (``tests/dnsserver.py``) serving the PTR and A records of a few
127.0.0.x addresses, and a real rspamd with its hfilter module on (the role turns it off
only with ``pyqmail_scanners__rspamd_offline``; ``check_local`` so that it judges loopback
clients too). hfilter's ``HFILTER_HOSTNAME_UNKNOWN`` (+2.5) shows in the queued message's
``X-Spamd-Result``: gone for a client with a confirmed name, still there for one without.

=============  ==========================================  ===============================
source         PTR                                         forward-confirmed
=============  ==========================================  ===============================
127.0.0.5      mail.hosts.test                             yes (A 127.0.0.5)
127.0.0.7      mail.hosts.test (a PTR its owner chose)     no: mail is 127.0.0.5 only
127.0.0.12     none                                        no
=============  ==========================================  ===============================
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest

from tests.dnsserver import DnsServer, recording, silent_server
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.scanners import Rspamd

NAMED, LIAR, NAMELESS = "127.0.0.5", "127.0.0.7", "127.0.0.12"
ZONES = {
    "0.0.127.in-addr.arpa.": "5 PTR mail.hosts.test.\n7 PTR mail.hosts.test.\n",
    "hosts.test.": "mail A 127.0.0.5\n",
}
MESSAGE = (
    b"From: Alice <alice@client.test>\r\nTo: <u@mx.test>\r\nSubject: lunch\r\n"
    b"Message-ID: <1@client.test>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n\r\n"
    b"Hi Bob, lunch tomorrow at noon?\r\n"
)
UNKNOWN = "HFILTER_HOSTNAME_UNKNOWN"


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


@pytest.fixture(scope="module")
def hfilter_rspamd() -> Iterator[Rspamd]:
    with Rspamd(keep=("hfilter",), local={"hfilter.conf": "check_local = true;\n"}) as server:
        yield server


@pytest.fixture
def scanned(qmail_root: QmailRoot, hfilter_rspamd: Rspamd) -> QmailRoot:
    home = qmail_root.path / "homes" / "u"
    home.mkdir(parents=True)
    qmail_root.write("users/mailboxes", f"u:{home}\n")
    qmail_root.control("rspamd", f"{hfilter_rspamd.address}\n")
    return qmail_root


def resolver(root: QmailRoot, address: tuple[str, int], seconds: int = 5) -> None:
    root.control("dnsresolver", f"{address[0]}@{address[1]}\n")
    root.control("dnsbltimeout", f"{seconds}\n")


def send_from(port: int, source: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        s.mail("alice@client.test")
        s.rcpt("u@mx.test")
        return s.data(MESSAGE)


def spamd_result(root: QmailRoot) -> str:
    """The X-Spamd-Result field of the one queued message that has one, unfolded."""
    found = []
    for _, body in root.queued():
        head = body.split(b"\r\n\r\n", 1)[0].decode()
        fields = head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
        found += [f for f in fields if f.startswith("X-Spamd-Result:")]
    [result] = found
    return result


@pytest.mark.parametrize(
    "case",
    [(NAMED, "mail.hosts.test", False), (LIAR, "unknown", True), (NAMELESS, "unknown", True)],
    ids=["confirmed", "ptr-not-confirmed", "no-ptr"],
)
def test_rspamd_hears_the_confirmed_name_and_only_that(
    scanned: QmailRoot, smtpd: StartDaemon, dns: DnsServer, case: tuple[str, str, bool]
) -> None:
    source, host, unknown = case
    resolver(scanned, (dns.host, dns.port))
    d = smtpd()
    code, text = send_from(d.port, source)
    assert code == 250, text
    result = spamd_result(scanned)
    assert (UNKNOWN in result) is unknown, result
    d.wait_for(rf"msg qid=\S+ .*ip={source.replace('.', '[.]')} .*host={host} scan=\w+ ")


def test_the_name_is_looked_up_once_per_session_at_the_connection(
    scanned: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    """The PTR and A queries go out when the client connects (before it says anything),
    once for all the session's messages."""
    with recording((dns.host, dns.port)) as (address, queries):
        resolver(scanned, address)
        d = smtpd()
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30, source_address=(NAMED, 0)) as s:
            deadline = time.monotonic() + 5
            while len(queries) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert queries == [("5.0.0.127.in-addr.arpa.", "PTR"), ("mail.hosts.test.", "A")]
            for _ in range(2):
                assert s.sendmail("alice@client.test", ["u@mx.test"], MESSAGE) == {}
        assert len(queries) == 2
    assert len(scanned.queued()) == 2


def test_an_unscanned_client_asks_no_dns(
    scanned: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    """SCAN="0" for this client: its name is never looked up."""
    rules = f'{NAMED}:allow,SCAN="0"\n:allow\n'
    with recording((dns.host, dns.port)) as (address, queries):
        resolver(scanned, address)
        d = smtpd(rules_cdb=scanned.rules(rules))
        assert send_from(d.port, NAMED)[0] == 250
        assert queries == []
    [(_, body)] = scanned.queued()
    assert b"X-Spamd-Result" not in body


def test_a_dns_server_that_never_answers_costs_at_most_dnsbltimeout(
    scanned: QmailRoot, smtpd: StartDaemon
) -> None:
    """An unscanned client does not wait at all; a scanned one at most dnsbltimeout (1 s)
    in all, and is scanned as unknown."""
    rules = f'{NAMED}:allow,SCAN="0"\n:allow\n'
    with silent_server() as silent:
        resolver(scanned, silent, seconds=1)
        d = smtpd(rules_cdb=scanned.rules(rules))
        began = time.monotonic()
        assert send_from(d.port, NAMED)[0] == 250
        assert time.monotonic() - began < 0.9
        began = time.monotonic()
        assert send_from(d.port, NAMELESS)[0] == 250
        assert time.monotonic() - began < 3
    assert UNKNOWN in spamd_result(scanned)
    d.wait_for(r"msg qid=\S+ .*ip=127[.]0[.]0[.]12 .*host=unknown scan=\w+ ")
    d.wait_for(r"host-fail ip=127[.]0[.]0[.]12 error=TimeoutError")


def test_a_host_rule_and_rspamd_share_one_lookup(
    scanned: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    """The name tcprules looked up for a ``=host`` rule is the one rspamd is told; DNS is
    asked once."""
    rules = "=mail.hosts.test:allow\n:allow\n"
    with recording((dns.host, dns.port)) as (address, queries):
        resolver(scanned, address)
        d = smtpd(rules_cdb=scanned.rules(rules))
        assert send_from(d.port, NAMED)[0] == 250
        assert queries == [("5.0.0.127.in-addr.arpa.", "PTR"), ("mail.hosts.test.", "A")]
    assert UNKNOWN not in spamd_result(scanned)
