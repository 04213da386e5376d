"""The Authentication-Results header (pyqmail.checks.authresults): one field, parseable by
authres (RFC 8601 syntax), and every incoming field that claims our authserv-id removed
(RFC 8601 5) while other hosts' stay."""

from __future__ import annotations

import authres
import pytest

from pyqmail.checks.authresults import Results, header, strip_ours
from pyqmail.checks.dkimverify import DkimResult
from pyqmail.checks.dmarc import DmarcResult
from pyqmail.checks.spf import SpfResult

RESULTS = Results(
    helo=SpfResult("helo", "pass", "mx.sender.test"),
    mailfrom=SpfResult("mailfrom", "softfail", "sender.test"),
    dkim=[
        DkimResult("fail", "sender.test", "s1", "rsa-sha256", "abcd1234", "body hash mismatch"),
        DkimResult("pass", "sender.test", "s2", "ed25519-sha256", "Zz9+/x=="),
    ],
    dmarc=DmarcResult("pass", "sender.test", "none", "reject"),
)


def test_header_parses_back():
    field = header("mx.example.org", RESULTS)
    assert field.startswith(b"Authentication-Results: mx.example.org;") and field.endswith(b"\r\n")
    parsed = authres.AuthenticationResultsHeader.parse(field.decode().replace("\r\n", ""))
    assert parsed.authserv_id == "mx.example.org"
    got = [(r.method, r.result) for r in parsed.results]
    assert got == [
        ("spf", "softfail"),
        ("spf", "pass"),
        ("dkim", "fail"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
    ]
    text = field.decode()
    for part in (
        "smtp.mailfrom=sender.test",
        "smtp.helo=mx.sender.test",
        "header.s=s2",
        "header.a=ed25519-sha256",
        "header.from=sender.test",
        "p=reject",
    ):
        assert part in text, (part, text)


def test_unsigned_message_says_dkim_none():
    bare = Results(
        SpfResult("helo", "none", ""), SpfResult("mailfrom", "none", ""), [], DmarcResult("none")
    )
    parsed = authres.AuthenticationResultsHeader.parse(
        header("mx.example.org", bare).decode().replace("\r\n", "")
    )
    assert [(r.method, r.result) for r in parsed.results] == [("dkim", "none"), ("dmarc", "none")]


HEAD = (
    b"Received: from a by b\r\n"
    b"Authentication-Results: mx.example.org; dkim=pass header.d=bank.test\r\n"
    b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x.test\r\n"
    b"authentication-results:   (forged) MX.Example.ORG.;\r\n"
    b"\tdkim=pass\r\n\t header.d=bank.test\r\n"
    b"Authentication-Results: mx.example.org.evil.test; dkim=pass\r\n"
    b"Authentication-Results: mx.example.org 1; dmarc=pass\r\n"
    b"X-Note: Authentication-Results: mx.example.org; stays, not a field\r\n"
    b"Subject: hi\r\n"
)


def test_forged_fields_of_ours_removed_others_kept():
    out, removed = strip_ours(HEAD, "mx.example.org")
    assert removed == 3, out
    assert out == (
        b"Received: from a by b\r\n"
        b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x.test\r\n"
        b"Authentication-Results: mx.example.org.evil.test; dkim=pass\r\n"
        b"X-Note: Authentication-Results: mx.example.org; stays, not a field\r\n"
        b"Subject: hi\r\n"
    )


@pytest.mark.parametrize("authserv_id", ["mx.example.org", "MX.EXAMPLE.ORG", "mx.example.org."])
def test_authserv_id_compared_as_a_domain(authserv_id):
    assert strip_ours(HEAD, authserv_id)[1] == 3


@pytest.mark.parametrize(
    "value",
    [
        b"(((((a))))) mx.example.org; dmarc=pass",  # deeper than the old 4-level unfolding
        b"(" * 40 + b"a" + b")" * 40 + b" mx.example.org; dmarc=pass",
        b"(a \\) b) mx.example.org; dmarc=pass",  # a quoted-pair ")" does not end it
        b"(a \\( (b) \\\\) mx.example.org; dmarc=pass",
        b"((a) mx.example.org; dmarc=pass",  # unbalanced: the id cannot be told
        b"(a mx.example.org; dmarc=pass",
        b"(a\\) mx.example.org; dmarc=pass",
        b'"mx.example.org"; dmarc=pass',  # a quoted-string value
        b'"mx.exam\\ple.org" (x); dmarc=pass',
        b'"mx.example.org; dmarc=pass',  # unclosed quote
        b"; dmarc=pass",  # no id at all
        b"(c) )mx.example.org; dmarc=pass",  # an id authres would not read: not kept either
        b"mx.example.org(c); dmarc=pass",
    ],
)
def test_forged_field_with_tricky_comments_removed(value: bytes) -> None:
    """RFC 8601 5: whatever comes before the id, a field a parser may read as ours goes;
    one whose id cannot be told for sure goes too (fail closed)."""
    head = b"Authentication-Results: " + value + b"\r\nSubject: hi\r\n"
    assert strip_ours(head, "mx.example.org") == (b"Subject: hi\r\n", 1)


@pytest.mark.parametrize(
    "value",
    [
        b"(((((a))))) other.example; dmarc=pass",
        b"(a \\) mx.example.org) other.example; dmarc=pass",  # ours only inside a comment
        b'"other.example" (mx.example.org); dmarc=pass',
        b"other.example (unclosed; dmarc=pass",  # the id is read before the bad comment
    ],
)
def test_other_hosts_fields_kept_whatever_their_comments(value: bytes) -> None:
    head = b"Authentication-Results: " + value + b"\r\nSubject: hi\r\n"
    assert strip_ours(head, "mx.example.org") == (head, 0)
