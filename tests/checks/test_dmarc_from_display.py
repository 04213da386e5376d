"""DMARC on a header From whose display name the address grammar cannot read, against
records served by a real knotd, through ``dmarc.check`` and ``inbound.check``/``run``.

The review after session 35 (which started judging unreadable Froms on every domain they
show): ``Joe @ Home <joe@example.com>`` with an aligned SPF pass got ``550 5.7.1 DMARC
cannot be applied: header From not understood`` without DNS being asked, so did
``Marketing @ ACME <news@acme.example>`` and display names with an unquoted comma and a
zero-width joiner (U+200D) or a right-to-left mark (U+200F): ``shown_domains`` gave up on an
at sign followed by blanks, and on every format character. Such a From is now judged on
what each domain it shows publishes (one without a record gives ``none``): refused only
when one of them fails a p=reject, sent to Junk when one fails a p=quarantine. A word after
blanks or a comment behind an at sign is a domain shown, so ``ceo@ bank.test`` still gets
bank.test's p=reject.

Second finding: an encoded word in a charset Python's codecs know but cannot decode with
"replace" (``idna``, ``punycode``, ``undefined``) raised UnicodeError out of the check, and
the message got ``451 4.7.0 message checks took too long`` on every try.
"""

from __future__ import annotations

import asyncio

import pytest

from pyqmail.checks import inbound
from pyqmail.checks.authresults import decide
from pyqmail.checks.checkpool import CheckPool
from pyqmail.checks.dmarc import check
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.spf import SpfResult
from pyqmail.headers import shown_domains
from tests.dnsserver import recording

CLIENT = "192.0.2.66"
SPF_HERE = f'@ TXT "v=spf1 ip4:{CLIENT} -all"\n'
ZONES = {
    "example.com.": SPF_HERE,  # no DMARC record
    "acme.example.": SPF_HERE,
    "shop.example.": SPF_HERE,
    "home.": "",  # display-name words: _dmarc.home. and _dmarc.acme. do not exist
    "acme.": "",
    "bank.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
    "shop.test.": '_dmarc TXT "v=DMARC1; p=quarantine"\n@ TXT "v=spf1 -all"\n',
}
ARABIC = "\u0645\u062a\u062c\u0631"  # a display name in Arabic script
HEBREW = "\u05d7\u05e0\u05d5\u05ea"

# (From, the domain the sender's SPF passes for, the domains shown in it)
DISPLAY = [
    ("Joe @ Home <joe@example.com>", "example.com", ["home", "example.com"]),
    ("Marketing @ ACME <news@acme.example>", "acme.example", ["acme", "acme.example"]),
    ("Shop \u200d, Inc <news@shop.example>", "shop.example", ["shop.example"]),
    (f"{ARABIC}\u200f, {HEBREW} <news@shop.example>", "shop.example", ["shop.example"]),
    (f"{HEBREW} \u200f, Inc\u200f <news@shop.example>", "shop.example", ["shop.example"]),
]


def message(from_: str) -> bytes:
    return f"From: {from_}\r\nTo: u@mx.test\r\nSubject: news\r\n\r\nhello\r\n".encode()


def verdict(settings: AuthSettings, from_: str, sender: str) -> inbound.Outcome:
    return inbound.check(settings, CLIENT, "mx.sender.test", sender, message(from_))


@pytest.mark.parametrize(("from_", "domain", "shown"), DISPLAY)
def test_the_domains_a_display_name_shows(from_, domain, shown):
    """A word after "@ " is a domain shown; a ZWJ or RLM in a display name is harmless."""
    assert shown_domains(from_) == shown


@pytest.mark.parametrize(("from_", "domain", "shown"), DISPLAY)
def test_such_a_from_is_judged_by_what_its_domains_publish(dns_server, from_, domain, shown):
    """The review's input: an aligned SPF pass, no DKIM. Every domain shown but a public
    suffix (home, acme: not looked up since the review of session 37) is looked up (it was
    refused unasked: ``permerror``, ``header From not understood``); none of them
    publishes a policy that fails, so the message is accepted, not sent to Junk, on the
    address's result (no record: ``none``)."""
    with recording((dns_server.host, dns_server.port)) as (address, queries):
        res = make_resolver([address], timeout=2.0)
        r = check(res, message(from_), SpfResult("mailfrom", "pass", domain, ""), [])
    assert (r.result, r.header_from, r.policy) == ("none", domain, "none"), r
    judged = [d for d in shown if "." in d]
    assert [name for name, qtype in queries if qtype == "TXT"] == [f"_dmarc.{d}." for d in judged]
    action, junk = decide(r)
    assert (action.code, junk) == (250, False), action


@pytest.mark.parametrize(("from_", "domain", "shown"), DISPLAY)
def test_such_a_from_is_accepted_by_the_inbound_checks(settings, from_, domain, shown):
    """The whole check, SPF included: the sender's SPF passes for the From's address."""
    outcome = verdict(settings, from_, sender=f"bounce@{domain}")
    assert (outcome.verdict.code, outcome.junk) == (250, False), outcome.verdict
    assert "dmarc=permerror" not in outcome.verdict.log, outcome.verdict.log


@pytest.mark.parametrize(
    ("from_", "want"),
    [
        ("Joe @ Home <joe@bank.test>", (550, "bank.test")),  # the address's p=reject fails
        ("Joe @ bank.test <joe@example.com>", (550, "bank.test")),  # the display word's
        ("Shop \u200d, Inc <news@bank.test>", (550, "bank.test")),
        (f"{ARABIC}\u200f, {HEBREW} <news@bank.test>", (550, "bank.test")),
        ("Joe @ Home <joe@shop.test>", (250, "junk")),  # p=quarantine: the Junk folder
        ("Shop \u200d, Inc <news@shop.test>", (250, "junk")),
        ("Joe @ shop.test <joe@example.com>", (250, "junk")),
    ],
)
def test_a_failing_policy_among_them_applies(settings, from_, want):
    """The sender's SPF passes for example.com only: bank.test and shop.test fail."""
    outcome = verdict(settings, from_, sender="bounce@example.com")
    got = outcome.verdict.code, "junk" if outcome.junk else ""
    if want[0] == 550:
        got = outcome.verdict.code, outcome.verdict.text
        want = 550, f"5.7.1 DMARC policy of {want[1]} rejects this message"
    assert got == want, outcome.verdict


def test_a_passing_domain_with_p_reject_is_accepted(dns_server):
    """bank.test's p=reject does not apply when its own SPF passes: its pass is the result
    (home, a public suffix, is not looked up; its ``none`` was the result)."""
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    spf = SpfResult("mailfrom", "pass", "bank.test", "")
    r = check(res, message("Joe @ Home <joe@bank.test>"), spf, [])
    assert (r.result, r.header_from, r.policy) == ("pass", "bank.test", "none"), r
    assert decide(r)[0].code == 250


@pytest.mark.parametrize(
    "from_",
    [
        "ceo@ bank.test <taro..yamada@example.com>",  # blanks after the at sign
        "ceo@\u3000bank.test <taro..yamada@example.com>",  # an ideographic space
        "ceo @ bank.test, Inc <news@example.com>",
        "ceo@ (home) bank.test <taro..yamada@example.com>",  # a comment, then the domain
        "ceo@(bank.test)example.com <taro..yamada@example.com>",  # a comment's first word
        "ceo@ (bank.test) example.com <taro..yamada@example.com>",
        'ceo@ "bank.test" <taro..yamada@example.com>',  # a quoted string's first word
        '"ceo@" bank.test <taro..yamada@example.com>',
        "=?utf-8?q?ceo=40_bank.test?= <taro..yamada@example.com>",  # in an encoded word
    ],
)
def test_a_domain_behind_blanks_or_a_comment_is_judged(settings, from_):
    """What a reader may take for the domain after an at sign is judged, whatever blanks
    or comment stand between (these were refused as not understood: they must stay
    refused, now on bank.test's policy)."""
    outcome = verdict(settings, from_, sender="bounce@example.com")
    assert (outcome.verdict.code, outcome.verdict.text) == (
        550,
        "5.7.1 DMARC policy of bank.test rejects this message",
    ), outcome.verdict


CHARSETS = ["idna", "punycode", "undefined", "IDNA"]


@pytest.mark.parametrize("charset", CHARSETS)
def test_an_encoded_word_python_cannot_decode_is_shown_as_latin_1(settings, charset):
    """Through ``inbound.run`` on the checks' own thread, as pyqmail-smtpd runs it: the
    UnicodeError was 451 4.7.0 (auth_error=UnicodeError) on every try. The word shows no
    domain (payload =FF: punycode's decoder takes ASCII only), example.com passes SPF."""
    from_ = f"=?{charset}?q?Sales=FF?=, Team <team@example.com>"

    async def scenario() -> inbound.Outcome:
        pool = CheckPool(threads=1, per_client=1)
        try:
            return await inbound.run(
                settings, CLIENT, "mx.example.com", "bounce@example.com", message(from_), pool=pool
            )
        finally:
            pool.shutdown()

    outcome = asyncio.run(scenario())
    assert (outcome.verdict.code, outcome.junk) == (250, False), outcome.verdict
    assert "auth_error" not in outcome.verdict.log, outcome.verdict.log
    assert "dmarc=none" in outcome.verdict.log, outcome.verdict.log


@pytest.mark.parametrize("charset", CHARSETS)
def test_an_at_sign_in_such_a_word_is_still_judged(settings, charset):
    """Latin-1 shows every byte: the at sign in the word is read, bank.test judged."""
    from_ = f"=?{charset}?q?ceo=40bank.test_=FF?=, Team <team@example.com>"
    outcome = verdict(settings, from_, sender="bounce@example.com")
    assert (outcome.verdict.code, outcome.verdict.text) == (
        550,
        "5.7.1 DMARC policy of bank.test rejects this message",
    ), outcome.verdict


def test_a_message_without_header_section_keeps_its_body_and_has_no_from(settings):
    """A message that starts with the empty line has no header section: its first body
    paragraph is body (``headers.head_and_rest``), for DMARC (no From: ``none``) and for
    the removal of forged Authentication-Results of ours, which cut such a line out of
    the body (``ar_removed=1``) when the check split the message on its own."""
    body = (
        b"From: CEO <ceo@bank.test>\r\n"
        b"Authentication-Results: mx.test; dmarc=pass\r\n\r\nsecond paragraph\r\n"
    )
    outcome = inbound.check(settings, CLIENT, "mx.sender.test", "a@example.com", b"\r\n" + body)
    assert outcome.verdict.action == "accept", outcome.verdict
    assert "dmarc=none" in outcome.verdict.log and "ar_removed=0" in outcome.verdict.log
    assert outcome.message.endswith(b"\r\n\r\n" + body), outcome.message
