"""tcprules ``=host`` entries in a running pyqmail-smtpd: the client's forward-confirmed name.

A real knotd on loopback (``tests/dnsserver.py``) serves the PTR records of a few
127.0.0.x addresses and the A/AAAA records of their names; the daemon asks it through
``control/dnsresolver``. Clients connect from the loopback address each case needs:

=============  ==========================================  ===============================
source         PTR                                         forward-confirmed
=============  ==========================================  ===============================
127.0.0.5      trusted.hosts.test                          yes (A 127.0.0.5)
127.0.0.6      spam.hosts.test                             yes (A 127.0.0.6)
127.0.0.7      trusted.hosts.test (a PTR its owner chose)  no: trusted is 127.0.0.5 only
127.0.0.8      Mixed-Case.Hosts.Test                       yes (matched in lower case)
127.0.0.11     via CNAME (RFC 2317) a.relay.hosts.test     yes
::1            v6.hosts.test                               yes (AAAA ::1)
=============  ==========================================  ===============================
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import PKI
from tests.dnsserver import DnsServer, recording, silent_server
from tests.e2e.conftest import QmailRoot, StartDaemon
from tests.e2e.helpers import client_context

TRUSTED, SPAM, LIAR, MIXED = "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"
CLASSLESS = "127.0.0.11"
V6_LOOPBACK = ".".join("1" + "0" * 31) + ".ip6.arpa."  # ::1, reversed nibbles
ZONES = {
    "0.0.127.in-addr.arpa.": (
        "5 PTR trusted.hosts.test.\n"
        "6 PTR spam.hosts.test.\n"
        "7 PTR trusted.hosts.test.\n"
        "8 PTR Mixed-Case.Hosts.Test.\n"
        "11 CNAME 11.0-63\n"
        "11.0-63 PTR a.relay.hosts.test.\n"
    ),
    V6_LOOPBACK: "@ PTR v6.hosts.test.\n",
    "hosts.test.": (
        "trusted A 127.0.0.5\n"
        "spam A 127.0.0.6\n"
        "mixed-case A 127.0.0.8\n"
        "a.relay A 127.0.0.11\n"
        "v6 AAAA ::1\n"
    ),
}
RULES = (
    '=trusted.hosts.test:allow,RELAYCLIENT=""\n'
    '=.relay.hosts.test:allow,RELAYCLIENT=""\n'
    '=mixed-case.hosts.test:allow,RELAYCLIENT=""\n'
    '=v6.hosts.test:allow,RELAYCLIENT=""\n'
    "=spam.hosts.test:deny\n"
    ":allow\n"
)
MESSAGE = b"From: app@mx.test\r\nSubject: host rules\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


def client(host: str, port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP(host, port, timeout=10, source_address=(source, 0))


def resolver(qmail_root: QmailRoot, address: tuple[str, int], seconds: int = 5) -> None:
    qmail_root.control("dnsresolver", f"{address[0]}@{address[1]}\n")
    qmail_root.control("dnsbltimeout", f"{seconds}\n")


def received(body: bytes) -> str:
    """The Received header the daemon put on top, unfolded."""
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    return head.split("\r\n\t")[0]


def closed_without_greeting(port: int, source: str, host: str = "127.0.0.1") -> bool:
    with socket.create_connection((host, port), timeout=10, source_address=(source, 0)) as s:
        return s.recv(100) == b""


@pytest.mark.parametrize("mode", ["smtp", "submission", "smtps"])
def test_a_deny_rule_by_confirmed_name_drops_the_client(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer, mode: str
) -> None:
    """On every listener: the logins' listeners ask the same name servers."""
    resolver(qmail_root, (dns.host, dns.port))
    d = smtpd(mode=mode, rules_cdb=qmail_root.rules(RULES))
    assert closed_without_greeting(d.port, SPAM), "=spam.hosts.test:deny did nothing"
    d.wait_for(r"deny ip=127\.0\.0\.6 port=\d+ rule==spam\.hosts\.test host=spam\.hosts\.test")
    with socket.create_connection((d.host, d.port), 10, source_address=("127.0.0.12", 0)) as s:
        s.settimeout(2)
        if mode != "smtps":  # no PTR: the default rule, a greeting
            assert s.recv(100).startswith(b"220 ")
        else:  # the TLS handshake's turn: nothing said, nothing closed
            with pytest.raises(TimeoutError):
                s.recv(100)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        (TRUSTED, "trusted.hosts.test"),
        (CLASSLESS, "a.relay.hosts.test"),  # a suffix rule, a PTR behind a CNAME
        (MIXED, "mixed-case.hosts.test"),  # DNS names are compared in lower case
    ],
)
def test_a_relay_rule_by_confirmed_name_relays_and_names_it_in_received(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer, source: str, name: str
) -> None:
    resolver(qmail_root, (dns.host, dns.port))
    d = smtpd(rules_cdb=qmail_root.rules(RULES))
    with client(d.host, d.port, source) as s:
        assert s.sendmail("app@mx.test", ["far@elsewhere.test"], MESSAGE) == {}
    [(env, body)] = qmail_root.queued()
    assert env.recipients == ("far@elsewhere.test",)
    assert f"({name} [{source}])" in received(body)
    d.wait_for(f"conn ip={re.escape(source)} .*host={re.escape(name)}")


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_the_variables_of_a_rule_by_name_hold_on_the_smtps_listener(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer, pki: PKI, loop: str
) -> None:
    """Port 465 wants AUTH for MAIL unless the client's rule says RELAYCLIENT: the rule of
    its confirmed name does. The ClientHello, sent at once, is kept while the name is
    looked up and answered after (uvloop reads right after connection_made whatever it was
    told: such a ClientHello was lost and the handshake timed out)."""
    resolver(qmail_root, (dns.host, dns.port))
    d = smtpd(mode="smtps", rules_cdb=qmail_root.rules(RULES), extra=["--loop", loop])
    context = client_context(pki)
    with smtplib.SMTP_SSL(
        d.host, d.port, timeout=10, context=context, source_address=(TRUSTED, 0)
    ) as s:
        assert s.sendmail("app@mx.test", ["far@elsewhere.test"], MESSAGE) == {}
    with smtplib.SMTP_SSL(
        d.host, d.port, timeout=10, context=context, source_address=(LIAR, 0)
    ) as s:
        s.ehlo("liar.test")
        assert s.mail("app@mx.test")[0] == 530  # no confirmed name: AUTH first
    [(_, body)] = qmail_root.queued()
    assert "(trusted.hosts.test [127.0.0.5])" in received(body)


def test_an_ipv6_client_is_confirmed_by_its_aaaa_records(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    resolver(qmail_root, (dns.host, dns.port))
    d = smtpd(rules_cdb=qmail_root.rules(RULES), listen="[::1]:0")
    with smtplib.SMTP("::1", d.port, timeout=10) as s:
        assert s.sendmail("app@mx.test", ["far@elsewhere.test"], MESSAGE) == {}
    [(_, body)] = qmail_root.queued()
    assert "(v6.hosts.test [::1])" in received(body)


def test_a_ptr_its_forward_lookup_does_not_confirm_matches_no_host_rule(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    """127.0.0.7's owner made its PTR say trusted.hosts.test; that name's A record is
    127.0.0.5 only, so 127.0.0.7 has no name: no relaying, "unknown" in Received."""
    resolver(qmail_root, (dns.host, dns.port))
    d = smtpd(rules_cdb=qmail_root.rules(RULES))
    with client(d.host, d.port, LIAR) as s:
        s.ehlo("trusted.hosts.test")
        assert s.mail("app@mx.test")[0] == 250
        assert s.rcpt("far@elsewhere.test")[0] == 553
        assert s.rcpt("u@mx.test")[0] == 250
        assert s.data(MESSAGE)[0] == 250
    [(_, body)] = qmail_root.queued()
    assert "(unknown [127.0.0.7])" in received(body)
    queried = d.wait_for(r"conn ip=127\.0\.0\.7 .*")[0].group(0)
    assert "host=" not in queried


def test_dns_that_never_answers_leaves_the_address_rules_within_the_timeout(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """No answer in dnsbltimeout (1 s): no name, so no =host rule applies (the name's deny
    neither: tcpserver's behaviour, documented), the address prefix after it does, and the
    greeting comes once the second is over. An exact address is tried before any name, so
    its rule decides at once, without asking."""
    rules = (
        "127.0.0.9:deny\n"
        '127.0.0.:allow,RELAYCLIENT=""\n'
        '=trusted.hosts.test:allow,RELAYCLIENT=""\n'
        "=spam.hosts.test:deny\n"
        ":allow\n"
    )
    with silent_server() as silent:
        resolver(qmail_root, silent, seconds=1)
        d = smtpd(rules_cdb=qmail_root.rules(rules))
        began = time.monotonic()
        with client(d.host, d.port, "127.0.0.10") as s:
            greeted = time.monotonic() - began
            assert s.sendmail("app@mx.test", ["far@elsewhere.test"], MESSAGE) == {}
        assert 0.9 <= greeted < 3.0, f"greeting after {greeted:.2f}s"
        d.wait_for(r"host-fail ip=127\.0\.0\.10 error=\S+")
        began = time.monotonic()
        assert closed_without_greeting(d.port, "127.0.0.9"), "127.0.0.9:deny must still apply"
        assert time.monotonic() - began < 0.5, "an exact address waited for DNS"
        with client(d.host, d.port, SPAM) as s:  # its name's deny needs its name
            assert s.ehlo("spam.test")[0] == 250
    assert "host-fail ip=127.0.0.9 " not in d.output


def test_only_a_cdb_with_host_rules_makes_dns_queries(
    qmail_root: QmailRoot, smtpd: StartDaemon, dns: DnsServer
) -> None:
    """Without an = key a connection asks DNS nothing (and Received says unknown); with
    one, the PTR and the A query are made; a cdb changed back to none asks nothing again."""
    plain = '127.0.0.5:allow,RELAYCLIENT=""\n:allow\n'
    with recording((dns.host, dns.port)) as (address, queries):
        resolver(qmail_root, address)
        d = smtpd(rules_cdb=qmail_root.rules(plain))
        with client(d.host, d.port, TRUSTED) as s:
            assert s.sendmail("app@mx.test", ["far@elsewhere.test"], MESSAGE) == {}
        [(_, body)] = qmail_root.queued()
        assert "(unknown [127.0.0.5])" in received(body)
        assert queries == []
        d.stop()
        named = smtpd(rules_cdb=qmail_root.rules(RULES))
        with client(named.host, named.port, TRUSTED) as s:
            assert s.ehlo("trusted.test")[0] == 250
        assert queries == [("5.0.0.127.in-addr.arpa.", "PTR"), ("trusted.hosts.test.", "A")]
        qmail_root.rules(plain)  # re-read at the next connection, no HUP
        queries.clear()
        with client(named.host, named.port, LIAR) as s:
            assert s.ehlo("liar.test")[0] == 250
        assert queries == []


def test_a_client_that_talks_while_its_name_is_looked_up_is_a_pregreeter(
    qmail_root: QmailRoot, smtpd: StartDaemon
) -> None:
    """No greeting pause, no blocklist: the greeting waits only for the name (here a DNS
    server that never answers, 1 s). What the client sent meanwhile came before any
    greeting and gets 554 5.5.0 as during a greeting pause; it was replayed after the 220
    as if it had waited (the review's finding)."""
    rules = '=trusted.hosts.test:allow,RELAYCLIENT=""\n:allow\n'
    with silent_server() as silent:
        resolver(qmail_root, silent, seconds=1)
        d = smtpd(rules_cdb=qmail_root.rules(rules))
        source = ("127.0.0.10", 0)
        with socket.create_connection((d.host, d.port), 10, source_address=source) as sock:
            sock.sendall(b"EHLO early.test\r\nMAIL FROM:<a@b.test>\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert data.startswith(b"554 5.5.0"), data
        assert b"220 " not in data
        d.wait_for(r"pregreet ip=127\.0\.0\.10 port=\d+ bytes=39 ")
        with client(d.host, d.port, "127.0.0.10") as s:  # one that waits is served
            assert s.ehlo("patient.test")[0] == 250
