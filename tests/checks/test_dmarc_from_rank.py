"""Which domain's DMARC result stands for a From whose display name shows other domains,
against records served by a real knotd, through ``dmarc.check`` and ``inbound.check``.

The review of session 37's DMARC From readings: ``From: News @ Yahoo! <news@yahoo.com>``
with an aligned DKIM pass for yahoo.com (p=reject) asked ``_dmarc.yahoo.`` (a TLD's name)
and reported ``dmarc=none header.from=yahoo`` ("no DMARC record") in place of the
address's pass; ``Marketing @ AT&T <news@att.com>`` asked ``_dmarc.at.`` (a country TLD).
``Yahoo <news@yahoo.com>`` gave pass. Now the author domain (RFC 7489 6.6.1: the address
in angle brackets) gives the result; a domain only shown stands only when it tightens it
(a failure with a policy, or a temperror), and a shown public suffix is not looked up.
"""

from __future__ import annotations

import pytest

from pyqmail.checks import inbound
from pyqmail.checks.dkimverify import DkimResult
from pyqmail.checks.dmarc import DmarcResult, check, from_domains
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.spf import SpfResult
from tests.dnsserver import DnsServer, recording, silent_for

CLIENT = "192.0.2.66"
REJECT_HERE = f'_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 ip4:{CLIENT} -all"\n'
ZONES = {
    "yahoo.example.": REJECT_HERE,  # the real domains behind the display names
    "att.example.": REJECT_HERE,
    "shop.co.uk.": REJECT_HERE,
    "bank.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
    "shop.test.": '_dmarc TXT "v=DMARC1; p=quarantine"\n@ TXT "v=spf1 -all"\n',
    "evil.test.": '_dmarc TXT "v=DMARC1; p=none"\n@ TXT "v=spf1 -all"\n',
    "norecord.test.": '@ TXT "v=spf1 -all"\n',
    "slow.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
    # public suffixes a display name shows: served (no record), so the old code's lookups
    # answer at once with ``none``
    "yahoo.": "",
    "at.": "",
    "home.": "",
    "co.uk.": "",
}

# (From, its author domain): each display name shows a public suffix after an at sign
SUFFIX_SHOWN = [
    ("News @ Yahoo! <news@yahoo.example>", "yahoo.example"),  # the review's
    ("Marketing @ AT&T <news@att.example>", "att.example"),  # the review's: a country TLD
    ("Joe @ Home <news@yahoo.example>", "yahoo.example"),
    ("Shop @ co.uk <news@shop.co.uk>", "shop.co.uk"),  # a listed suffix of two labels
    ("News @ Yahoo! <news@yahoo.example> ", "yahoo.example"),  # a blank after it
]


def message(from_: str) -> bytes:
    return f"From: {from_}\r\nTo: u@mx.test\r\nSubject: news\r\n\r\nhello\r\n".encode()


def judge(
    dns_server: DnsServer, from_: str, spf: SpfResult, dkim: list[DkimResult]
) -> tuple[DmarcResult, list[str]]:
    """``dmarc.check``'s result and the TXT names it asked, through a recording proxy."""
    with recording((dns_server.host, dns_server.port)) as (address, queries):
        res = make_resolver([address], timeout=2.0)
        r = check(res, message(from_), spf, dkim)
    return r, [name for name, qtype in queries if qtype == "TXT"]


@pytest.mark.parametrize(("from_", "author"), SUFFIX_SHOWN)
def test_an_aligned_dkim_pass_of_the_author_domain_is_the_result(
    dns_server: DnsServer, from_: str, author: str
) -> None:
    """It was ``none`` for the shown suffix (``header.from=yahoo``), after asking its
    ``_dmarc`` name; now the author domain's pass, and only its record asked."""
    spf = SpfResult("mailfrom", "fail", "bounce.other.test", "")
    dkim = [DkimResult("pass", author, "s1", "rsa-sha256", "abcdefgh")]
    r, asked = judge(dns_server, from_, spf, dkim)
    assert (r.result, r.header_from, r.policy, r.published) == ("pass", author, "none", "reject")
    assert asked == [f"_dmarc.{author}."]


@pytest.mark.parametrize(("from_", "author"), SUFFIX_SHOWN)
def test_an_aligned_spf_pass_of_the_author_domain_is_the_result(
    dns_server: DnsServer, from_: str, author: str
) -> None:
    r, asked = judge(dns_server, from_, SpfResult("mailfrom", "pass", author, ""), [])
    assert (r.result, r.header_from, r.policy) == ("pass", author, "none"), r
    assert asked == [f"_dmarc.{author}."]


@pytest.mark.parametrize(("from_", "author"), SUFFIX_SHOWN)
def test_the_inbound_checks_report_the_author_domains_pass(
    settings: AuthSettings, from_: str, author: str
) -> None:
    """The whole check, the sender's SPF passing for the author domain: the message's
    Authentication-Results says ``dmarc=pass`` for it (it said ``dmarc=none`` for the
    suffix); another sender's mail is still refused on the author's p=reject."""
    ok = inbound.check(settings, CLIENT, "mx.sender.test", f"bounce@{author}", message(from_))
    assert (ok.verdict.code, ok.junk) == (250, False), ok.verdict
    assert b"\tdmarc=pass (" in ok.message, ok.message
    assert f"header.from={author}".encode() in ok.message, ok.message
    refused = inbound.check(settings, CLIENT, "mx.sender.test", "a@evil.test", message(from_))
    assert refused.verdict.text == f"5.7.1 DMARC policy of {author} rejects this message"


def test_a_public_suffix_is_not_judged_as_a_shown_domain() -> None:
    assert from_domains(message("News @ Yahoo! <news@yahoo.example>")) == ["yahoo.example"]
    assert from_domains(message("Shop @ co.uk <news@shop.co.uk>")) == ["shop.co.uk"]
    # a dotted shown word that is no suffix is still judged, before the author's
    assert from_domains(message("Joe @ bank.test <joe@yahoo.example>")) == [
        "bank.test",
        "yahoo.example",
    ]


@pytest.mark.parametrize(
    ("shown", "want"),
    [
        ("norecord.test", ("pass", "yahoo.example", "none")),  # no record there: none
        ("evil.test", ("pass", "yahoo.example", "none")),  # fails its p=none: no policy
        ("bank.test", ("fail", "bank.test", "reject")),  # fails its p=reject: tightens
        ("shop.test", ("fail", "shop.test", "quarantine")),
    ],
)
def test_a_shown_domain_stands_only_when_it_fails_with_a_policy(
    dns_server: DnsServer, shown: str, want: tuple[str, str, str]
) -> None:
    """The author domain passes (aligned SPF); the domain the display name shows fails
    alignment. Its ``none`` or failure without a policy was the result (``dmarc=none
    header.from=norecord.test``, ``dmarc=fail header.from=evil.test``)."""
    from_ = f"Joe @ {shown} <joe@yahoo.example>"
    r, asked = judge(dns_server, from_, SpfResult("mailfrom", "pass", "yahoo.example", ""), [])
    assert (r.result, r.header_from, r.policy) == want, r
    assert asked == [f"_dmarc.{shown}.", "_dmarc.yahoo.example."]


@pytest.mark.parametrize(
    "from_",
    [
        "Joe @ bank.test <joe@yahoo.example>",
        "CEO @ bank.test! <news@yahoo.example>",
        "ceo@bank.test <ceo@yahoo.example>",  # the sloppy address-before-address shape
    ],
)
def test_a_shown_domains_p_reject_still_refuses(settings: AuthSettings, from_: str) -> None:
    """The tightening stays: the author domain's own SPF passes, bank.test's p=reject
    fails, the message is refused."""
    outcome = inbound.check(
        settings, CLIENT, "mx.sender.test", "bounce@yahoo.example", message(from_)
    )
    assert (outcome.verdict.code, outcome.verdict.text) == (
        550,
        "5.7.1 DMARC policy of bank.test rejects this message",
    ), outcome.verdict


def test_a_shown_domains_dns_failure_still_stands(dns_server: DnsServer) -> None:
    """A shown domain whose DNS never answers is a temperror over the author's pass (which
    ``inbound`` may defer): a forged domain's hanging DNS must not let the mail through."""
    upstream = (dns_server.host, dns_server.port)
    with silent_for(upstream, "slow.test.") as address:
        res = make_resolver([address], timeout=0.5)
        spf = SpfResult("mailfrom", "pass", "yahoo.example", "")
        r = check(res, message("Joe @ slow.test <joe@yahoo.example>"), spf, [], budget=2.0)
    assert (r.result, r.header_from) == ("temperror", "slow.test"), r


def test_on_a_tie_the_author_domain_is_reported(dns_server: DnsServer) -> None:
    """Both fail their p=reject: the refusal names the address's domain."""
    spf = SpfResult("mailfrom", "pass", "evil.test", "")
    r, _ = judge(dns_server, "Joe @ bank.test <joe@yahoo.example>", spf, [])
    assert (r.result, r.header_from, r.policy) == ("fail", "yahoo.example", "reject"), r
