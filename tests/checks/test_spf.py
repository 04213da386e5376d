"""SPF verdicts (pyqmail.checks.spf) against Mail::SPF's spfquery, on a real knotd.

A table of SPF cases (include, redirect, macros, exists, the 10-lookup and void-lookup
limits, ~all, ?all, ptr, permerror, temperror) is served by ``tests.dnsserver.DnsServer``;
for each, pyqmail's result must equal the one of ``spfquery`` from Debian's
spf-tools-perl (Mail::SPF, an implementation no one here wrote, in Perl), which asks the
same server: Net::DNS takes the server and its port from RES_NAMESERVERS / RES_OPTIONS.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pyqmail.checks import inbound, spf
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from tests.dnsserver import DnsServer, free_port, silent_for

SPFQUERY = "/usr/bin/spfquery"

# eleven includes of existing records, one DNS-querying term each: the 11th is over the limit
_CHAIN = "".join(f'inc{i} TXT "v=spf1 ip4:10.9.9.{i} -all"\n' for i in range(11))
ZONE = (
    'plain TXT "v=spf1 ip4:192.0.2.0/24 -all"\n'
    'soft TXT "v=spf1 ip4:198.51.100.1 ~all"\n'
    'neutral TXT "v=spf1 ?all"\n'
    'inc TXT "v=spf1 include:plain.t.test -all"\n'
    'incmiss TXT "v=spf1 include:nothing.t.test -all"\n'
    'redir TXT "v=spf1 redirect=plain.t.test"\n'
    'redirloop TXT "v=spf1 redirect=redirloop.t.test"\n'
    'incloop TXT "v=spf1 include:incloop.t.test -all"\n'
    'macro TXT "v=spf1 exists:%{ir}.%{l1r-}.allow.t.test -all"\n'
    "1.2.0.192.bob.allow A 127.0.0.2\n"
    'exists TXT "v=spf1 exists:%{i}.ok.t.test -all"\n'
    "192.0.2.7.ok A 127.0.0.2\n"
    'amx TXT "v=spf1 a mx -all"\n'
    "amx A 192.0.2.10\n"
    "amx MX 10 mail.amx.t.test.\n"
    "mail.amx A 192.0.2.11\n"
    'ptr TXT "v=spf1 ptr -all"\n'
    "host.ptr A 192.0.2.20\n"
    'toomany TXT "v=spf1 '
    + " ".join(f"include:inc{i}.t.test" for i in range(11))
    + ' -all"\n'
    + _CHAIN
    + 'void TXT "v=spf1 a:v1.t.test a:v2.t.test a:v3.t.test -all"\n'
    'bad TXT "v=spf1 ip4:192.0.2.300 -all"\n'
    'badmech TXT "v=spf1 frob -all"\n'
    'two TXT "v=spf1 -all"\n'
    'two TXT "v=spf1 +all"\n'
    'notspf TXT "hello world"\n'
    'timeout TXT "v=spf1 include:slow.dead.test -all"\n'
    'ip6 TXT "v=spf1 ip6:2001:db8::/32 -all"\n'
    "mx.helo A 192.0.2.30\n"
    'mx.helo TXT "v=spf1 a -all"\n'
    '_dmarc TXT "v=DMARC1; p=reject"\n'
    '@ TXT "v=spf1 -all"\n'
)
REVERSE = "20 PTR host.ptr.t.test.\n"
# (case, client IP, sender)
CASES = [
    ("ip4 pass", "192.0.2.1", "a@plain.t.test"),
    ("ip4 fail", "203.0.113.1", "a@plain.t.test"),
    ("~all", "203.0.113.1", "a@soft.t.test"),
    ("?all", "203.0.113.1", "a@neutral.t.test"),
    ("include pass", "192.0.2.1", "a@inc.t.test"),
    ("include fail", "203.0.113.1", "a@inc.t.test"),
    ("include of no record", "192.0.2.1", "a@incmiss.t.test"),
    ("redirect", "192.0.2.1", "a@redir.t.test"),
    ("redirect loop", "192.0.2.1", "a@redirloop.t.test"),
    ("include loop", "192.0.2.1", "a@incloop.t.test"),
    ("macros pass", "192.0.2.1", "bob@macro.t.test"),
    ("macros fail", "192.0.2.1", "alice@macro.t.test"),
    ("exists pass", "192.0.2.7", "x@exists.t.test"),
    ("exists fail", "192.0.2.8", "x@exists.t.test"),
    ("a", "192.0.2.10", "x@amx.t.test"),
    ("mx", "192.0.2.11", "x@amx.t.test"),
    ("a/mx fail", "192.0.2.12", "x@amx.t.test"),
    ("ptr pass", "192.0.2.20", "x@ptr.t.test"),
    ("ptr fail", "192.0.2.21", "x@ptr.t.test"),
    ("10 lookups", "192.0.2.1", "x@toomany.t.test"),
    ("void lookups", "192.0.2.1", "x@void.t.test"),
    ("bad ip4", "192.0.2.1", "x@bad.t.test"),
    ("unknown mechanism", "192.0.2.1", "x@badmech.t.test"),
    ("two records", "192.0.2.1", "x@two.t.test"),
    ("no SPF record", "192.0.2.1", "x@notspf.t.test"),
    ("no such domain", "192.0.2.1", "x@nxdomain.t.test"),
    ("ip6 pass", "2001:db8::1", "x@ip6.t.test"),
    ("ip6 fail", "2001:db9::1", "x@ip6.t.test"),
    ("temperror", "192.0.2.1", "x@timeout.t.test"),
]


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer({"t.test.": ZONE, "2.0.192.in-addr.arpa.": REVERSE}) as server:
        yield server


def spfquery(server: DnsServer, scope: str, identity: str, ip: str, helo: str) -> str:
    """Mail::SPF's result (first word of spfquery's output) against the test server."""
    env = dict(os.environ, RES_NAMESERVERS=server.host, RES_OPTIONS=f"port:{server.port}")
    out = subprocess.run(
        [SPFQUERY, "--scope", scope, "--id", identity, "--ip", ip, "--helo-id", helo],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out.stdout.split()[0] if out.stdout.split() else f"no output: {out.stderr}"


@pytest.mark.parametrize(("case", "ip", "sender"), CASES, ids=[c[0] for c in CASES])
def test_mailfrom_matches_spfquery(dns_server, case, ip, sender):
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    _helo, mail = spf.check(res, ip, sender, "client.example", budget=5.0)
    theirs = spfquery(dns_server, "mfrom", sender, ip, "client.example")
    assert mail.result == theirs, f"{case}: pyqmail {mail} / spfquery {theirs}"


@pytest.mark.parametrize(
    ("ip", "helo"), [("192.0.2.30", "mx.helo.t.test"), ("192.0.2.31", "mx.helo.t.test")]
)
def test_helo_matches_spfquery(dns_server, ip, helo):
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    helo_result, mail = spf.check(res, ip, "", helo)
    assert helo_result.result == spfquery(dns_server, "helo", helo, ip, helo)
    assert mail.result == helo_result.result  # the null sender is postmaster@HELO
    assert helo_result.result in ("pass", "fail")


def test_helo_literal_is_none(dns_server):
    res = make_resolver([(dns_server.host, dns_server.port)])
    helo_result, _ = spf.check(res, "192.0.2.1", "a@plain.t.test", "[192.0.2.1]")
    assert helo_result.result == "none"


def test_dead_server_is_temperror_within_budget():
    """A server that never answers: temperror, within the budget (not pyspf's 20 s)."""
    res = make_resolver([("127.0.0.1", free_port())], timeout=5.0)
    start = time.monotonic()
    helo_result, mail = spf.check(res, "192.0.2.1", "a@plain.t.test", "mx.t.test", budget=1.5)
    assert time.monotonic() - start < 3.0
    assert (helo_result.result, mail.result) == ("temperror", "temperror")


def test_a_helo_whose_dns_hangs_leaves_the_mail_from_check_its_time(dns_server):
    """The client names its HELO: DNS for it that never answers must not turn the SPF
    check of the domain it forges into a temperror (DMARC would accept on it)."""
    with silent_for((dns_server.host, dns_server.port), "hang.test.") as (host, port):
        res = make_resolver([(host, port)], timeout=5.0)
        start = time.monotonic()
        helo_result, mail = spf.check(res, "198.51.100.9", "ceo@plain.t.test", "mx.hang.test", 2.0)
    assert helo_result.result == "temperror"
    assert mail.result == "fail", mail  # plain.t.test allows 192.0.2.0/24 only
    assert time.monotonic() - start < 3.5


def long_name(length: int, under: str = "t.test") -> str:
    """A name of ``length`` characters under ``under`` (labels of 50 and what is left)."""
    labels, left = [], length - len(under) - 1
    while left > 51:
        labels.append("a" * 50)
        left -= 51
    return ".".join([*labels, "b" * left, under])


@pytest.mark.parametrize("length", [254, 255])
def test_a_helo_longer_than_dns_allows_is_none(dns_server, length):
    """RFC 7208 4.3: a malformed domain is "none". dnspython refuses names over 253
    characters (NameTooLong), which was a temperror, and with the null sender the aligned
    mailfrom result: DMARC accepted the spoof of t.test below on it."""
    helo = long_name(length)
    assert len(helo) == length
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    helo_result, mail = spf.check(res, "198.51.100.9", "", helo, budget=2.0)
    assert (helo_result.result, mail.result) == ("none", "none"), (helo_result, mail)
    settings = AuthSettings(enabled=True, authserv_id="mx.test", timeout=5, resolver=res)
    spoof = b"From: CEO <ceo@t.test>\r\nTo: u@mx.test\r\nSubject: pay\r\n\r\nnow\r\n"
    outcome = inbound.check(settings, "198.51.100.9", helo, "", spoof)
    assert outcome.verdict.code == 550, outcome.verdict
    assert "dmarc=fail" in outcome.verdict.log


def test_a_sender_domain_longer_than_dns_allows_is_none(dns_server):
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    sender = "ceo@" + long_name(254)
    _helo, mail = spf.check(res, "198.51.100.9", sender, "client.example", budget=2.0)
    assert mail.result == "none", mail


@pytest.mark.parametrize(("ip", "want"), [("192.0.2.30", "pass"), ("192.0.2.31", "fail")])
def test_a_helo_with_its_trailing_dot_is_checked_without_it(dns_server, ip, want):
    """``EHLO mx.helo.t.test.`` (pyqmail-smtpd accepts the dot) was "none" always: a null
    sender's bounce from that host then failed DMARC."""
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    helo_result, mail = spf.check(res, ip, "", "mx.helo.t.test.")
    assert (helo_result.result, helo_result.domain) == (want, "mx.helo.t.test"), helo_result
    assert mail.result == want
