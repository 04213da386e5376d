"""Where mail goes, asked of a real DNS server (knotd on loopback): ``send.mx``'s
``DnsResolver`` reads NXDOMAIN, NODATA and a timeout the way ``destinations`` needs them.

MX hosts of which none has an address bounce at once (5.4.4), as qmail-remote, Postfix and
Exim do, but only when every host's lookup said so: one that failed for now defers. A host
whose AAAA lookup fails still has its A records (and the other way round), as in Postfix.
A null MX bounces with RFC 7505's 5.1.10."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control.send import Control, Route
from pyqmail.queue.format import Envelope
from pyqmail.send.bounce import Failure, bounce_target, make_dsn
from pyqmail.send.mx import DnsError, DnsResolver, destinations
from pyqmail.send.remote import RemoteDelivery
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
dual        MX 10 mx.dual.mxdns.test.
mx.dual     A 192.0.2.40
mx.dual     AAAA 2001:db8::40
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


def test_one_address_type_that_answers_is_enough(server: DnsServer) -> None:
    """mx.dual has A and AAAA records; a loopback proxy drops the queries of one type (a
    resolver path that loses AAAA queries, a SERVFAIL): the other type's addresses are
    used, not thrown away with a deferral. Neither answering stays temporary."""
    upstream = (server.host, server.port)
    for dropped, found in (("AAAA", ["192.0.2.40"]), ("A", ["2001:db8::40"])):
        with silent_for(upstream, "mx.dual.mxdns.test.", rdtype=dropped) as proxy:
            dests = destinations("dual.mxdns.test", Route(), _resolver(server, proxy))
        assert [d.address for d in dests] == found, dropped
    with silent_for(upstream, "mx.dual.mxdns.test.") as proxy:
        exc = _fail("dual.mxdns.test", _resolver(server, proxy))
    assert not exc.permanent
    assert "no address found for the mail hosts of dual.mxdns.test" in str(exc), exc


def test_a_null_mx_bounces_with_5_1_10(server: DnsServer, tmp_path: Path) -> None:
    """RFC 7505 section 4.2: "recipient address has null MX", 5.1.10, in the delivery's
    result and in the bounce's Status field."""
    assert _fail("nullmx.mxdns.test", _resolver(server)).status == "5.1.10"
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "me").write_text("mx.test\n")
    control = Control.load(tmp_path)
    message = b"Subject: hi\r\n\r\nhello\r\n"
    env = Envelope("id", "me@mx.test", ("x@nullmx.mxdns.test",), len(message), 0.0)
    session = RemoteDelivery(control, resolver=_resolver(server)).session("nullmx.mxdns.test")
    (result,) = session.deliver(env, message, ["x@nullmx.mxdns.test"])
    assert (result.kind, result.status) == ("perm", "5.1.10"), result
    assert "(#5.1.10)" in result.detail
    target = bounce_target(env, control)
    assert target is not None
    failure = Failure("x@nullmx.mxdns.test", result, 0.0)
    dsn = make_dsn(env, message, [failure], target=target, control=control, now=0.0)
    assert b"\r\nStatus: 5.1.10\r\n" in dsn
