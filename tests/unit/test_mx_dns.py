"""Where mail goes, asked of a real DNS server (knotd on loopback): ``send.mx``'s
``DnsResolver`` reads NXDOMAIN, NODATA and a timeout the way ``destinations`` needs them.

MX hosts of which none has an address bounce at once (5.4.4), as qmail-remote, Postfix and
Exim do, but only when every host's lookup said so: one that failed for now defers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyqmail.control.send import Route
from pyqmail.send.mx import DnsError, DnsResolver, destinations
from tests.dnsserver import DnsServer, silent_for

ZONE = """
good        MX 10 mx.mxdns.test.
mx          A 192.0.2.10
mx          AAAA 2001:db8::10
typo        MX 10 mx-typo.mxdns.test.
typo        MX 20 mx-typo2.mxdns.test.
noaddr      MX 10 txtonly.mxdns.test.
txtonly     TXT "no address here"
half        MX 10 mx-typo.mxdns.test.
half        MX 20 mx.slow.mxdns.test.
slow        TXT "the delegation point"
mx.slow     A 192.0.2.20
implicit    A 192.0.2.30
hostless    TXT "no MX, no address"
nullmx      MX 0 .
"""


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer({"mxdns.test.": ZONE}) as dns:
        yield dns


def _resolver(server: DnsServer, address: tuple[str, int] | None = None) -> DnsResolver:
    res = server.resolver()
    if address is not None:
        res.nameservers, res.port = [address[0]], address[1]
    res.timeout = 0.5
    return DnsResolver(lifetime=1.0, resolver=res)


def _fail(domain: str, res: DnsResolver) -> DnsError:
    with pytest.raises(DnsError) as info:
        destinations(domain, Route(), res)
    return info.value


def test_mx_hosts_and_the_implicit_mx_resolve(server: DnsServer) -> None:
    res = _resolver(server)
    dests = destinations("good.mxdns.test", Route(), res)
    assert [d.address for d in dests] == ["192.0.2.10", "2001:db8::10"]
    assert [d.address for d in destinations("implicit.mxdns.test", Route(), res)] == ["192.0.2.30"]


@pytest.mark.parametrize(
    ("domain", "text"),
    [
        ("typo.mxdns.test", "none of the mail hosts of typo.mxdns.test has an address"),
        ("noaddr.mxdns.test", "none of the mail hosts of noaddr.mxdns.test has an address"),
        ("hostless.mxdns.test", "no MX and no A/AAAA records"),
        ("nowhere.mxdns.test", "NXDOMAIN"),
        ("nullmx.mxdns.test", "null MX"),
    ],
)
def test_no_mail_host_bounces(server: DnsServer, domain: str, text: str) -> None:
    """Non-existent MX targets (NXDOMAIN) and a target with no A/AAAA (NODATA) are known
    answers: waiting will not change them."""
    exc = _fail(domain, _resolver(server))
    assert text in str(exc)
    assert exc.permanent


def test_no_address_bounces_with_5_4_4(server: DnsServer) -> None:
    assert _fail("typo.mxdns.test", _resolver(server)).status == "5.4.4"


def test_a_host_whose_lookup_hangs_defers(server: DnsServer) -> None:
    """half.mxdns.test: one MX target does not exist, the other's DNS does not answer (a
    loopback proxy drops its queries): it may have an address tomorrow, so defer."""
    with silent_for((server.host, server.port), "slow.mxdns.test.") as proxy:
        exc = _fail("half.mxdns.test", _resolver(server, proxy))
    assert not exc.permanent
    assert "no address found for the mail hosts of half.mxdns.test" in str(exc)
