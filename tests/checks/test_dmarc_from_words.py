"""DMARC on a header From whose domain only shows once its RFC 2047 encoded words are
decoded as a mail client decodes them, against records served by a real knotd, through
``dmarc.check`` and ``inbound.check``.

The review after session 36: ``headers.shown_domains`` joined the decoded words with a
blank, but RFC 2047 6.2 drops the blanks between adjacent encoded words when they are shown
(Python's email.header and mail clients do). ``From: =?utf-8?q?ceo=40ban?=
=?utf-8?q?k.test?=`` shows ``ceo@bank.test`` and nothing else, yet was judged on ``ban``
(no DMARC record: ``none``, accepted whatever bank.test publishes); ``=?utf-8?q?ceo=40bank.?=
=?utf-8?q?test?= <x..y@evil.test>`` on evil.test and ``bank``. And ``=?utf-32?q?ceo=40bank.
test?=`` decodes to four replacement characters in UTF-32 (no domain: accepted as a
permerror), while a client that does not know UTF-32 may show its bytes, ``ceo@bank.test``.

Each encoded word is now replaced in place, read with and without the blanks between
adjacent ones, and a word in a charset that shows printable ASCII bytes as something else
(UTF-16, UTF-32, EBCDIC) also as Latin-1. A display name of adjacent words without an at
sign (a Japanese name in two words, in UTF-8 or ISO-2022-JP, where 太 is the bytes ``B@``)
shows no domain and changes nothing.
"""

from __future__ import annotations

import base64

import pytest

from pyqmail.checks import inbound
from pyqmail.checks.authresults import decide
from pyqmail.checks.dmarc import check, from_domains
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.spf import SpfResult
from tests.dnsserver import DnsServer

ZONES = {
    "bank.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 -all"\n',
    "evil.test.": '_dmarc TXT "v=DMARC1; p=none"\n@ TXT "v=spf1 +all"\n',
    "docomo.test.": '_dmarc TXT "v=DMARC1; p=reject"\n@ TXT "v=spf1 +all"\n',
    "ban.": "",  # pieces of a split domain: no DMARC record there
    "bank.": "",
    "b.": "",
}
CLIENT = "192.0.2.66"
REJECTED = "5.7.1 DMARC policy of bank.test rejects this message"


def message(from_: str) -> bytes:
    return f"From: {from_}\r\nTo: u@mx.test\r\nSubject: pay now\r\n\r\nwire it\r\n".encode()


def word(text: str, charset: str = "utf-8") -> str:
    """``text`` as one B-encoded word in ``charset``."""
    return f"=?{charset}?b?{base64.b64encode(text.encode(charset)).decode()}?="


def verdict(settings: AuthSettings, from_: str, sender: str = "a@evil.test") -> inbound.Outcome:
    return inbound.check(settings, CLIENT, "mx.evil.test", sender, message(from_))


# Froms that show ceo@bank.test only once adjacent encoded words are joined (or a UTF-32
# or UTF-16 word's bytes are shown as they are); the sender's SPF passes for evil.test.
SPLIT = [
    "=?utf-8?q?ceo=40ban?= =?utf-8?q?k.test?=",  # the review's: judged on 'ban'
    "=?utf-8?q?ceo=40bank.?= =?utf-8?q?test?= <x..y@evil.test>",  # on evil.test and 'bank'
    "=?utf-8?q?ceo=40ban?=\t=?utf-8?q?k.test?=",
    "=?utf-8?q?ceo=40ban?=\r\n =?utf-8?q?k.test?=",  # folded between the words
    "=?utf-8?q?ceo=40ban?==?utf-8?q?k.test?=",  # no blank at all
    f"{word('ceo@ban')} {word('k.test')}",
    f"{word('ceo@ban')} {word('k.te', 'iso-8859-1')}   {word('st')} <x..y@evil.test>",
    "CEO =?utf-8?q?ceo=40b?= =?utf-8?q?a?= =?utf-8?q?n?= =?utf-8?q?k.test?= (x..y@evil.test)",
    "=?utf-32?q?ceo=40bank.test?=",  # the review's: U+FFFD four times in UTF-32
    "=?UTF-32LE?q?ceo=40bank.test?= <x..y@evil.test>",
    "=?utf-16?q?ceo=40bank.test=20?=",
    "=?utf-32?b?Y2VvQGJhbmsudGVzdA==?=",
]


@pytest.mark.parametrize("from_", SPLIT)
def test_the_domain_a_client_shows_is_judged(settings: AuthSettings, from_: str) -> None:
    """bank.test's p=reject applies: it was ``none`` (the domain judged was 'ban', 'bank'
    or none at all) and the message accepted."""
    assert "bank.test" in from_domains(message(from_))
    outcome = verdict(settings, from_)
    assert (outcome.verdict.code, outcome.verdict.text) == (550, REJECTED), outcome.verdict
    assert "dmarc=fail" in outcome.verdict.log, outcome.verdict.log


@pytest.mark.parametrize("from_", SPLIT)
def test_dmarc_check_fails_it_on_bank_tests_policy(dns_server: DnsServer, from_: str) -> None:
    """The DMARC result itself: a failure of bank.test, its p=reject applied."""
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    r = check(res, message(from_), SpfResult("mailfrom", "pass", "evil.test", ""), [])
    assert (r.result, r.header_from, r.policy, r.tag) == ("fail", "bank.test", "reject", "p"), r


@pytest.mark.parametrize(
    "from_",
    [
        # a client that keeps the blank between the words shows ceo@bank.test x
        "=?utf-8?q?ceo=40bank.test?= =?utf-8?q?x?=",
        "=?utf-8?q?ceo=40bank.test?=\u3000=?utf-8?q?x?= <x..y@evil.test>",
    ],
)
def test_the_reading_with_the_blank_kept_is_judged_too(settings: AuthSettings, from_: str) -> None:
    """Joining the words judges bank.testx, which has no record; the blank kept: bank.test."""
    assert from_domains(message(from_))[-1] == "bank.test"
    outcome = verdict(settings, from_)
    assert (outcome.verdict.code, outcome.verdict.text) == (550, REJECTED), outcome.verdict


# Display names of adjacent encoded words that show no at sign: 山田 太郎 in two words. In
# ISO-2022-JP 太 is the bytes "B@" and in Shift_JIS 院 is 0x89 "@": their charsets are ones
# every client knows, so those bytes are never read as Latin-1 (an at sign before 'o:\x1b').
JAPANESE = [
    f"{word('山田')} {word('太郎')} <taro..yamada@docomo.test>",
    f"{word('山田', 'iso-2022-jp')} {word('太郎', 'iso-2022-jp')} <taro..yamada@docomo.test>",
    f"{word('太田', 'iso-2022-jp')}\r\n {word('院長', 'shift_jis')} <taro..yamada@docomo.test>",
    f"{word('山田')}{word('太郎')} <taro@docomo.test>",  # readable by the address grammar
]


@pytest.mark.parametrize("from_", JAPANESE)
def test_a_japanese_name_in_adjacent_words_is_judged_on_its_address(
    settings: AuthSettings, from_: str
) -> None:
    """Only docomo.test is shown: an aligned SPF pass is accepted (``dmarc=pass``), another
    sender's mail refused on docomo.test's p=reject."""
    assert from_domains(message(from_)) == ["docomo.test"]
    ok = verdict(settings, from_, sender="bounce@docomo.test")
    assert (ok.verdict.code, ok.junk) == (250, False), ok.verdict
    assert b"\tdmarc=pass (" in ok.message and b"header.from=docomo.test" in ok.message
    refused = verdict(settings, from_, sender="a@evil.test")
    assert (refused.verdict.code, refused.verdict.text) == (
        550,
        "5.7.1 DMARC policy of docomo.test rejects this message",
    ), refused.verdict


def test_an_aligned_pass_of_the_joined_domain_is_accepted(dns_server: DnsServer) -> None:
    """bank.test's own SPF pass: the domain the split From shows passes ('ban', the blank
    kept, has no record: ``none``), so the message is accepted."""
    res = make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)
    r = check(res, message(SPLIT[0]), SpfResult("mailfrom", "pass", "bank.test", ""), [])
    assert r.result in ("pass", "none") and r.policy == "none", r
    assert decide(r)[0].code == 250
