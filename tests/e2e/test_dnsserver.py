"""The test DNS server (tests/dnsserver.py) itself: real knotd answers, stops, reports errors."""

from __future__ import annotations

import os

import dns.resolver
import pytest

from tests.dnsserver import DnsServer, split_zones

LONG_TXT = "v=DKIM1; k=rsa; p=" + "A" * 300


def _txt(answer: dns.resolver.Answer) -> list[str]:
    return sorted(b"".join(r.strings).decode() for r in answer)


def test_serves_two_zones_with_stub_soa() -> None:
    """Records (relative and absolute, a TXT over 255 bytes) from two zones, with no SOA given."""
    chunks = " ".join(f'"{LONG_TXT[i : i + 255]}"' for i in range(0, len(LONG_TXT), 255))
    zones = {
        "example.org": f"@ MX 10 mx1.example.org.\nmx1 A 192.0.2.1\ns1._domainkey TXT {chunks}\n",
        "example.net.": "example.net. 600 IN MX 20 mx2.example.org.\n",
    }
    with DnsServer(zones) as dns_:
        res = dns_.resolver()
        assert dns_.host == "127.0.0.1" and dns_.port > 1024
        assert [r.to_text() for r in res.resolve("example.org.", "MX")] == ["10 mx1.example.org."]
        assert [r.to_text() for r in res.resolve("mx1.example.org.", "A")] == ["192.0.2.1"]
        assert _txt(res.resolve("s1._domainkey.example.org.", "TXT")) == [LONG_TXT]
        mx = res.resolve("example.net.", "MX")
        assert mx.rrset is not None and mx.rrset.ttl == 600
        with pytest.raises(dns.resolver.NXDOMAIN):
            res.resolve("nothere.example.org.", "A")


def test_stops_by_pid_on_exit() -> None:
    """After the with block the knotd process is gone and its directory removed."""
    with DnsServer({"example.org.": "@ A 192.0.2.1\n"}) as dns_:
        assert dns_.proc is not None
        pid, directory = dns_.proc.pid, dns_.dir
        assert directory.is_dir()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not directory.exists()


def test_bad_zone_text_raises_with_knots_log() -> None:
    """A zone knot refuses is an error naming the cause, and no knotd is left behind."""
    server = DnsServer(
        {"example.org.": "@ SOA ns.invalid. host.invalid. 1 2 3 4 5\nx CNAME a.\nx A 192.0.2.1\n"}
    )
    with pytest.raises(RuntimeError, match=r"(?s)knotd.*example\.org"), server:
        pass
    assert server.proc is None


def test_split_zones_puts_each_owner_in_its_deepest_zone() -> None:
    text = (
        "example.org. 300 IN MX 10 mx1.example.org.\n"
        '_dmarc.sub.example.org. 300 IN TXT "v=DMARC1; p=none"\n'
        "1.2.0.192.in-addr.arpa. 300 IN PTR mx1.example.org.\n"
    )
    out = split_zones(text, ["example.org.", "sub.example.org.", "2.0.192.in-addr.arpa."])
    assert out["example.org."] == "example.org. 300 IN MX 10 mx1.example.org.\n"
    assert "_dmarc.sub.example.org." in out["sub.example.org."]
    assert "PTR" in out["2.0.192.in-addr.arpa."]
    with pytest.raises(ValueError, match="in none of the zones"):
        split_zones(text, ["example.org."])
