"""The checks' resolver keeps answers for their TTL: a message's SPF, DKIM key and DMARC
record are not asked again for every message (the benchmark's checks row, bench/README.md)."""

from __future__ import annotations

from pyqmail.checks.resolver import make_resolver, txt
from tests.dnsserver import DnsServer


def test_answers_are_cached_for_their_ttl() -> None:
    """The second lookup is answered after the server is gone: from the cache."""
    with DnsServer({"cache.example.": '_dmarc 300 TXT "v=DMARC1; p=none"\n'}) as server:
        res = make_resolver([(server.host, server.port)], timeout=1.0)
        assert txt(res, "_dmarc.cache.example.") == [b"v=DMARC1; p=none"]
    assert txt(res, "_dmarc.cache.example.") == [b"v=DMARC1; p=none"]


def test_absent_names_are_cached_too() -> None:
    """NXDOMAIN (an SPF or DMARC record a domain does not publish) is kept as well."""
    with DnsServer({"cache.example.": "www A 192.0.2.1\n"}) as server:
        res = make_resolver([(server.host, server.port)], timeout=1.0)
        assert txt(res, "_dmarc.cache.example.") == []
    assert txt(res, "_dmarc.cache.example.") == []
