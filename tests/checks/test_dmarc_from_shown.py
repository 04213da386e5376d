"""DMARC on the From domain a mail client shows, against records served by a real knotd,
through ``dmarc.check`` and ``inbound.check`` (the review of session 37).

1. The address grammar joined two words of a domain across the blank: ``ceo@bank.test x``
   was ``ceo@bank.testx`` (no DMARC record: accepted whatever bank.test publishes), where
   Python's email and mail clients show ceo@bank.test. Such an address is now unreadable,
   and the From is judged on what it shows (bank.test). The sender rules and DKIM signing
   read From the same way: a login owning bank.testx passed the sender rules with it, and
   its mail was signed d=bank.testx.
2. Encoded words common readers decode were missed (no domain shown: a permerror with no
   policy, accepted): a character split across two words (Roundcube joins the payloads of
   adjacent words of one charset and encoding before decoding), a blank inside a word
   (Roundcube's and Python's patterns allow it), a stray character in base64, an RFC 2231
   language of more than 75 characters after the charset.
3. A display-name word after "@" with ordinary punctuation (``Marketing @ AT&T``,
   ``News @ Yahoo!``) was "not understood", 550 before any DNS. The word is now cut to its
   host name and judged like any other word shown (a dotless one, a public suffix, is not
   looked up).
"""

from __future__ import annotations

import pytest

from pyqmail.checks import inbound
from pyqmail.checks.authresults import decide
from pyqmail.checks.dmarc import check, from_domains
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.spf import SpfResult
from pyqmail.dkim.policy import from_domain
from pyqmail.headers import mailbox_addresses
from pyqmail.smtpd.senders import HeadWatch, SenderMap
from tests.dnsserver import DnsServer, recording

CLIENT = "192.0.2.66"
REJECT_HERE = f'_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 ip4:{CLIENT} -all"\n'
ZONES = {
    "bank.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
    "evil.test.": '_dmarc TXT "v=DMARC1; p=none"\n@ TXT "v=spf1 +all"\n',
    "docomo.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 +all"\n',
    "att.example.": REJECT_HERE,  # the real domains behind the display names
    "yahoo.example.": REJECT_HERE,
    "pizza.example.": REJECT_HERE,
    "shop.example.": REJECT_HERE,
    "example.com.": REJECT_HERE,
    # what the old reading judged, and the dotless words of display names (public
    # suffixes, no longer looked up: tests/checks/test_dmarc_from_rank.py): no record there
    "testx.": "",
    "testcom.": "",
    "at.": "",
    "yahoo.": "",
    "joe.": "",
    "24.": "",
}
REJECTED = "5.7.1 DMARC policy of bank.test rejects this message"


def message(from_: str) -> bytes:
    return f"From: {from_}\r\nTo: u@mx.test\r\nSubject: pay now\r\n\r\nwire it\r\n".encode()


def verdict(settings: AuthSettings, from_: str, sender: str = "a@evil.test") -> inbound.Outcome:
    return inbound.check(settings, CLIENT, "mx.evil.test", sender, message(from_))


def assert_rejected_for_bank_test(
    settings: AuthSettings, dns_server: DnsServer, from_: str
) -> None:
    """bank.test's p=reject applies: through the whole inbound check, and in the DMARC
    result itself (a failure of bank.test, not a permerror or another domain's none). The
    sender's SPF passes for example.com (p=reject), so where example.com is the address,
    its own failure does not hide bank.test's (on a tie the address's domain is named)."""
    outcome = verdict(settings, from_, sender="bounce@example.com")
    assert (outcome.verdict.code, outcome.verdict.text) == (550, REJECTED), outcome.verdict
    assert "dmarc=fail" in outcome.verdict.log, outcome.verdict.log
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    r = check(res, message(from_), SpfResult("mailfrom", "pass", "example.com", ""), [])
    assert (r.result, r.header_from, r.policy) == ("fail", "bank.test", "reject"), r


# 1. Two words in a row in the domain: the old reading joined them.
JOINED = [
    "ceo@bank.test x",  # the review's: ceo@paypal.com x read as ceo@paypal.comx
    "ceo@bank.test (CEO) x",
    "CEO <ceo@bank.test x>",
    "ceo@bank.test\tcom",
]


@pytest.mark.parametrize("from_", JOINED)
def test_a_domain_of_two_words_is_no_address(from_: str) -> None:
    """Refused by the address grammar, as two words in a row in the local part are."""
    assert mailbox_addresses(from_) is None


@pytest.mark.parametrize("from_", JOINED)
def test_the_shown_domain_of_two_words_is_judged(
    settings: AuthSettings, dns_server: DnsServer, from_: str
) -> None:
    """It was judged on bank.testx or bank.testcom (no record: ``none``) and accepted."""
    assert from_domains(message(from_)) == ["bank.test"]
    assert_rejected_for_bank_test(settings, dns_server, from_)


@pytest.mark.parametrize(
    ("from_", "address"),
    [
        ("ceo@bank . test", "ceo@bank.test"),  # RFC 5322 obs-domain: blanks around the dots
        ("ceo@bank.test (CEO)", "ceo@bank.test"),
        ("CEO <ceo@bank.test> (x)", "ceo@bank.test"),
        ("ceo@[192.0.2.1]", "ceo@[192.0.2.1]"),
    ],
)
def test_a_domain_of_one_word_or_dotted_words_is_still_read(from_: str, address: str) -> None:
    assert mailbox_addresses(from_) == [address]


def test_the_sender_rules_refuse_such_a_from() -> None:
    """A login owning bank.testx passed the sender rules with ``ceo@bank.test x`` (read as
    ceo@bank.testx) while a reader sees ceo@bank.test; now the From is not understood."""
    login = "alice@mx.test"
    watch = HeadWatch(login, login, SenderMap({login: frozenset({"@bank.testx"})}), CLIENT)
    watch.feed(message("ceo@bank.test x"))
    assert watch.refusal() == "550 5.7.1 header From not understood"
    owned = HeadWatch(login, login, SenderMap({login: frozenset({"@bank.testx"})}), CLIENT)
    owned.feed(message("ceo@bank.testx"))
    assert owned.refusal() is None


def test_dkim_signing_does_not_sign_such_a_from() -> None:
    """It was signed by bank.testx's keys (d=bank.testx), a reader sees bank.test."""
    field = (b"From", b"From: ceo@bank.test x\r\n")
    assert from_domain([field]) == (None, "the From header cannot be read unambiguously")
    assert from_domain([(b"From", b"From: ceo@bank.testx\r\n")]) == ("bank.testx", "")


# 2. Encoded words that Roundcube or Python's email decode and the old reading missed.
ENCODED = [
    "=?utf-8?q?ceo=4?= =?utf-8?q?0bank.test?=",  # =40 split across two words
    "=?utf-8?b?Y2VvQ?= =?utf-8?b?GJhbmsudGVzdA==?=",  # base64 split mid-quantum
    "=?UTF-8?B?Y2VvQ?=\t=?utf-8?b?GJhbmsudGVzdA==?= <taro..yamada@evil.test>",
    "=?utf-8?q?ceo=40bank.test ?=",  # a blank inside the word
    "=?utf-8?q?ceo=40bank.test x?= <taro..yamada@evil.test>",
    "=?utf-8?b?Y2VvQGJhbmsudGVzdA!?=",  # a stray character in base64
    "=?utf-8?b?Y2VvQGJh bmsudGVzdA==?=",
    "=?utf-8*" + "x" * 80 + "?q?ceo=40bank.test?=",  # an RFC 2231 language of 80 characters
]


@pytest.mark.parametrize("from_", ENCODED)
def test_an_encoded_word_a_common_reader_decodes_is_judged(
    settings: AuthSettings, dns_server: DnsServer, from_: str
) -> None:
    """It showed no domain: ``permerror`` with no policy, accepted despite p=reject."""
    assert "bank.test" in from_domains(message(from_))
    assert_rejected_for_bank_test(settings, dns_server, from_)


# Display names of encoded words showing no at sign: split mid-character (山田 太郎), with
# blanks inside a word. Judged on docomo.test alone, as before.
NAMES = [
    "=?utf-8?q?=E5=B1?= =?utf-8?q?=B1=E7=94=B0?= <taro..yamada@docomo.test>",
    "=?utf-8?b?5bGx55Sw5a?= =?utf-8?b?Sq6YOO?= <taro..yamada@docomo.test>",
    "=?utf-8?q?Taro Yamada?= <taro..yamada@docomo.test>",
    "=?iso-2022-jp?b?GyRCOzNFRBsoQg==?= =?iso-2022-jp?b?GyRCQkBPOhsoQg==?= <taro..y@docomo.test>",
]


@pytest.mark.parametrize("from_", NAMES)
def test_a_name_in_such_words_is_judged_on_its_address(settings: AuthSettings, from_: str) -> None:
    assert from_domains(message(from_)) == ["docomo.test"]
    ok = verdict(settings, from_, sender="bounce@docomo.test")
    assert (ok.verdict.code, ok.junk) == (250, False), ok.verdict
    refused = verdict(settings, from_)
    assert refused.verdict.text == "5.7.1 DMARC policy of docomo.test rejects this message"


# 3. Display-name words after "@" with punctuation: (From, the real domain, domains judged)
DISPLAY = [
    ("Marketing @ AT&T <news@att.example>", "att.example", ["att.example"]),
    ("News @ Yahoo! <news@yahoo.example>", "yahoo.example", ["yahoo.example"]),
    ("Joe @ Joe's Pizza <joe@pizza.example>", "pizza.example", ["pizza.example"]),
    ("Sales @ 24/7 <sales@shop.example>", "shop.example", ["shop.example"]),
    ("Ops @ example.com/team <ops@example.com>", "example.com", ["example.com"]),
    ("News @ Yahoo\uff01 <news@yahoo.example>", "yahoo.example", ["yahoo.example"]),
]


@pytest.mark.parametrize(("from_", "domain", "judged"), DISPLAY)
def test_a_punctuated_display_word_is_judged_not_refused(
    dns_server: DnsServer, from_: str, domain: str, judged: list[str]
) -> None:
    """The real domain's own SPF pass: accepted, its pass the result, every domain judged
    looked up (it was a ``permerror`` with the policy reject, ``header From not
    understood``, no DNS asked). A dotless word (at, yahoo, joe, 24) is a public suffix:
    not looked up (it was, and its ``none`` reported in place of the pass)."""
    with recording((dns_server.host, dns_server.port)) as (address, queries):
        res = make_resolver([address], timeout=2.0)
        r = check(res, message(from_), SpfResult("mailfrom", "pass", domain, ""), [])
    assert (r.result, r.header_from, r.policy) == ("pass", domain, "none"), r
    assert [name for name, qtype in queries if qtype == "TXT"] == [f"_dmarc.{d}." for d in judged]
    assert decide(r)[0].code == 250


@pytest.mark.parametrize(("from_", "domain", "judged"), DISPLAY)
def test_such_a_from_gets_its_real_domains_policy(
    settings: AuthSettings, from_: str, domain: str, judged: list[str]
) -> None:
    """Accepted for the domain's own sender, refused on its p=reject for another."""
    ok = verdict(settings, from_, sender=f"bounce@{domain}")
    assert (ok.verdict.code, ok.junk) == (250, False), ok.verdict
    refused = verdict(settings, from_)
    assert refused.verdict.text == f"5.7.1 DMARC policy of {domain} rejects this message"


@pytest.mark.parametrize(
    "from_",
    [
        "Ops @ bank.test/team <ops@example.com>",
        "CEO @ bank.test! <ceo@example.com>",
        "ceo@'bank.test' <taro..yamada@example.com>",
        "=?utf-8?q?ceo@bank.test?=",  # read as an address at bank.test?=: no record
        "ceo@bank.test!",
        "ceo@secure!bank.test <taro..yamada@example.com>",  # a later run with a dot counts
        "ceo@bank.test?= <taro..yamada@example.com>",  # bank.test?= was "not understood"
    ],
)
def test_a_punctuated_word_naming_a_domain_is_judged_on_it(
    settings: AuthSettings, dns_server: DnsServer, from_: str
) -> None:
    assert "bank.test" in from_domains(message(from_))
    assert_rejected_for_bank_test(settings, dns_server, from_)


@pytest.mark.parametrize(
    "from_",
    [
        "News @ \u202eYahoo! <news@yahoo.example>",  # a bidi override still
        "News @ Yahoo\u200d! <news@yahoo.example>",  # a format character in the word
        "News @ !!! <news@yahoo.example>",  # no host name after the at sign
        "ceo@bank..test! <news@yahoo.example>",  # no host name
        "ceo@!",  # read by the address grammar, at the domain "!"
    ],
)
def test_what_shows_no_safe_host_name_is_still_refused(settings: AuthSettings, from_: str) -> None:
    outcome = verdict(settings, from_, sender="bounce@yahoo.example")
    assert (outcome.verdict.code, outcome.verdict.text) == (
        550,
        "5.7.1 DMARC cannot be applied: header From not understood",
    ), outcome.verdict
