"""DMARC (pyqmail.checks.dmarc) against records served by a real knotd: alignment relaxed
and strict, p, sp, np (RFC 9091: subdomains that do not exist), pct, the organisational
domain from the public suffix list, and the action each configured verdict gives
(pyqmail.checks.authresults.decide)."""

from __future__ import annotations

import re
import time

import pytest

from pyqmail.checks.authresults import Results, decide, header
from pyqmail.checks.dkimverify import DkimResult
from pyqmail.checks.dmarc import DmarcResult, _authenticated, check, org_domain
from pyqmail.checks.resolver import exists, make_resolver
from pyqmail.checks.spf import SpfResult
from tests.dnsserver import free_port, silent_for, silent_server

SMTP_REPLY = re.compile(r"[45]\d\d [\x20-\x7e]+")  # what SMTPConnection.message_failed takes
ZONES = {
    "bank.test.": '_dmarc TXT "v=DMARC1; p=reject; sp=quarantine"\n',
    "strict.test.": '_dmarc TXT "v=DMARC1; p=reject; adkim=s; aspf=s"\n',
    "pct.test.": '_dmarc TXT "v=DMARC1; p=reject; pct=30"\n',
    "two.test.": '_dmarc TXT "v=DMARC1; p=reject"\n_dmarc TXT "v=DMARC1; p=none"\n',
    "badp.test.": '_dmarc TXT "v=DMARC1; p=bogus"\n',
    "nodmarc.test.": '_dmarc TXT "v=spf1 -all"\n',
    "own.bank.test.": '_dmarc TXT "v=DMARC1; p=none"\n',
    "example.co.uk.": '_dmarc TXT "v=DMARC1; p=quarantine"\n',
    "plain.test.": "@ A 192.0.2.1\n",
    "twice.bank.test.": '_dmarc TXT "v=DMARC1; p=none"\n_dmarc TXT "v=DMARC1; p=none; pct=5"\n',
    "pctsup.test.": '_dmarc TXT "v=DMARC1; p=reject; pct=\\194\\178"\n',  # pct=² (UTF-8)
    "xn--bcher-kva.test.": '_dmarc TXT "v=DMARC1; p=reject; adkim=s"\n',  # bücher.test
    # np= (RFC 9091): www has an address, mail only an MX, deep is an empty non-terminal
    # (x.deep has an address), alias a CNAME to a name that does not exist: all exist.
    "np.test.": (
        '_dmarc TXT "v=DMARC1; p=none; sp=none; np=reject"\n'
        "www A 192.0.2.1\nmail MX 10 mx.example.\nx.deep A 192.0.2.2\nalias CNAME gone\n"
    ),
    "badnp.test.": '_dmarc TXT "v=DMARC1; p=none; sp=quarantine; np=rejected"\n',
    "nponly.test.": '_dmarc TXT "v=DMARC1; p=none; np=reject"\n',
    "npsame.test.": '_dmarc TXT "v=DMARC1; p=none; sp=reject; np=reject"\n',
    "nppct.test.": '_dmarc TXT "v=DMARC1; p=none; sp=none; np=reject; pct=50"\n',
}
NO_SPF = SpfResult("mailfrom", "fail", "elsewhere.example")


def head(from_: str) -> bytes:
    return f"From: Someone <{from_}>\r\nSubject: x\r\n".encode()


def dkim_pass(domain: str) -> list[DkimResult]:
    return [DkimResult("pass", domain, "s1", "rsa-sha256")]


@pytest.fixture(scope="module")
def resolver(dns_server):
    return make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)


CASES = [
    # (case, From, SPF, DKIM, roll, (result, policy))
    ("aligned dkim", "a@bank.test", NO_SPF, dkim_pass("bank.test"), 0, ("pass", "none")),
    (
        "relaxed dkim subdomain",
        "a@bank.test",
        NO_SPF,
        dkim_pass("mail.bank.test"),
        0,
        ("pass", "none"),
    ),
    (
        "aligned spf",
        "a@bank.test",
        SpfResult("mailfrom", "pass", "bounce.bank.test"),
        [],
        0,
        ("pass", "none"),
    ),
    ("unaligned dkim", "a@bank.test", NO_SPF, dkim_pass("evil.test"), 0, ("fail", "reject")),
    ("dkim fail", "a@bank.test", NO_SPF, [DkimResult("fail", "bank.test")], 0, ("fail", "reject")),
    (
        "spf softfail",
        "a@bank.test",
        SpfResult("mailfrom", "softfail", "bank.test"),
        [],
        0,
        ("fail", "reject"),
    ),
    (
        "failing + passing dkim",
        "a@bank.test",
        NO_SPF,
        [DkimResult("fail", "bank.test"), *dkim_pass("bank.test")],
        0,
        ("pass", "none"),
    ),
    (
        "dkim temperror",
        "a@bank.test",
        NO_SPF,
        [DkimResult("temperror", "bank.test")],
        0,
        ("temperror", "none"),
    ),
    (
        "dkim fail + temperror",
        "a@bank.test",
        NO_SPF,
        [DkimResult("fail", "bank.test"), DkimResult("temperror", "bank.test")],
        0,
        ("temperror", "none"),
    ),
    (
        "spf temperror",
        "a@bank.test",
        SpfResult("mailfrom", "temperror", "bank.test"),
        [],
        0,
        ("temperror", "none"),
    ),
    (
        "unaligned temperror",
        "a@bank.test",
        NO_SPF,
        [DkimResult("temperror", "evil.test")],
        0,
        ("fail", "reject"),
    ),
    (
        "strict dkim subdomain",
        "a@strict.test",
        NO_SPF,
        dkim_pass("mail.strict.test"),
        0,
        ("fail", "reject"),
    ),
    (
        "strict spf subdomain",
        "a@strict.test",
        SpfResult("mailfrom", "pass", "b.strict.test"),
        [],
        0,
        ("fail", "reject"),
    ),
    ("strict exact", "a@strict.test", NO_SPF, dkim_pass("strict.test"), 0, ("pass", "none")),
    ("sp for a subdomain", "a@x.bank.test", NO_SPF, [], 0, ("fail", "quarantine")),
    ("own record of a subdomain", "a@own.bank.test", NO_SPF, [], 0, ("fail", "none")),
    ("pct sampled in", "a@pct.test", NO_SPF, [], 29, ("fail", "reject")),
    ("pct sampled out", "a@pct.test", NO_SPF, [], 30, ("fail", "quarantine")),
    ("two records", "a@two.test", NO_SPF, [], 0, ("none", "none")),
    # 6.6.3: more than one record stops DMARC; no org domain lookup (bank.test: sp=quarantine)
    ("two records at a subdomain", "a@twice.bank.test", NO_SPF, [], 0, ("none", "none")),
    ("pct not ASCII digits: 100", "a@pctsup.test", NO_SPF, [], 99, ("fail", "reject")),
    ("idn aligned", "a@bücher.test", NO_SPF, dkim_pass("xn--bcher-kva.test"), 0, ("pass", "none")),
    (
        "idn spf aligned",
        "a@bücher.test",
        SpfResult("mailfrom", "pass", "bücher.test"),
        [],
        0,
        ("pass", "none"),
    ),
    ("idn unaligned", "a@bücher.test", NO_SPF, dkim_pass("evil.test"), 0, ("fail", "reject")),
    ("invalid p", "a@badp.test", NO_SPF, [], 0, ("fail", "none")),
    ("not a DMARC record", "a@nodmarc.test", NO_SPF, [], 0, ("none", "none")),
    ("no record", "a@mail.plain.test", NO_SPF, [], 0, ("none", "none")),
    ("psl org domain", "a@mail.example.co.uk", NO_SPF, [], 0, ("fail", "quarantine")),
    (
        "psl aligned",
        "a@mail.example.co.uk",
        NO_SPF,
        dkim_pass("example.co.uk"),
        0,
        ("pass", "none"),
    ),
    (
        "psl: co.uk is no org domain",
        "a@example.co.uk",
        NO_SPF,
        dkim_pass("other.co.uk"),
        0,
        ("fail", "quarantine"),
    ),
]


@pytest.mark.parametrize("row", CASES, ids=[c[0] for c in CASES])
def test_dmarc(resolver, row):
    case, from_, spf, dkim, roll, want = row
    result = check(resolver, head(from_), spf, dkim, roll=roll)
    assert (result.result, result.policy) == want, f"{case}: {result}"


NP_CASES = [
    # (case, From, DKIM, roll, (result, policy, tag, published))
    ("non-existent subdomain: np", "a@ghost.np.test", [], 0, ("fail", "reject", "np", "reject")),
    ("deeper non-existent: np", "a@a.b.ghost.np.test", [], 0, ("fail", "reject", "np", "reject")),
    ("subdomain with an A: sp", "a@www.np.test", [], 0, ("fail", "none", "sp", "none")),
    ("subdomain with an MX only: sp", "a@mail.np.test", [], 0, ("fail", "none", "sp", "none")),
    ("empty non-terminal exists: sp", "a@deep.np.test", [], 0, ("fail", "none", "sp", "none")),
    ("CNAME to nowhere exists: sp", "a@alias.np.test", [], 0, ("fail", "none", "sp", "none")),
    ("the org domain itself: p", "a@np.test", [], 0, ("fail", "none", "p", "none")),
    ("passes", "a@ghost.np.test", dkim_pass("np.test"), 0, ("pass", "none", "sp", "none")),
    ("invalid np: sp", "a@ghost.badnp.test", [], 0, ("fail", "quarantine", "sp", "quarantine")),
    ("no np: sp", "a@ghost.bank.test", [], 0, ("fail", "quarantine", "sp", "quarantine")),
    ("np without sp", "a@ghost.nponly.test", [], 0, ("fail", "reject", "np", "reject")),
    ("np, pct sampled in", "a@ghost.nppct.test", [], 49, ("fail", "reject", "np", "reject")),
    ("np, pct sampled out", "a@ghost.nppct.test", [], 50, ("fail", "quarantine", "np", "reject")),
]


@pytest.mark.parametrize("row", NP_CASES, ids=[c[0] for c in NP_CASES])
def test_np(resolver, row):
    """RFC 9091 np=: the policy for a subdomain that does not exist (NXDOMAIN), only when
    the record came from the organisational domain and the message fails."""
    case, from_, dkim, roll, want = row
    r = check(resolver, head(from_), NO_SPF, dkim, roll=roll)
    assert (r.result, r.policy) == want[:2], f"{case}: {r}"
    assert (r.tag, r.published) == want[2:], f"{case}: {r}"


def test_np_in_the_header_and_log(resolver):
    """The Authentication-Results comment and the log line name the tag applied."""
    r = check(resolver, head("a@ghost.np.test"), NO_SPF, [], roll=0)
    field = header("mx.example.org", Results(NO_SPF, NO_SPF, [], r)).decode()
    assert "dmarc=fail (np=reject dis=reject) header.from=ghost.np.test" in field
    verdict, _ = decide(r)
    assert "dmarc_policy=reject dmarc_tag=np dmarc_action=reject" in verdict.log
    assert verdict.code == 550


@pytest.mark.parametrize(
    ("rdtype", "want"),
    [("A", ("fail", "none", "sp")), ("MX", ("fail", "reject", "np"))],
)
def test_np_existence_lookup_that_hangs_gives_sp_within_the_budget(dns_server, rdtype, want):
    """The existence lookup shares the check's budget; when it does not answer, sp= applies
    as it did before np= was read: no stronger verdict (np=) on a DNS failure, no weaker.
    The same proxy that drops only MX queries lets the A query through: np= applies."""
    upstream = (dns_server.host, dns_server.port)
    with silent_for(upstream, "ghost.np.test.", rdtype=rdtype) as server:
        res = make_resolver([server], timeout=5.0)
        start = time.monotonic()
        r = check(res, head("a@ghost.np.test"), NO_SPF, [], roll=0, budget=1.0)
        elapsed = time.monotonic() - start
    assert (r.result, r.policy) == want[:2], r
    assert r.tag == want[2], r
    assert elapsed < 1.5, elapsed


@pytest.mark.parametrize(
    ("from_", "dkim", "want"),
    [
        ("a@ghost.np.test", dkim_pass("np.test"), "pass"),  # passes: no policy applies
        ("a@ghost.bank.test", [], "fail"),  # no np=
        ("a@ghost.badnp.test", [], "fail"),  # np= invalid
        ("a@ghost.npsame.test", [], "fail"),  # np= the same as sp=: nothing to decide
        ("a@np.test", [], "fail"),  # the org domain's own record: p=
    ],
)
def test_no_existence_lookup_when_it_cannot_matter(dns_server, from_, dkim, want):
    """Every A query of the From domain hangs: a check that asked would take its budget."""
    upstream = (dns_server.host, dns_server.port)
    with silent_for(upstream, from_.partition("@")[2] + ".", rdtype="A") as server:
        res = make_resolver([server], timeout=5.0)
        start = time.monotonic()
        r = check(res, head(from_), NO_SPF, dkim, roll=0, budget=2.0)
        elapsed = time.monotonic() - start
    assert r.result == want, r
    assert elapsed < 1.0, elapsed


def test_exists_says_none_when_dns_fails(resolver):
    """A failed existence lookup is neither yes nor no (dmarc then keeps sp=/p=)."""
    dead = make_resolver([("127.0.0.1", free_port())], timeout=0.5)
    assert exists(dead, "ghost.np.test.") is None
    assert exists(resolver, "ghost.np.test.", lifetime=0) is None  # no time left: not asked
    assert exists(resolver, "ghost.np.test.") is False
    assert exists(resolver, "www.np.test.") is True


def test_org_domain():
    assert org_domain("a.b.mail.example.co.uk") == "example.co.uk"
    assert org_domain("x.y.bank.test") == "bank.test"  # no listed suffix: the rule "*"
    assert org_domain("Example.COM.") == "example.com"


def test_a_from_dmarc_cannot_judge_is_permerror_refused(resolver):
    """Refused as a p=reject failure (``tests/checks/test_dmarc_from.py``); a From of
    several domains is judged per domain there."""
    r = check(resolver, b"From: a@x.test\r\nFrom: b@y.test\r\n", NO_SPF, [])
    assert (r.result, r.policy) == ("permerror", "reject"), r
    assert decide(r)[0].code == 550


@pytest.mark.parametrize(
    "from_header",
    [
        b"From: a@bank.test <b@y.test>\r\n",  # which one would a mail client show? both
        b"From: <a@bank.test> <b@y.test>\r\n",
        b"From: b@y.test <a@bank.test>\r\n",
    ],
)
def test_a_from_that_cannot_be_read_is_judged_on_every_domain_shown(resolver, from_header):
    """bank.test's p=reject applies, whichever of the two a mail client shows."""
    r = check(resolver, from_header, NO_SPF, [])
    assert (r.result, r.policy, r.header_from) == ("fail", "reject", "bank.test"), r
    assert decide(r)[0].code == 550


@pytest.mark.parametrize("value", [b"undisclosed", b"MAILER-DAEMON", b"Automated System:;"])
def test_a_from_naming_no_domain_is_permerror_accepted(resolver, value):
    r = check(resolver, b"From: " + value + b"\r\n", NO_SPF, [])
    assert (r.result, r.policy, r.reason) == ("permerror", "none", "header From names no domain")
    assert decide(r)[0].code == 250


def test_no_from_is_none(resolver):
    r = check(resolver, b"Subject: no from\r\n", NO_SPF, [])
    assert (r.result, r.policy) == ("none", "none"), r


@pytest.mark.parametrize("domain", ["bank..test", "x" * 64 + ".test", "\ufffd.test"])
def test_from_domain_without_a_labels_is_permerror(resolver, domain):
    """No DMARC record can be asked for (the lookup of such a name fails at once, which was a
    temperror: an accept for mail that DMARC could not be applied to); refused as a From
    DMARC cannot judge."""
    r = check(resolver, head(f"a@{domain}"), NO_SPF, [])
    assert (r.result, r.policy) == ("permerror", "reject"), r


def test_org_domain_of_an_idn_from_domain():
    """RFC 8616 4: a relaxed d= of the organisational domain aligns with an IDN From."""
    assert (
        _authenticated({}, "mail.bücher.example", NO_SPF, dkim_pass("xn--bcher-kva.example"))
        == "pass"
    )
    assert (
        _authenticated({}, "bücher.example", NO_SPF, dkim_pass("mail.xn--bcher-kva.example"))
        == "pass"
    )


def test_dead_server_is_temperror():
    res = make_resolver([("127.0.0.1", free_port())], timeout=0.5)
    assert check(res, head("a@bank.test"), NO_SPF, []).result == "temperror"


def test_dns_that_never_answers_costs_the_budget_not_the_lifetime():
    """The record lookups are bounded by the check's budget, not by the resolver's lifetime
    (5 s): the budget is what the message's checks have left."""
    with silent_server() as server:
        res = make_resolver([server], timeout=5.0)
        start = time.monotonic()
        result = check(res, head("ceo@mail.bank.test"), NO_SPF, [], budget=1.0)
        elapsed = time.monotonic() - start
    assert result.result == "temperror"
    assert elapsed < 1.5, elapsed


def test_decide_actions():
    fail_reject = DmarcResult("fail", "bank.test", "reject", "reject")
    fail_quarantine = DmarcResult("fail", "bank.test", "quarantine", "quarantine")
    verdict, junk = decide(fail_reject)
    assert (verdict.action, verdict.code, junk) == ("refuse", 550, False)
    assert verdict.text.startswith("5.7.1 ") and "bank.test" in verdict.text
    assert decide(fail_quarantine)[0].action == "accept" and decide(fail_quarantine)[1]
    assert decide(fail_reject, on_reject="quarantine")[1] is True
    assert decide(fail_reject, on_reject="none")[1] is False
    assert decide(fail_quarantine, on_quarantine="reject")[0].code == 550
    assert decide(DmarcResult("pass", "bank.test", "none", "reject"))[0].action == "accept"
    assert "dmarc_policy=reject" in verdict.log and "dmarc_action=reject" in verdict.log
    assert "dmarc_tag=p" in verdict.log
    assert "dmarc_tag=-" in decide(DmarcResult("none", "bank.test"))[0].log  # no record


@pytest.mark.parametrize(
    ("domain", "shown"),
    [
        ("bücher.example", "xn--bcher-kva.example"),  # an internationalised name: A-labels
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("b\x00d.example", "the header From domain"),  # no printable form
        ("a" * 64 + ".example", "the header From domain"),  # no IDNA form either
        ("bad\ufffd.example", "the header From domain"),  # a From that was not UTF-8
    ],
)
def test_refusal_text_is_printable_ascii(domain: str, shown: str) -> None:
    """A reply line is printable ASCII (RFC 5321 4.2): the core refuses any other, and a
    refusal that is never sent leaves the client waiting for the idle timeout."""
    verdict, _ = decide(DmarcResult("fail", domain, "reject", "reject"))
    assert verdict.text == f"5.7.1 DMARC policy of {shown} rejects this message"
    assert SMTP_REPLY.fullmatch(f"{verdict.code} {verdict.text}")
