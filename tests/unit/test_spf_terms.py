"""pyqmail_dns__spf_extra terms (module_utils/pyqmail_spf.py): the preflight and the zone filter
refuse a term that makes the record a permerror, and what they accept, published on a real
knotd, is no permerror to pyspf (RFC 7208 4.6: one syntax error fails every message).

Each refused term is also served in a record of its own and must be a permerror to pyspf:
the proof that the refusal is needed, and that pyspf here would see a bad accepted record.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from ansible.errors import AnsibleFilterError

from pyqmail.checks import spf
from pyqmail.checks.resolver import make_resolver
from tests.collection import module_utils
from tests.dnsserver import DnsServer, split_zones
from tests.dnszone import filters, settings

pyqmail_spf = module_utils("pyqmail_spf")

ADDRESS = "names an IP address, not a domain: write ip{v}:{rest} (RFC 7208 5: "
MACRO = "has the macro %{{{letter}...}}: a domain takes only the macro letters s l o d i p h v"
NUMBER = "ends with the label {label!r}: the last label of a domain needs a letter (RFC 7208 7.1)"
NOT_A_TERM = "is not an SPF term: "
BAD = [
    ("a:192.0.2.1", ADDRESS.format(v=4, rest="192.0.2.1")),
    ("a:192.0.2.0/24", ADDRESS.format(v=4, rest="192.0.2.0/24")),
    ("mx:192.0.2.1", ADDRESS.format(v=4, rest="192.0.2.1")),
    ("include:192.0.2.1", ADDRESS.format(v=4, rest="192.0.2.1")),
    ("exists:192.0.2.1", ADDRESS.format(v=4, rest="192.0.2.1")),
    ("a:2001:db8::1", ADDRESS.format(v=6, rest="2001:db8::1")),
    ("include:%{x}.example.net", MACRO.format(letter="x")),
    ("exists:%{c}.t.test", MACRO.format(letter="c")),
    ("exists:%{i}.%{r}.t.test", MACRO.format(letter="r")),
    ("include:example.123", NUMBER.format(label="123")),
    ("a:host.t.123/24", NUMBER.format(label="123")),
    ("exists:%{i}.123", NUMBER.format(label="123")),
    ("exists:%{i}-x", NOT_A_TERM),
    ("exists:%{i}.x%y.t.test", NOT_A_TERM),
]
# every kind of term, each name published below: the record must evaluate to pass or fail
GOOD = [
    "a",
    "mx",
    "a:out.t.test/24",
    "mx:t.test//64",
    "include:_spf.relay.t.test.",
    "exists:%{ir}.%{l1r-}.allow.t.test",
    "a:%{d}",
    "include:_spf.%{d2}",
    "exists:%{i}.ok.t.test.",
    "a:x.123-a.t.test",
]
SERVED = (
    "t.test. 300 IN A 192.0.2.50\n"
    "out.t.test. 300 IN A 192.0.2.60\n"
    "x.123-a.t.test. 300 IN A 192.0.2.70\n"
    '_spf.relay.t.test. 300 IN TXT "v=spf1 ip4:203.0.113.0/28 -all"\n'
    '_spf.t.test. 300 IN TXT "v=spf1 ip4:203.0.113.64/28 -all"\n'
    "1.1.0.192.bob.allow.t.test. 300 IN A 127.0.0.2\n"
    "9.0.2.192.ok.t.test. 300 IN A 127.0.0.2\n"
)


@pytest.mark.parametrize(("term", "message"), BAD, ids=[t for t, _m in BAD])
def test_the_preflight_refuses_a_term_naming_it(term: str, message: str) -> None:
    problems = list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", [term], {}))
    assert len(problems) == 1
    assert problems[0].startswith(f"pyqmail_dns__spf_extra[0]: {term!r} {message}")


@pytest.mark.parametrize(("term", "message"), BAD, ids=[t for t, _m in BAD])
def test_the_zone_filter_refuses_a_term_naming_it(term: str, message: str) -> None:
    expected = f"pyqmail_dns__spf_extra[1]: {term!r} {message}"
    with pytest.raises(AnsibleFilterError, match=re.escape(expected)):
        filters.dns_host(settings("mx1.t.test", spf_extra=["a", term]))


def test_every_kind_of_valid_term_is_accepted() -> None:
    assert list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", GOOD, {})) == []
    host = filters.dns_host(settings("mx1.t.test", ipv4=["198.51.100.7"], spf_extra=GOOD))
    assert host["spf_extra"] == GOOD


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[DnsServer, str]]:
    """The zone the role writes for mx1.t.test (t.test local, every GOOD term), with the names
    the terms ask for, and one record per BAD term at bad<N>.t.test."""
    host = filters.dns_host(
        settings("mx1.t.test", ipv4=["198.51.100.7"], locals=["t.test"], spf_extra=GOOD)
    )
    text = filters.dns_zone([host], "mx1.t.test") + SERVED
    text += "".join(
        f'bad{i}.t.test. 300 IN TXT "v=spf1 ip4:198.51.100.7 {term} -all"\n'
        for i, (term, _message) in enumerate(BAD)
    )
    zones = split_zones(text, ["t.test.", "100.51.198.in-addr.arpa."])
    with DnsServer(zones) as server:
        yield server, text


def _mail_from(server: DnsServer, ip: str, sender: str) -> spf.SpfResult:
    res = make_resolver([(server.host, server.port)], timeout=2.0)
    return spf.check(res, ip, sender, "client.example", budget=10.0)[1]


@pytest.mark.parametrize(
    ("ip", "sender", "result"),
    [
        ("198.51.100.7", "a@t.test", "pass"),  # the host's own ip4:
        ("192.0.2.50", "a@t.test", "pass"),  # a, a:%{d}
        ("192.0.2.61", "a@t.test", "pass"),  # a:out.t.test/24
        ("203.0.113.5", "a@t.test", "pass"),  # include:_spf.relay.t.test.
        ("203.0.113.65", "a@t.test", "pass"),  # include: ending with a macro
        ("192.0.2.1", "bob@t.test", "pass"),  # exists: with macros
        ("192.0.2.9", "a@t.test", "pass"),  # exists: ending with the root's dot
        ("192.0.2.70", "a@t.test", "pass"),  # a top label with a digit and a letter
        ("203.0.113.99", "a@t.test", "fail"),  # every term looked at, none matches
    ],
)
def test_accepted_terms_are_no_permerror_to_pyspf(
    served: tuple[DnsServer, str], ip: str, sender: str, result: str
) -> None:
    server, text = served
    record = f"v=spf1 ip4:198.51.100.7 {' '.join(sorted(GOOD))} -all"
    assert f't.test. 3600 IN TXT "{record}"' in text
    got = _mail_from(server, ip, sender)
    assert got.result == result, got


@pytest.mark.parametrize("index", range(len(BAD)), ids=[t for t, _m in BAD])
def test_each_refused_term_is_a_permerror_to_pyspf(
    served: tuple[DnsServer, str], index: int
) -> None:
    got = _mail_from(served[0], "198.51.100.7", f"a@bad{index}.t.test")
    assert got.result == "permerror", got
