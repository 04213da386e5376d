"""pyqmail_dns__spf_extra terms (module_utils/pyqmail_spf.py): the preflight and the zone filter
refuse a term that makes the record a permerror, and what they accept, published on a real
knotd, is no permerror to pyspf (RFC 7208 4.6: one syntax error fails every message).

Each refused term is also served in a record of its own and must be a permerror to pyspf:
the proof that the refusal is needed, and that pyspf here would see a bad accepted record.
So is each term refused only in the record of a domain the host serves (an include: of that
record itself); the terms only a record of their own can hold (the GOOD record is at the 10
lookups) are served so, and must pass and fail as their names say.
"""

from __future__ import annotations

import gc
import re
import time
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
NUMBER = (
    "ends with the label {label!r}: the last label of a domain is 1 to 63 letters and digits with "
    "at least one letter, or letters, digits and '-' with a '-' neither first nor last "
    "(RFC 7208 7.1 toplabel)"
)
LOOP = (
    "includes the record it is in (%{d} is the domain whose record is read, %{o} the sender's, "
    "the same domain for its own mail): a loop, which every receiver ends with permerror "
    "(RFC 7208 4.6.4)"
)
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
    ("a:host.123-", NUMBER.format(label="123-")),
    ("mx:host.-123", NUMBER.format(label="-123")),
    ("include:host.a_b", NUMBER.format(label="a_b")),
    ("include:%{d}", LOOP),
    ("include:%{o}", LOOP),
    ("include:%{D.}", LOOP),
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
    "host.123-456. 300 IN A 192.0.2.80\n"
    "bob\\@alone1.t.test.at.t.test. 300 IN A 127.0.0.2\n"
)
# knotd takes '{' and '}' in an owner only as \DDD, which split_zones would undo
ESCAPED = "192.0.2.82.\\123x\\125.t.test. 300 IN A 127.0.0.2\n"
# valid terms each in a record of its own at alone<N>.t.test: (term, ip, sender, result)
ALONE = [
    ("a:host.123-456", "192.0.2.80", "a", "pass"),  # a top label of digits and '-'
    ("a:host.123-456", "192.0.2.81", "a", "fail"),
    ("exists:%{l}@%{d}.at.t.test", "192.0.2.99", "bob", "pass"),  # '@' beside macros
    ("exists:%{l}@%{d}.at.t.test", "192.0.2.99", "eve", "fail"),
    ("exists:%{i}.{x}.t.test", "192.0.2.82", "a", "pass"),  # '{' and '}' as literals
    ("a:%{d}/3%{d}", "192.0.2.82", "a", "fail"),  # '/' as a literal, the name has no A
]
ALONE_TERMS = list(dict.fromkeys(t for t, _ip, _s, _r in ALONE))
# terms that include the record of the domain named: (term, domain)
SELF = [
    ("include:self0.t.test", "self0.t.test"),
    ("include:SELF1.t.test.", "self1.t.test"),
    ("include:%{d3}", "self2.t.test"),
    ("include:%{d-}", "self3.t.test"),
    ("include:%{o3r}", "t3.t.t3"),
]


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
    text += "".join(
        f'alone{i}.t.test. 300 IN TXT "v=spf1 {term} -all"\n' for i, term in enumerate(ALONE_TERMS)
    )
    text += "".join(f'{domain}. 300 IN TXT "v=spf1 {term} -all"\n' for term, domain in SELF)
    zones = split_zones(text, ["t.test.", "t3.", "123-456.", "100.51.198.in-addr.arpa."])
    zones["t.test."] += ESCAPED
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


@pytest.mark.parametrize(("term", "ip", "local", "result"), ALONE)
def test_terms_with_other_literals_are_accepted_and_no_permerror_to_pyspf(
    served: tuple[DnsServer, str], term: str, ip: str, local: str, result: str
) -> None:
    assert list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", [term], {})) == []
    assert filters.dns_host(settings("mx1.t.test", spf_extra=[term]))["spf_extra"] == [term]
    sender = f"{local}@alone{ALONE_TERMS.index(term)}.t.test"
    got = _mail_from(served[0], ip, sender)
    assert got.result == result, got


@pytest.mark.parametrize(("term", "char"), [("a:mx@t.test/24", "@"), ("include:_spf!t.test", "!")])
def test_a_name_without_a_macro_is_a_host_name(term: str, char: str) -> None:
    """Valid SPF (pyspf takes it), but no host has such a name: refused on purpose."""
    problems = list(pyqmail_spf.check_spf_extra("v", ["a", term], {}))
    assert problems == [
        f"v[1]: {term!r} has {char!r} in a name without a macro: a host name has letters, "
        "digits, '-', '_' and dots (other characters only beside a macro: "
        "exists:%{l}@%{d}.example)"
    ]


def _loop(index: int, term: str, domain: str, where: str) -> str:
    return (
        f"pyqmail_dns__spf_extra[{index}]: {term!r} includes, in the SPF record of {domain} "
        f"({where}), that record itself: a loop, which every receiver ends with permerror "
        "(RFC 7208 4.6.4)"
    )


@pytest.mark.parametrize(("term", "domain"), SELF)
def test_an_include_of_the_own_record_is_refused_and_a_permerror_to_pyspf(
    served: tuple[DnsServer, str], term: str, domain: str
) -> None:
    # the host's name is one in whose record none of the terms loops
    values = {"pyqmail__me": "mx-1.a.t.test", "pyqmail_control__locals": [domain]}
    got = list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", ["a", term], values))
    expected = _loop(1, term, domain, "pyqmail_control__locals")
    assert got == [expected]
    host = settings("mx-1.a.t.test", locals=[domain], spf_extra=["a", term])
    with pytest.raises(AnsibleFilterError, match=re.escape(expected)):
        filters.dns_host(host)
    assert _mail_from(served[0], "192.0.2.1", f"a@{domain}").result == "permerror"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"pyqmail__me": "T.test."}, "pyqmail__me"),
        ({"pyqmail_dns__send_domains": ["t.test"]}, "pyqmail_dns__send_domains"),
        (
            {"pyqmail_dkim__enabled": True, "pyqmail_dkim__domains": ["t.test"]},
            "pyqmail_dkim__domains",
        ),
    ],
)
def test_the_preflight_names_the_variable_that_publishes_the_record(
    values: dict[str, object], where: str
) -> None:
    got = list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", ["include:t.test"], values))
    assert got == [_loop(0, "include:t.test", "t.test", where)]


@pytest.mark.parametrize(
    ("over", "where"),
    [
        ({"me": "t.test", "locals": ["mx1.t.test"]}, "pyqmail__me"),
        ({"send_domains": ["t.test"]}, "pyqmail_dns__send_domains"),
        (
            {"dkim": [{"domain": "t.test", "selector": "s", "txt": "v=DKIM1; p=x"}]},
            "pyqmail_dkim__domains",
        ),
    ],
)
def test_the_zone_filter_names_the_setting_that_publishes_the_record(
    over: dict[str, object], where: str
) -> None:
    expected = _loop(0, "include:t.test", "t.test", where)
    with pytest.raises(AnsibleFilterError, match=re.escape(expected)):
        filters.dns_host(settings("mx1.t.test", spf_extra=["include:t.test"], **over))


def test_a_backup_mx_may_include_the_domain_it_relays_for() -> None:
    """The review of session 37: a backup MX sending through the smarthost of the partner it
    relays for (include:partner.example) is no loop, as the run writes no SPF record for a
    domain whose primary is elsewhere; the preflight and both filters accept it, and the term
    is in the SPF of the host's name only (the partner's own record is the partner's)."""
    values = {"pyqmail__me": "mx2.t.test", "pyqmail_control__relay_domains": ["partner.example"]}
    term = ["include:partner.example"]
    assert list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", term, values)) == []
    mx2 = settings("mx2.t.test", relay_domains=["partner.example"], spf_extra=term)
    mx2["ipv4"] = ["192.0.2.26"]
    text = filters.dns_zone([filters.dns_host(mx2)], "mx2.t.test")
    spf = [line for line in text.splitlines() if "v=spf1" in line]
    assert spf == ['mx2.t.test. 3600 IN TXT "v=spf1 ip4:192.0.2.26 include:partner.example -all"']
    assert "; partner.example: no host of this run has it as a local domain" in text


def test_an_include_of_a_relay_domain_whose_record_the_run_writes_is_refused() -> None:
    """When another host of the run has the relayed domain as its own, the run writes its SPF
    record with the terms of every host serving it, the backup MX's include: too: a loop,
    refused by the zone filter, which alone sees both hosts; pyspf ends it with permerror."""
    term = "include:partner.example"
    mx1 = settings("mx1.partner.example", locals=["partner.example"], ipv4=["192.0.2.25"])
    mx2 = settings("mx2.t.test", relay_domains=["partner.example"], spf_extra=[term])
    hosts = [filters.dns_host(mx1), filters.dns_host(mx2)]
    expected = (
        f"pyqmail_dns__spf_extra of mx2.t.test: {term!r} includes, in the SPF record of "
        "partner.example (which this run writes, as mx1.partner.example has it as its own "
        "domain), that record itself: a loop, which every receiver ends with permerror "
        "(RFC 7208 4.6.4)"
    )
    for host in ("mx1.partner.example", "mx2.t.test"):
        with pytest.raises(AnsibleFilterError, match=re.escape(expected)):
            filters.dns_zone(hosts, host)
    record = 'partner.example. 300 IN TXT "v=spf1 ip4:192.0.2.25 include:partner.example -all"\n'
    with DnsServer({"partner.example.": record}) as server:  # the record the run would write
        assert _mail_from(server, "192.0.2.1", "a@partner.example").result == "permerror"


def test_an_include_of_another_domain_or_a_macro_naming_another_is_accepted() -> None:
    values = {"pyqmail__me": "mx1.t.test", "pyqmail_control__locals": ["mx1.t.test"]}
    terms = ["include:t.test", "include:%{d2}", "include:_spf.%{d}", "include:%{dr}"]
    assert list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", terms, values)) == []
    assert filters.dns_host(settings("mx1.t.test", spf_extra=terms))["spf_extra"] == terms


# --- include: loops across the hosts of a run -------------------------------------------------

LOOP_END = (
    "a receiver that follows it, for any address these records do not list before it (the "
    "servers of an outside provider an include: is there for), ends with permerror (RFC 7208 "
    '4.6.4; pyspf: "Too many DNS lookups"): drop one of these include: terms, or put the other '
    "host's ip4:/ip6: in place of its include:"
)
# how pyspf ends a loop of two records: no loop named, the 11th lookup (RFC 7208 4.6.4)
TOO_MANY = "SPF Permanent Error: Too many DNS lookups"


def _zone_hosts(**hosts: tuple[str, list[str]]) -> list[dict[str, object]]:
    """The pyqmail_dns_host results of hosts mx<N> (name mx<N>.<domain>, one address each)
    with (local domain, spf_extra) each, for the zone filter."""
    return [
        filters.dns_host(
            settings(
                f"{host}.{domain}", locals=[domain], spf_extra=extra, ipv4=[f"192.0.2.{20 + i}"]
            )
            | {"host": host}
        )
        for i, (host, (domain, extra)) in enumerate(sorted(hosts.items()))
    ]


def _zone_refuses(hosts: list[dict[str, object]], host: str, message: str) -> None:
    with pytest.raises(AnsibleFilterError) as failed:
        filters.dns_zone(hosts, host)
    assert str(failed.value) == message


def test_an_include_loop_across_two_hosts_is_refused_naming_both() -> None:
    """mx1 writes the SPF of a.example with include:b.example, mx2 that of b.example with
    include:a.example: each term alone is fine (the preflight, which sees one host, passes
    both), together pyspf (here, on a real knotd serving the two records the run would write)
    ends with permerror for an address neither lists, and passes the ones listed before the
    include: the zone filter refuses the zone of both hosts."""
    hosts = _zone_hosts(
        mx1=("a.example", ["include:b.example"]), mx2=("b.example", ["include:A.example."])
    )
    for host, domain, extra in (
        ("mx1", "a.example", "include:b.example"),
        ("mx2", "b.example", "include:A.example."),
    ):
        values = {"pyqmail__me": f"{host}.{domain}", "pyqmail_control__locals": [domain]}
        assert list(pyqmail_spf.check_spf_extra("pyqmail_dns__spf_extra", [extra], values)) == []
    expected = (
        "pyqmail_dns__spf_extra: an include loop across the SPF records a.example, b.example, "
        "which this run writes: that of a.example has 'include:b.example' (of mx1), that of "
        f"b.example has 'include:a.example.' (of mx2); {LOOP_END}"
    )
    for host in ("mx1", "mx2"):
        _zone_refuses(hosts, host, expected)
    records = (
        'a.example. 300 IN TXT "v=spf1 ip4:192.0.2.20 include:b.example -all"\n'
        'b.example. 300 IN TXT "v=spf1 ip4:192.0.2.21 include:A.example. -all"\n'
    )
    with DnsServer(split_zones(records, ["a.example.", "b.example."])) as server:
        for sender in ("x@a.example", "x@b.example"):
            got = _mail_from(server, "198.51.100.1", sender)
            assert (got.result, got.reason) == ("permerror", TOO_MANY), got
        assert _mail_from(server, "192.0.2.20", "x@a.example").result == "pass"
        assert _mail_from(server, "192.0.2.21", "x@b.example").result == "pass"


def test_a_longer_loop_through_a_host_name_and_shared_records_is_refused() -> None:
    """a.example -> mx2.b.example (the SPF of mx2's name, which gets its terms) -> c.example
    -> a.example; c.example's record gets the terms of both hosts that have it local. Each
    host whose zone holds a record of the loop is refused; mx4, whose d.example includes
    a.example (a way in, no way back), passes, and its include: is named in no message."""
    hosts = _zone_hosts(
        mx1=("a.example", ["include:mx2.b.example"]),
        mx2=("b.example", ["include:c.example"]),
        mx3=("c.example", ["ip4:192.0.2.9", "include:a.example"]),
        mx4=("d.example", ["include:a.example"]),
        mx5=("c.example", ["include:a.example"]),
    )
    expected = (
        "pyqmail_dns__spf_extra: an include loop across the SPF records a.example, c.example, "
        "mx2.b.example, which this run writes: that of a.example has 'include:mx2.b.example' "
        "(of mx1), that of c.example has 'include:a.example' (of mx3, mx5), that of "
        f"mx2.b.example has 'include:c.example' (of mx2); {LOOP_END}"
    )
    for host in ("mx1", "mx2", "mx3", "mx5"):
        _zone_refuses(hosts, host, expected)
    assert "include:a.example" in filters.dns_zone(hosts, "mx4")


def test_a_host_whose_name_record_is_not_written_is_not_refused_for_a_loop_on_that_name() -> None:
    """web's name is a.example, a mail domain on a loop whose record mx1 writes; web sends
    nothing and has no terms, so its zone writes no SPF record of its name (only the comment
    to publish one's own): it holds no record of the loop and passes, mx1 and mx2 do not."""
    hosts = _zone_hosts(
        mx1=("a.example", ["include:b.example"]), mx2=("b.example", ["include:a.example"])
    )
    web = settings("a.example", locals=[], send_domains=["c.example"], sends=False, receives=False)
    hosts.append(filters.dns_host(web | {"host": "web"}))
    assert "; no sender known for a.example" in filters.dns_zone(hosts, "web")
    for host in ("mx1", "mx2"):
        with pytest.raises(AnsibleFilterError, match="an include loop"):
            filters.dns_zone(hosts, host)


def test_a_cross_include_without_a_way_back_passes() -> None:
    """A includes B, B does not include A: no loop; nor is an include of a domain the run
    writes no record of (b.example's primary is outside: mx2 only relays for it), whatever
    that domain's own record says: no DNS is asked."""
    hosts = _zone_hosts(
        mx1=("a.example", ["include:b.example"]), mx2=("b.example", ["ip4:192.0.2.9"])
    )
    text = filters.dns_zone(hosts, "mx1")
    assert 'a.example. 3600 IN TXT "v=spf1 ip4:192.0.2.20 include:b.example -all"' in text
    relay = settings("mx2.c.example", relay_domains=["b.example"], spf_extra=["include:a.example"])
    hosts = [hosts[0], filters.dns_host(relay | {"host": "mx2"})]
    assert "; --- b.example" in filters.dns_zone(hosts, "mx2")
    assert filters.dns_zone(hosts, "mx1")


def test_each_loop_is_told_once_naming_every_include_on_it() -> None:
    """Loops sharing records are one strongly connected component, told once, each include:
    from one of its records to another named (with every host giving it); a.example's and
    mx3's name's include:b.example lead into it but are on no loop: not named. A second,
    separate loop (e.example, f.example) is a second message; mx6 is on neither."""
    hosts = _zone_hosts(
        mx1=("a.example", ["include:b.example"]),
        mx2=("b.example", ["include:mx1.a.example", "include:c.example"]),
        mx3=("c.example", ["include:b.example", "include:mx2.b.example"]),
        mx4=("e.example", ["include:f.example"]),
        mx5=("f.example", ["include:e.example"]),
        mx6=("g.example", ["include:e.example"]),
    )
    loops = pyqmail_spf.include_loops(filters._spf_records(hosts))
    assert [sorted(writers) for writers, _m in loops] == [["mx1", "mx2", "mx3"], ["mx4", "mx5"]]
    assert loops[0][1] == (
        "pyqmail_dns__spf_extra: an include loop across the SPF records b.example, c.example, "
        "mx1.a.example, mx2.b.example, which this run writes: that of b.example has "
        "'include:c.example' (of mx2) and 'include:mx1.a.example' (of mx2), that of c.example "
        "has 'include:b.example' (of mx3) and 'include:mx2.b.example' (of mx3), that of "
        "mx1.a.example has 'include:b.example' (of mx1), that of mx2.b.example has "
        "'include:c.example' (of mx2) and 'include:mx1.a.example' (of mx2); " + LOOP_END
    )
    assert loops[1][1].startswith(
        "pyqmail_dns__spf_extra: an include loop across the SPF records e.example, f.example, "
    )
    assert "mx6" not in loops[1][1]
    assert "; --- g.example" in filters.dns_zone(hosts, "mx6")
    for host in ("mx1", "mx2", "mx3", "mx4", "mx5"):
        with pytest.raises(AnsibleFilterError, match="an include loop"):
            filters.dns_zone(hosts, host)


def _ring(n: int) -> list[dict[str, object]]:
    """n hosts, each d<i>.example local and including d<i+1>.example, the last d0.example:
    one loop through every host's domain (and every host's name includes the next domain)."""
    return [
        filters.dns_host(
            settings(
                f"mx{i}.d{i}.example",
                locals=[f"d{i}.example"],
                spf_extra=[f"include:d{(i + 1) % n}.example"],
                ipv4=[f"10.{i >> 8 & 255}.{i & 255}.1"],
            )
            | {"host": f"mx{i}"}
        )
        for i in range(n)
    ]


def _refusal_time(hosts: list[dict[str, object]]) -> float:
    """Best CPU time of a few dns_zone calls of one host of ``hosts`` (each refused), with the
    cyclic garbage collector paused as tests/unit/test_linear_parsers.py does."""
    best = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            start = time.process_time()
            with pytest.raises(AnsibleFilterError, match="an include loop"):
                filters.dns_zone(hosts, "mx0")
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
    return best


def test_the_loop_check_is_linear_in_the_hosts() -> None:
    """Every host's zone is computed over every host of the run, so the loop check in it must
    be linear: at 2N hosts (one loop through all) at most 3x the time at N, a quadratic check
    is 4x (the search of the shortest way back per include took 6 s at 500 hosts). As in
    test_linear_parsers.py: a busy machine may slow one pair, so up to 3 pairs."""
    small, big = _ring(2000), _ring(4000)
    seen = []
    for _ in range(3):
        t1, t2 = _refusal_time(small), _refusal_time(big)
        if t2 <= 3.0 * t1 + 0.01:
            return
        seen.append(f"{t1:.4f}s, {t2:.4f}s")
    raise AssertionError(f"2000 and 4000 hosts took {'; '.join(seen)}")
