"""Hostile input to the inbound authentication checks (pyqmail.checks): bounded work, no
crash. Hundreds of DKIM signatures, absurd ``l=`` and ``h=``, huge keys, SPF loops and
over-long records, and a DNS server that answers garbage; every DNS answer comes from a real
knotd (or, for garbage, a UDP socket that answers bytes that are not DNS)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pyqmail.checks import dkimverify, dmarc, spf
from pyqmail.checks.resolver import make_resolver
from tests.attacks.tally import tried
from tests.dnsserver import DnsServer

HUGE_KEY = "v=DKIM1; k=rsa; p=" + "A" * 20000
MANY_INCLUDES = " ".join(f"include:i{i}.t.test" for i in range(40))
LONG_RECORD = "v=spf1 " + " ".join(f"ip4:10.{i // 250}.{i % 250}.1" for i in range(400)) + " -all"
ZONE = (
    "$TTL 300\n"
    'loop1 TXT "v=spf1 include:loop2.t.test -all"\n'
    'loop2 TXT "v=spf1 include:loop1.t.test -all"\n'
    'self TXT "v=spf1 redirect=self.t.test"\n'
    + "many TXT "
    + " ".join(
        f'"{r[i : i + 250]}"'
        for r in [f"v=spf1 {MANY_INCLUDES} -all"]
        for i in range(0, len(r), 250)
    )
    + "\n"
    + "".join(f'i{i} TXT "v=spf1 include:i{i + 1}.t.test -all"\n' for i in range(41))
    + "long TXT "
    + " ".join(f'"{LONG_RECORD[i : i + 250]}"' for i in range(0, len(LONG_RECORD), 250))
    + "\n"
    + "huge._domainkey TXT "
    + " ".join(f'"{HUGE_KEY[i : i + 250]}"' for i in range(0, len(HUGE_KEY), 250))
    + "\n"
    + '_dmarc TXT "v=DMARC1; p=reject; pct=9999999999999999999; adkim=x"\n'
)


@pytest.fixture(scope="module")
def resolver():
    with DnsServer({"t.test.": ZONE}) as server:
        yield make_resolver([(server.host, server.port)], timeout=2.0)


@pytest.fixture
def garbage_server() -> Iterator[tuple[str, int]]:
    """A UDP 'DNS server' on loopback that answers every query with random bytes (and, every
    other time, a truncated copy of the query)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        n = 0
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            n += 1
            sock.sendto(os.urandom(64) if n % 2 else data[:7], peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()
    stop.set()
    thread.join(5)
    sock.close()


def signed_message(count: int, tags: str = "") -> bytes:
    sig = (
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=t.test; s=huge; "
        f"h=from:subject; bh=AAAA; b=AAAA{tags}\r\n"
    )
    return (sig * count + "From: a@t.test\r\nSubject: x\r\n\r\nbody\r\n").encode()


def test_hundreds_of_signatures_cost_at_most_max_signatures(resolver):
    start = time.monotonic()
    results = dkimverify.verify(signed_message(500), resolver, budget=10)
    tried("dkim-many-signatures", 1)
    assert len(results) == 500
    assert sum(r.result != "policy" for r in results) == dkimverify.MAX_SIGNATURES
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("tags", ["; l=99999999999999999999999", "; l=-1", "; l=0"])
def test_absurd_l_is_never_trusted(resolver, tags):
    [result] = dkimverify.verify(signed_message(1, tags), resolver)
    tried("dkim-absurd-l", 1)
    assert (result.result, result.reason) == ("policy", "l= not trusted")


def test_huge_header_list_and_huge_key_are_bounded(resolver):
    """An h= of 20,000 names is a header section over 100 KiB, one of 2,001 names over
    dkimverify.MAX_SIGNED_NAMES: both refused before dkimpy selects a field; the key of a
    plain signature is refused unparsed."""
    start = time.monotonic()
    for count, reason in [(20000, "header section over"), (2000, "h= lists over")]:
        h = ":".join(["from"] + ["subject"] * count)
        msg = signed_message(1).replace(b"h=from:subject", f"h={h}".encode())
        [result] = dkimverify.verify(msg, resolver)
        assert result.result == "permerror" and reason in result.reason, result
    [result] = dkimverify.verify(signed_message(1), resolver)
    tried("dkim-huge-h-and-key", 1)
    assert result.result == "permerror" and "key record over" in result.reason, result
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("garbage", [b"v=1; a=; d=; s=", b"garbage", b"v=1; a=rsa-sha256; d=\xff"])
def test_malformed_signatures_do_not_crash(resolver, garbage):
    msg = b"DKIM-Signature: " + garbage + b"\r\nFrom: a@t.test\r\n\r\nx\r\n"
    results = dkimverify.verify(msg, resolver)
    tried("dkim-malformed-signature", 1)
    assert [r.result for r in results] in (["permerror"], ["fail"], ["neutral"])


@pytest.mark.parametrize(
    ("sender", "want"),
    [
        ("a@loop1.t.test", "permerror"),
        ("a@self.t.test", "permerror"),
        ("a@many.t.test", "permerror"),
    ],
)
def test_spf_loops_and_lookup_storms_are_bounded(resolver, sender, want):
    start = time.monotonic()
    _helo, mail = spf.check(resolver, "192.0.2.1", sender, "x.t.test", budget=5)
    tried("spf-loops-and-storms", 1)
    assert mail.result == want, mail
    assert time.monotonic() - start < 5


def test_dmarc_with_absurd_tags(resolver):
    result = dmarc.check(
        resolver, b"From: a@t.test\r\n", spf.SpfResult("mailfrom", "fail", ""), [], roll=99
    )
    tried("dmarc-absurd-tags", 1)
    assert (result.result, result.policy) == ("fail", "reject")


def test_garbage_dns_answers_are_temperrors_within_budget(garbage_server):
    res = make_resolver([garbage_server], timeout=1.0)
    start = time.monotonic()
    helo, mail = spf.check(res, "192.0.2.1", "a@t.test", "x.t.test", budget=2)
    dkim_results = dkimverify.verify(signed_message(3), res, budget=2)
    dm = dmarc.check(res, b"From: a@t.test\r\n", mail, dkim_results)
    tried("dns-garbage-answers", 3)
    assert time.monotonic() - start < 8
    assert (helo.result, mail.result) == ("temperror", "temperror")
    assert {r.result for r in dkim_results} == {"temperror"}
    assert dm.result == "temperror"
