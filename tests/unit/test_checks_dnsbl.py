"""DNS blocklists (``pyqmail.checks.dnsbl``) against a real knotd on loopback.

The lists are zones knotd serves (``tests/dnsserver.py``) with RFC 5782 entries: ``A
127.0.0.x`` and ``TXT`` under the reversed octets (IPv4) or nibbles (IPv6). What a list does
not know, a knotd that lacks the zone (REFUSED) and a port where nothing answers (timeout)
are all tried; none of them may hold a client longer than ``dnsbltimeout``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.checks import dnsbl, listlookup
from pyqmail.checks.screen import load as load_screen
from pyqmail.control.reader import ControlError, Line
from pyqmail.dnslistspec import Entry
from tests.dnsserver import DnsServer

LISTED = "127.0.0.9"
V6 = "2001:db8::1"
V6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
ZONES = {
    "bl.test.": (
        "9.0.0.127 300 A 127.0.0.2\n"
        '9.0.0.127 300 TXT "listed: see https://bl.test/q?9"\n'
        f"{V6_NAME} 300 A 127.0.0.4\n"
        "5.0.0.127 300 A 10.1.2.3\n"  # garbage: an answer outside 127/8
    ),
    "weak.test.": "9.0.0.127 300 A 127.0.0.3\n8.0.0.127 300 A 127.0.0.3\n",
    "wl.test.": "8.0.0.127 300 A 127.0.0.2\n",
}


def settings(dns: DnsServer | None, lists: str, **kw: object) -> dnsbl.Settings:
    """Settings as the control files would give them, pointed at ``dns``."""
    servers = ((dns.host, dns.port),) if dns is not None else ()
    parsed = dnsbl.parse_lists([line_of(x) for x in lists.split()])
    base = dnsbl.Settings(lists=parsed, nameservers=servers)
    return dnsbl.Settings(**{**base.__dict__, **kw})  # type: ignore[arg-type]


def line_of(text: str) -> Line:
    return Line(Path("control/dnsbl"), 1, text)


def check(s: dnsbl.Settings, ip: str, lookup: listlookup.Lookup | None = None) -> dnsbl.Result:
    async def run() -> dnsbl.Result:
        return await (lookup or listlookup.Lookup(s)).check(ip, s)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


def test_query_names_are_reversed_octets_and_nibbles() -> None:
    assert dnsbl.query_name("192.0.2.1", "bl.test") == "1.2.0.192.bl.test."
    assert dnsbl.query_name("::ffff:192.0.2.1", "bl.test") == "1.2.0.192.bl.test."
    assert dnsbl.query_name(V6, "bl.test") == f"{V6_NAME}.bl.test."


def test_a_listed_client_is_refused_naming_the_list_and_its_txt(dns: DnsServer) -> None:
    s = settings(dns, "bl.test")
    result = check(s, LISTED)
    assert result.hits == (("bl.test", "127.0.0.2", "listed: see https://bl.test/q?9"),)
    verdict = dnsbl.verdict(result, s, LISTED)
    assert verdict.action == "refuse"
    assert verdict.code == 554
    assert verdict.text == (
        "Service unavailable; client [127.0.0.9] blocked using bl.test;"
        " listed: see https://bl.test/q?9"
    )
    assert "dnsbl=bl.test:127.0.0.2" in verdict.log
    v6 = check(s, V6)
    assert v6.hits == (("bl.test", "127.0.0.4", ""),)
    unlisted = check(s, "127.0.0.7")
    assert unlisted.hits == () and unlisted.failed == ()
    assert dnsbl.verdict(unlisted, s, "127.0.0.7").action == "accept"


def test_weights_and_threshold(dns: DnsServer) -> None:
    """weak.test alone (weight 1) stays under a threshold of 2; with bl.test=2 it is over."""
    s = settings(dns, "bl.test=2 weak.test", threshold=3)
    both = check(s, LISTED)
    assert both.score == 3
    assert dnsbl.verdict(both, s, LISTED).action == "refuse"
    below = check(s, "127.0.0.8")  # weak.test only
    assert below.score == 1
    verdict = dnsbl.verdict(below, s, "127.0.0.8")
    assert verdict.action == "accept"
    assert "dnsbl=weak.test:127.0.0.3" in verdict.log  # the hit still reaches the log


def test_an_allow_list_wins(dns: DnsServer) -> None:
    s = settings(dns, "weak.test", allow=(Entry("wl.test"),))
    result = check(s, "127.0.0.8")
    assert result.allowed == "wl.test"
    verdict = dnsbl.verdict(result, s, "127.0.0.8")
    assert verdict.action == "accept"
    assert "dnswl=wl.test" in verdict.log


def test_answers_outside_127_and_missing_zones_are_failures_not_hits(dns: DnsServer) -> None:
    """An A record outside 127.0.0.0/8 is garbage; a zone knotd does not serve is REFUSED.
    Neither blocks mail, unless dnsbltempfail says so."""
    s = settings(dns, "bl.test nosuch.test")
    result = check(s, "127.0.0.5")
    assert result.hits == ()
    assert set(result.failed) == {"bl.test", "nosuch.test"}
    assert dnsbl.verdict(result, s, "127.0.0.5").action == "accept"
    strict = settings(dns, "bl.test nosuch.test", tempfail=True)
    verdict = dnsbl.verdict(check(strict, "127.0.0.5"), strict, "127.0.0.5")
    assert (verdict.action, verdict.code) == ("defer", 451)


def test_a_server_that_never_answers_costs_at_most_the_timeout() -> None:
    """A UDP port bound but never read: every query times out."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        s = dnsbl.Settings(
            lists=(Entry("bl.test"), Entry("weak.test")),
            timeout=1,
            nameservers=(("127.0.0.1", port),),
        )
        began = time.monotonic()
        result = check(s, LISTED)
        took = time.monotonic() - began
    assert set(result.failed) == {"bl.test", "weak.test"}
    assert took < 1.5, took
    assert dnsbl.verdict(result, s, LISTED).action == "accept"


def test_answers_are_cached_for_their_ttl(dns: DnsServer) -> None:
    """The second look needs no server: knotd is stopped between them."""
    with DnsServer({"bl.test.": ZONES["bl.test."]}) as own:
        s = settings(own, "bl.test", timeout=1)
        lookup = listlookup.Lookup(s)

        async def twice() -> tuple[dnsbl.Result, dnsbl.Result, dnsbl.Result]:
            first = await lookup.check(LISTED, s)
            await lookup.check("127.0.0.7", s)  # NXDOMAIN, kept for the SOA's minimum
            own.stop()
            return first, await lookup.check(LISTED, s), await lookup.check("127.0.0.7", s)

        first, second, negative = asyncio.run(twice())
    assert first.hits == second.hits
    assert second.failed == ()
    assert (negative.hits, negative.failed) == ((), ())
    fresh = check(s, LISTED)  # without the cache the stopped server is missed
    assert fresh.failed == ("bl.test",)


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("dnsbl", "not a domain!\n", "not a DNS list zone"),
        ("dnsbl", "bl.test=0\n", "weight of bl.test must be 1 to 100"),
        ("dnsbl", "bl.test\nbl.test=2\n", "listed twice"),
        ("dnswl", "localhost\n", "not a DNS list zone"),
        ("dnsresolver", "ns.example\n", "not an IP address"),
        ("dnsresolver", "127.0.0.1@99999\n", "not a port"),
        ("dnsbltimeout", "0\n", "out of range"),
        ("greylistdelay", "90000\n", "out of range"),
    ],
)
def test_bad_files_are_refused_naming_the_file(
    tmp_path: Path, name: str, text: str, problem: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ControlError, match=problem) as exc:
        load_screen(tmp_path)
    assert str(tmp_path / name) in str(exc.value)


def test_a_greylist_delay_not_shorter_than_its_lifetime_is_refused(tmp_path: Path) -> None:
    (tmp_path / "greylistdelay").write_text("600\n")
    (tmp_path / "greylistlifetime").write_text("600\n")
    with pytest.raises(ControlError, match="greylistdelay: 600 seconds is not shorter than"):
        load_screen(tmp_path)


def test_rblsmtpd_variable() -> None:
    assert dnsbl.rblsmtpd({}) is None
    skip = dnsbl.rblsmtpd({"RBLSMTPD": ""})
    assert skip is not None and skip.action == "accept"
    temp = dnsbl.rblsmtpd({"RBLSMTPD": "you are on our list"})
    assert temp is not None and (temp.code, temp.text) == (451, "you are on our list")
    perm = dnsbl.rblsmtpd({"RBLSMTPD": "-go away"})
    assert perm is not None and (perm.code, perm.text) == (553, "go away")
