"""DMARC on the header From a sender shapes to escape it, against records served by a real
knotd, through ``inbound.check`` (the verdict a message gets) and ``dmarc.check``.

The review's reproductions: a From domain of 250 characters and more made its ``_dmarc``
name too long for DNS, which was a temperror (accepted) instead of no record there (the
organisational domain's policy); a second From field, a From of two domains or one that
cannot be read was a permerror (accepted) instead of refused; a From of several domains
must get the strictest failing policy among them.

The second review: refusing every From the address grammar cannot read refused legitimate
mail (RFC 6854's ``Automated System:;``, ``user@example.com <user@example.com>``, Japanese
mobile addresses with '..' in the local part, a bare ``MAILER-DAEMON``). Such a From is now
judged on every domain a mail client may show in it, and accepted as a permerror when it
names none; a From that shows ceo@bank.test in a display name, comment, quoted string or
encoded word still gets bank.test's p=reject, whatever address it also holds.
"""

from __future__ import annotations

import pytest

from pyqmail.checks import inbound
from pyqmail.checks.dmarc import MAX_FROM_DOMAINS, check
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.spf import SpfResult

ZONES = {
    "bank.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
    "shop.test.": '_dmarc TXT "v=DMARC1; p=quarantine"\n@ TXT "v=spf1 -all"\n',
    "np.test.": '_dmarc TXT "v=DMARC1; p=none; sp=none; np=reject"\n',
    "evil.test.": '_dmarc TXT "v=DMARC1; p=none"\n@ TXT "v=spf1 +all"\n',
    "docomo.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 +all"\n',
}
CLIENT = "192.0.2.66"
NO_SPF = SpfResult("mailfrom", "fail", "elsewhere.example")


def long_subdomain(org: str, labels: int) -> str:
    """A subdomain of ``org`` under ``labels`` labels of 60 characters."""
    return ".".join(["x" * 60] * labels + [org])


def message(*from_fields: str) -> bytes:
    """An unsigned message with these From fields (raw values)."""
    froms = "".join(f"From: {value}\r\n" for value in from_fields)
    return f"{froms}To: u@mx.test\r\nSubject: pay now\r\n\r\nwire it\r\n".encode()


def verdict(settings: AuthSettings, msg: bytes, sender: str = "a@evil.test") -> inbound.Outcome:
    return inbound.check(settings, CLIENT, "mx.evil.test", sender, msg)


@pytest.mark.parametrize("labels", [1, 4, 10])
def test_a_long_from_domain_gets_its_org_domains_policy(settings, labels):
    """4 labels: 253 characters (the review: dmarc=temperror, 250); 10: 619, longer than
    any DNS name, still a subdomain of bank.test; 1: the short control."""
    domain = long_subdomain("bank.test", labels)
    outcome = verdict(settings, message(f"CEO <ceo@{domain}>"))
    assert outcome.verdict.code == 550, outcome.verdict
    assert "dmarc=fail" in outcome.verdict.log, outcome.verdict.log
    assert len(f"{outcome.verdict.code} {outcome.verdict.text}") <= 512  # RFC 5321 4.5.3.1.5


@pytest.mark.parametrize("labels", [4, 10])
def test_a_long_subdomain_does_not_exist_np_applies(settings, labels):
    """No name longer than DNS allows exists (RFC 9091 np=): np=reject, not sp=none."""
    r = check(settings.resolver, message(f"ceo@{long_subdomain('np.test', labels)}"), NO_SPF, [])
    assert (r.result, r.policy, r.tag) == ("fail", "reject", "np"), r


@pytest.mark.parametrize(
    ("froms", "reason"),
    [
        (["CEO <ceo@bank.test>", "x@evil.test"], "more than one header From field"),
        (["x@evil.test", "CEO <ceo@bank.test>"], "more than one header From field"),
        (["ceo@bank..test"], "header From not understood"),
        (["taro..yamada@ <yamada@docomo.test>"], "header From not understood"),  # no domain
        (["ceo@[192.0.2.1] <taro..yamada@docomo.test>"], "header From not understood"),
        # bidi override: a client may show 'ceo@bank.test' for these bytes
        (["\u202etset.knab@oec <taro..yamada@docomo.test>"], "header From not understood"),
        # bidi isolates and embeddings anywhere, other format characters inside a domain
        (["\u2067Taro\u2069, Y <taro@docomo.test>"], "header From not understood"),
        (["Taro \u202b, Y <taro@docomo.test>"], "header From not understood"),
        (["ceo@\u200dbank.test <taro..yamada@docomo.test>"], "header From not understood"),
        (["Taro @ Home\u200f <taro..yamada@docomo.test>"], "header From not understood"),
        # a nested or unclosed comment after an at sign: the word after it is not read
        (["ceo@((bank.test))evil.test <taro..yamada@docomo.test>"], "header From not understood"),
        (["ceo@ (bank.test <taro..yamada@docomo.test>"], "header From not understood"),
        (["Taro (" + "x" * 5000 + ") <taro..yamada@docomo.test>"], "header From not understood"),
        ([f"ceo@{'x' * 64}.bank.test"], "header From domain is no domain name"),
        (["ceo@\ufffd.bank.test"], "header From domain is no domain name"),
        (
            [", ".join(f"a@d{i}.test" for i in range(MAX_FROM_DOMAINS)) + ", ceo@bank.test"],
            f"header From names more than {MAX_FROM_DOMAINS} domains",
        ),
    ],
)
def test_a_from_dmarc_cannot_judge_is_refused(settings, froms, reason):
    """RFC 5322 3.6: exactly one From; RFC 7489 6.6.1: mail whose From cannot be judged is
    typically rejected. Was permerror, accepted: one more From field switched p=reject off."""
    outcome = verdict(settings, message(*froms))
    assert (outcome.verdict.code, outcome.verdict.text) == (
        550,
        f"5.7.1 DMARC cannot be applied: {reason}",
    ), outcome.verdict
    assert "dmarc=permerror" in outcome.verdict.log
    assert "dmarc_action=reject" in outcome.verdict.log


def test_the_configured_action_applies(dns_server):
    """control/dmarcreject decides for such a From as for a p=reject failure."""
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    junk = AuthSettings(
        enabled=True, authserv_id="mx.test", timeout=5, resolver=res, on_reject="quarantine"
    )
    outcome = verdict(junk, message("ceo@bank.test", "x@evil.test"))
    assert (outcome.verdict.action, outcome.junk) == ("accept", True), outcome.verdict
    assert b"dmarc=permerror (more than one header From field)" in outcome.message


def test_a_from_far_down_a_long_header_section_is_read(settings):
    """The From after 100 KiB of other fields is the message's From (the sender rules'
    reading stops there: DMARC's must not)."""
    padding = "".join(f"X-Pad-{i}: {'p' * 90}\r\n" for i in range(1200))
    msg = padding.encode() + message("CEO <ceo@bank.test>")
    assert verdict(settings, msg).verdict.code == 550


@pytest.mark.parametrize(
    ("from_", "want"),
    [
        ("x@evil.test, CEO <ceo@bank.test>", (550, "")),  # p=reject of the second
        ("ceo@bank.test, shop@shop.test", (550, "")),
        ("shop@shop.test, x@evil.test", (250, "junk")),  # p=quarantine beats p=none
        ("x@evil.test, y@EVIL.test", (250, "")),  # one domain, given twice
    ],
)
def test_a_from_of_several_domains_gets_the_strictest_failing_policy(settings, from_, want):
    """RFC 7489 6.6.1: each domain's result, the strictest policy of those that fail.
    (The sender's SPF passes for evil.test: that domain passes, its neighbours do not.)"""
    outcome = verdict(settings, message(from_))
    assert (outcome.verdict.code, "junk" if outcome.junk else "") == want, outcome.verdict


def test_no_from_is_none_and_accepted(settings):
    """No From, no DMARC identity: nothing to protect (RFC 7489 6.6.1)."""
    msg = b"To: u@mx.test\r\nSubject: hello\r\n\r\nhi\r\n"
    outcome = verdict(settings, msg)
    assert (outcome.verdict.action, outcome.junk) == ("accept", False), outcome.verdict
    assert "dmarc=none" in outcome.verdict.log


@pytest.mark.parametrize(
    "from_",
    [
        "Automated System:;",  # RFC 6854 group syntax
        "undisclosed-recipients:;",
        "MAILER-DAEMON",  # unqualified
        "Mail Delivery Subsystem <MAILER-DAEMON>",
    ],
)
def test_a_from_naming_no_domain_is_accepted(settings, from_):
    """No domain is shown, so none is protected: a permerror, accepted as before."""
    outcome = verdict(settings, message(from_))
    assert (outcome.verdict.code, outcome.junk) == (250, False), outcome.verdict
    assert b"dmarc=permerror (header From names no domain)" in outcome.message


LEGITIMATE = [
    "taro..yamada@docomo.test",  # legacy Japanese mobile local parts
    "taro.@docomo.test",
    "taro..yamada@ docomo.test",  # blanks after "@" (RFC 5322 4.4): the next word is shown
    "Taro <taro..yamada@docomo.test>",
    "=?utf-8?b?5bGx55Sw5aSq6YOO?= <taro..yamada@docomo.test>",
    "taro@docomo.test <taro@docomo.test>",  # the sloppy form
    "taro@docomo.test <Taro@DOCOMO.test.>",
]


@pytest.mark.parametrize("from_", LEGITIMATE)
def test_a_from_that_cannot_be_read_is_judged_on_its_domain(settings, from_):
    """docomo.test (p=reject) passes SPF for its own sender and fails for another's."""
    ok = verdict(settings, message(from_), sender="bounce@docomo.test")
    assert ok.verdict.code == 250, ok.verdict
    assert b"\tdmarc=pass (" in ok.message and b"header.from=docomo.test" in ok.message
    refused = verdict(settings, message(from_), sender="a@evil.test")
    assert (refused.verdict.code, refused.verdict.text) == (
        550,
        "5.7.1 DMARC policy of docomo.test rejects this message",
    ), refused.verdict


SPOOFS = [
    "ceo@bank.test <x@evil.test>",  # the grammar's address is x@evil.test; a client shows ...
    "x@evil.test <ceo@bank.test>",
    "ceo@bank.test <ceo@bank.test>",
    "ceo@bank.test <taro..yamada@evil.test>",
    '"ceo@bank.test" <taro..yamada@evil.test>',  # a quoted string holding an at sign
    "taro..yamada@evil.test (ceo@bank.test)",  # a comment
    "=?utf-8?q?ceo=40bank.test?= <taro..yamada@evil.test>",  # encoded words
    "=?utf-8?b?Y2VvQGJhbmsudGVzdA==?= <taro..yamada@evil.test>",
    "=?utf-8?q?ceo=40bank.test?=",  # no address at all, but one shown
    "=?x-unknown?q?ceo=40bank.test?= <taro..yamada@evil.test>",
    "ceo\uff20bank.test <taro..yamada@evil.test>",  # a fullwidth at sign
    '"ceo@bank.test":;',  # a group with no member
    "=?utf-8?q?ceo@bank.test?= <taro..yamada@evil.test>",  # bank.test?= was not understood
]


@pytest.mark.parametrize("from_", SPOOFS)
def test_a_from_showing_a_domain_is_judged_on_it(settings, from_):
    """Whatever else the From holds, and whichever part a client shows, bank.test's
    p=reject applies (the sender's SPF passes for evil.test only)."""
    outcome = verdict(settings, message(from_))
    assert (outcome.verdict.code, outcome.verdict.text) == (
        550,
        "5.7.1 DMARC policy of bank.test rejects this message",
    ), outcome.verdict
