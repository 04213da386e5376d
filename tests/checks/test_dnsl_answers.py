"""What a DNS list's answer means (``pyqmail.checks.dnsbl``, ``pyqmail.dnslistspec``), asked
of a real knotd on loopback (``tests/dnsserver.py``).

The case the filters exist for: dnswl.org answers ``127.0.0.255`` to a resolver it has
blocked, for every address. Read as a listing, that allow-listed every client: blocklist hits
ignored, greylisting skipped. It is a failed lookup; on the zones of dnswl.org so is any
trust level outside 0..3. Postfix's answer filters (``zone=127.0.0.[2..11]*3``) say which
answers of a list count, and with what weight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.checks import dnsbl, screen
from pyqmail.checks.listlookup import Lookup
from pyqmail.control.reader import ControlError
from tests.dnsserver import DnsServer

CLIENT = "192.0.2.9"  # on zen.test as 127.0.0.2, on every allow list as they answer
CLEAN = "192.0.2.7"  # on no blocklist
ZONES = {
    # blocked: the same answer for every address, as dnswl.org gives a public resolver
    "list.dnswl.test.": "*.2.0.192 300 A 127.0.0.255\n",
    "list.dnswl.org.": "9.2.0.192 300 A 127.0.10.7\n7.2.0.192 300 A 127.0.10.2\n",
    "zen.test.": (
        "9.2.0.192 300 A 127.0.0.2\n"
        '9.2.0.192 300 TXT "https://zen.test/query/ip/192.0.2.9"\n'
        "8.2.0.192 300 A 127.0.0.10\n"
        "6.2.0.192 300 A 127.255.255.254\n"  # Spamhaus: query via a public resolver
    ),
    "multi.test.": "9.2.0.192 300 A 127.0.0.4\n9.2.0.192 300 A 127.0.0.11\n",
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


def control(tmp_path: Path, dns: DnsServer, **files: str) -> Path:
    """A control directory with ``files`` and ``dnsresolver`` pointed at knotd."""
    (tmp_path / "dnsresolver").write_text(f"{dns.host}@{dns.port}\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def lookup(settings: dnsbl.Settings, ip: str) -> dnsbl.Result:
    async def run() -> dnsbl.Result:
        return await Lookup(settings).check(ip, settings)

    return asyncio.run(run())


def test_a_blocked_allow_list_allows_nobody_and_warns(
    tmp_path: Path, dns: DnsServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """The reviewer's case: 127.0.0.255 from the allow list, 127.0.0.2 from the blocklist."""
    s = screen.load(control(tmp_path, dns, dnsbl="zen.test\n", dnswl="list.dnswl.test\n"))
    result = lookup(s.dnsbl, CLIENT)
    assert result.allowed is None
    assert result.failed == ("list.dnswl.test",)
    assert result.hits == (("zen.test", "127.0.0.2", "https://zen.test/query/ip/192.0.2.9"),)
    verdict = dnsbl.verdict(result, s.dnsbl, CLIENT)
    assert (verdict.action, verdict.code) == ("refuse", 554)
    assert "dnswl=" not in verdict.log
    assert "dnsbl_fail=list.dnswl.test" in verdict.log
    out = capfd.readouterr().out
    assert "warning text=" in out
    assert "zone=list.dnswl.test answer=127.0.0.255" in out


def test_the_warning_is_rate_limited_per_worker(
    tmp_path: Path, dns: DnsServer, capfd: pytest.CaptureFixture[str]
) -> None:
    s = screen.load(control(tmp_path, dns, dnswl="list.dnswl.test\n")).dnsbl

    async def many() -> None:
        worker = Lookup(s)
        for _ in range(50):
            assert (await worker.check(CLEAN, s)).failed == ("list.dnswl.test",)

    asyncio.run(many())
    assert capfd.readouterr().out.count("answer=127.0.0.255") == 1


def test_a_blocked_allow_list_does_not_skip_greylisting(tmp_path: Path, dns: DnsServer) -> None:
    """The whole session's view (``Screen``): no allow, so the new triplet is deferred."""
    ctl = control(
        tmp_path, dns, dnsbl="zen.test\n", dnswl="list.dnswl.test\n", greylistdelay="300\n"
    )
    settings = screen.load(ctl)

    async def session() -> tuple[str | None, str | None]:
        checks = screen.Checks(tmp_path, settings)
        try:
            one = checks.screen(settings, "smtp", CLEAN, {})
            if one.task is not None:
                await one.task
            return one.envelope("a@sender.test", None), one.envelope("a@sender.test", "u@mx.test")
        finally:
            checks.shutdown()

    mail, rcpt = asyncio.run(session())
    assert mail is None
    assert rcpt is not None and rcpt.startswith("451 4.7.1 Greylisted")


def test_dnswl_org_trust_levels_outside_0_to_3_are_failures(tmp_path: Path, dns: DnsServer) -> None:
    """127.0.10.7 is no dnswl.org return code (Y, the trust, is 0..3); 127.0.10.2 is."""
    s = screen.load(control(tmp_path, dns, dnswl="list.dnswl.org\n")).dnsbl
    odd = lookup(s, CLIENT)
    assert (odd.allowed, odd.failed) == (None, ("list.dnswl.org",))
    good = lookup(s, CLEAN)
    assert (good.allowed, good.failed) == ("list.dnswl.org", ())


def test_a_filtered_allow_list_allows_only_what_matches(tmp_path: Path, dns: DnsServer) -> None:
    s = screen.load(control(tmp_path, dns, dnswl="list.dnswl.org=127.0.[0..255].[2..3]\n")).dnsbl
    assert lookup(s, CLEAN).allowed == "list.dnswl.org"
    strict = screen.load(control(tmp_path, dns, dnswl="list.dnswl.org=127.0.[0..255].3\n")).dnsbl
    result = lookup(strict, CLEAN)
    assert (result.allowed, result.failed) == (None, ())  # not matching: not listed


def test_blocklist_filters_and_weights(tmp_path: Path, dns: DnsServer) -> None:
    """Postfix's example: the same zone, its return codes weighed apart; a code outside every
    filter is no listing; the older zone=weight still reads."""
    text = "zen.test=127.0.0.[10;11]*3\nzen.test=127.0.0.2\nmulti.test=127.0.0.[4..7]*2\n"
    s = screen.load(control(tmp_path, dns, dnsbl=text, dnsblthreshold="3\n")).dnsbl
    assert [(e.zone, e.weight) for e in s.lists] == [
        ("zen.test", 3),
        ("zen.test", 1),
        ("multi.test", 2),
    ]
    both = lookup(s, CLIENT)  # zen 127.0.0.2 (1) + multi 127.0.0.4 (2)
    assert both.score == 3
    assert [(z, a) for z, a, _ in both.hits] == [
        ("zen.test", "127.0.0.2"),
        ("multi.test", "127.0.0.4"),
    ]
    assert dnsbl.verdict(both, s, CLIENT).action == "refuse"
    pbl = lookup(s, "192.0.2.8")  # 127.0.0.10: the first line only
    assert (pbl.score, pbl.hits[0][:2]) == (3, ("zen.test", "127.0.0.10"))
    narrow = screen.load(control(tmp_path, dns, dnsbl="zen.test=127.0.0.[3..9]\n")).dnsbl
    unmatched = lookup(narrow, CLIENT)
    assert (unmatched.hits, unmatched.failed) == ((), ())
    old = screen.load(control(tmp_path, dns, dnsbl="zen.test=5\n")).dnsbl
    assert lookup(old, CLIENT).score == 5


def test_spamhaus_error_codes_stay_failures(tmp_path: Path, dns: DnsServer) -> None:
    s = screen.load(
        control(
            tmp_path, dns, dnsbl="zen.test=127.[0..255].[0..255].[0..255]\n", dnsbltempfail="1\n"
        )
    ).dnsbl
    result = lookup(s, "192.0.2.6")
    assert (result.hits, result.failed) == ((), ("zen.test",))
    assert dnsbl.verdict(result, s, "192.0.2.6").code == 451


def test_a_failing_allow_list_alone_never_defers(tmp_path: Path, dns: DnsServer) -> None:
    """dnsbltempfail is about the blocklists: an allow list that fails allows nobody, and a
    blocked dnswl must not turn into 451 for every client."""
    ctl = control(tmp_path, dns, dnsbl="zen.test\n", dnswl="list.dnswl.test\n", dnsbltempfail="1\n")
    s = screen.load(ctl).dnsbl
    result = lookup(s, CLEAN)
    assert result.failed == ("list.dnswl.test",)
    assert dnsbl.verdict(result, s, CLEAN).action == "accept"


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("dnsbl", "zen.test=127.0.0.[2..300]\n", "filter of zen.test, octet 4: '300' is not"),
        ("dnsbl", "zen.test=127.0.0.[9..2]\n", "range '9..2' is empty"),
        ("dnsbl", "zen.test=127.0.0\n", "is not four octets"),
        ("dnsbl", "zen.test=127.0.0.[]\n", r"\[\] holds no number"),
        ("dnsbl", "zen.test=127.0.0.2*0\n", "weight of zen.test must be 1 to 100"),
        ("dnsbl", "zen.test=3*2\n", "two weights"),
        ("dnsbl", "zen.test=\n", "nothing after the ="),
        ("dnsbl", "zen.test=127.0.0.2\nzen.test=127.0.0.2*4\n", "listed twice"),
        ("dnswl", "list.dnswl.org=127.0.0.2*2\n", "an allow list takes a filter but no weight"),
    ],
)
def test_bad_filters_are_refused_naming_the_line(
    tmp_path: Path, name: str, text: str, problem: str
) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ControlError, match=problem) as exc:
        screen.load(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / name}:{text.count(chr(10))}: ")


def test_an_allow_list_given_twice_is_read_once(tmp_path: Path) -> None:
    """Before the filters, a dnswl listing a zone twice (with and without its trailing dot)
    loaded; it must still load, once (a review found the daemon refused to start)."""
    (tmp_path / "dnswl").write_text("list.dnswl.org\nlist.dnswl.org.\n")
    allow = screen.load(tmp_path).dnsbl
    assert [e.zone for e in allow.allow] == ["list.dnswl.org"]
