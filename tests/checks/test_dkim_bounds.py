"""What a DKIM signature (and an ARC set) must be before dkimpy is given it, the keys served
by a real knotd, the signatures made with the sender's own key as the review made them.

- dkimpy selects the signed fields once per name of ``h=``, walking the header list each
  time: N absent names on a message of N fields cost O(N^2) in pure Python (8,000: 5 s,
  holding a check thread after ``inbound.run`` had answered 451). Past
  ``MAX_SIGNED_NAMES`` names, ``MAX_HEADER_FIELDS`` fields or 100 KiB of header section a
  signature is permerror, unverified, in milliseconds.
- A signature whose ``h=`` does not name From verified and made DMARC pass (RFC 6376
  6.1.1: it MUST be ignored); an ``a=rsa-sha1`` one passed (RFC 8301 3.1: MUST NOT).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from pyqmail.checks import arcverify, inbound
from pyqmail.checks.dkimverify import MAX_HEADER_FIELDS, MAX_SIGNED_NAMES, verify
from pyqmail.checks.resolver import make_resolver
from pyqmail.checks.settings import AuthSettings
from pyqmail.dkim import sign
from pyqmail.dkim.keys import Key
from tests.dkim_util import KeyPair, make_keys, zone
from tests.dnsserver import DnsServer

DOMAIN = "signer.test"
MESSAGE = (
    b"From: CEO <ceo@signer.test>\r\nTo: v@example.org\r\nSubject: wire\r\n"
    b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\n\r\nPay now.\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> list[KeyPair]:
    return make_keys(tmp_path_factory.mktemp("keys"), DOMAIN)


@pytest.fixture(scope="module")
def dns_server(keys) -> Iterator[DnsServer]:
    dmarc = '_dmarc 300 IN TXT "v=DMARC1; p=reject"\n@ 300 IN TXT "v=spf1 -all"\n'
    with DnsServer({f"{DOMAIN}.": zone(keys) + dmarc}) as server:
        yield server


@pytest.fixture
def resolver(dns_server):
    return make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)


def signed(key: KeyPair, message: bytes, names: list[str]) -> bytes:
    """``message`` with a valid relaxed/relaxed rsa-sha256 signature by ``key`` whose h=
    is ``names`` (pyqmail's signer: linear, whatever the names)."""
    private = serialization.load_pem_private_key(key.path.read_bytes(), None)
    fields, body = sign.split_message(message)
    head = (
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={key.domain}; "
        f"s={key.selector};\r\n\th={':'.join(names)};\r\n\tbh={sign.body_hash(body)};\r\n\tb="
    )
    lower = [n.lower() for n in names]  # h= as written, the fields as they are named
    data = sign.header_input(fields, lower) + sign.relaxed_header(head.encode()).removesuffix(
        b"\r\n"
    )
    signer = Key(key.domain, key.selector, key.algorithm, private)  # type: ignore[arg-type]
    return head.encode() + base64.b64encode(sign._private_op(signer, data)) + b"\r\n" + message


def padded(fields: int) -> bytes:
    """MESSAGE with ``fields`` more header fields (X-N: v) above its own."""
    return b"".join(b"X-%d: v\r\n" % i for i in range(fields)) + MESSAGE


def test_the_control_signature_passes(keys, resolver):
    rsa = keys[0]
    [result] = verify(signed(rsa, MESSAGE, ["from", "to", "subject", "from"]), resolver)
    assert (result.result, result.domain) == ("pass", DOMAIN), result


def test_h_listing_thousands_of_absent_names_is_refused_at_once(keys, resolver):
    """The review's message: 8,000 fields, h= of 8,000 names that are not there (5.25 s)."""
    names = ["from", *(f"x-absent-{i}" for i in range(8000))]
    msg = signed(keys[0], padded(8000), names)
    start = time.monotonic()
    [result] = verify(msg, resolver)
    elapsed = time.monotonic() - start
    assert result.result == "permerror", result
    assert elapsed < 1.0, elapsed


@pytest.mark.parametrize(
    ("fields", "names", "reason"),
    [
        (0, MAX_SIGNED_NAMES + 1, f"h= lists over {MAX_SIGNED_NAMES} names"),
        (MAX_HEADER_FIELDS, 8, f"header section over {MAX_HEADER_FIELDS} fields"),
        (3000, 3000, f"header section over {MAX_HEADER_FIELDS} fields"),
    ],
)
def test_the_bounds(keys, resolver, fields, names, reason):
    """Within the bounds a signature is verified (the control: 64 names on 995 fields);
    one past them is permerror, whatever its signature says."""
    rsa = keys[0]
    listed = ["from", *(f"x-absent-{i}" for i in range(names - 1))]
    start = time.monotonic()
    [result] = verify(signed(rsa, padded(fields), listed), resolver)
    assert (result.result, result.reason) == ("permerror", reason), result
    assert time.monotonic() - start < 1.0
    inside = ["from", *(f"x-{i}" for i in range(MAX_SIGNED_NAMES - 1))]
    [result] = verify(signed(rsa, padded(MAX_HEADER_FIELDS - 5), inside), resolver)
    assert result.result == "pass", result


def test_a_header_section_over_100_kib_is_refused(keys, resolver):
    fat = b"X-Fat: " + b"f" * (100 * 1024) + b"\r\n" + MESSAGE
    [result] = verify(signed(keys[0], fat, ["from"]), resolver)
    assert (result.result, result.reason) == ("permerror", "header section over 102400 bytes")
    assert verify(b"X-Fat: " + b"f" * (100 * 1024) + b"\r\n" + MESSAGE, resolver) == []


def test_a_signature_without_from_in_h_is_permerror_and_dmarc_fails(keys, resolver):
    """dkimpy checks that From is signed only when signing: this verified, and passed
    DMARC for any From the sender put above the signed fields."""
    msg = signed(keys[0], MESSAGE, ["to", "subject", "date"])
    [result] = verify(msg, resolver)
    assert (result.result, result.reason) == (
        "permerror",
        "From not signed (RFC 6376 6.1.1)",
    ), result
    upper = signed(keys[0], MESSAGE, ["To", "Subject", "FROM"])  # names are case-insensitive
    assert [r.result for r in verify(upper, resolver)] == ["pass"]
    settings = AuthSettings(enabled=True, authserv_id="mx.test", timeout=5, resolver=resolver)
    outcome = inbound.check(settings, "192.0.2.66", "mx.evil.test", "a@evil.test", msg)
    assert outcome.verdict.code == 550, outcome.verdict


def test_rsa_sha1_is_permerror(keys, resolver):
    """RFC 8301 3.1: verifiers MUST NOT consider rsa-sha1 signatures valid (dkimpy does)."""
    private = serialization.load_pem_private_key(keys[0].path.read_bytes(), None)
    pem = private.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    field = dkim.sign(
        MESSAGE, keys[0].selector.encode(), DOMAIN.encode(), pem, signature_algorithm=b"rsa-sha1"
    )
    [result] = verify(field + MESSAGE, resolver)
    assert (result.result, result.algorithm) == ("permerror", "rsa-sha1"), result
    assert "rsa-sha1" in result.reason


def seal(key: KeyPair, message: bytes) -> bytes:
    """``message`` with one ARC set by ``key`` (dkimpy's arc_sign)."""
    private = serialization.load_pem_private_key(key.path.read_bytes(), None)
    pem = private.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    arc = b"Authentication-Results: mx.signer.test; spf=pass smtp.mailfrom=signer.test\r\n"
    fields = dkim.arc_sign(
        arc + message, key.selector.encode(), DOMAIN.encode(), pem, b"mx.signer.test"
    )
    return b"".join(fields) + arc + message


def test_arc_has_the_same_bounds(keys, resolver):
    """An ARC-Message-Signature's h= is selected as a DKIM signature's is."""
    assert arcverify.verify(seal(keys[0], MESSAGE), resolver).result == "pass"
    start = time.monotonic()
    result = arcverify.verify(seal(keys[0], padded(8000)), resolver)
    assert (result.result, result.reason) == (
        "fail",
        f"header section over {MAX_HEADER_FIELDS} fields",
    ), result
    assert time.monotonic() - start < 1.0
    names = b":".join(b"x-absent-%d" % i for i in range(MAX_SIGNED_NAMES + 1))
    sealed = seal(keys[0], MESSAGE)
    forged = sealed.replace(b"h=", b"h=" + names + b":", 1)
    assert forged.index(b"h=") > sealed.index(b"ARC-Message-Signature")
    result = arcverify.verify(forged, resolver)
    assert result.reason == f"ARC-Message-Signature h= lists over {MAX_SIGNED_NAMES} names"
