"""ARC chains (pyqmail.checks.arcverify) sealed by dkimpy's arc_sign with an RSA key published
by a real knotd: a sealed message passes, an altered one fails, an unsealed one is none, too
many sets fail unverified."""

from __future__ import annotations

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from pyqmail.checks.arcverify import MAX_SETS, verify
from pyqmail.checks.resolver import make_resolver
from tests.dkim_util import KeyPair, make_keys, zone
from tests.dnsserver import DnsServer

DOMAIN = "forwarder.test"
MESSAGE = (
    b"Authentication-Results: mx.forwarder.test; spf=pass smtp.mailfrom=a.test\r\n"
    b"From: <a@a.test>\r\nTo: <list@forwarder.test>\r\nSubject: list post\r\n"
    b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <2@a.test>\r\n\r\nHello list.\r\n"
)


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory) -> KeyPair:
    return make_keys(tmp_path_factory.mktemp("arc"), DOMAIN)[0]


@pytest.fixture(scope="module")
def resolver(rsa_key):
    with DnsServer({f"{DOMAIN}.": zone([rsa_key])}) as server:
        yield make_resolver([(server.host, server.port)], timeout=2.0)


def seal(key: KeyPair, message: bytes) -> bytes:
    private = serialization.load_pem_private_key(key.path.read_bytes(), None)
    pem = private.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    fields = dkim.arc_sign(
        message, key.selector.encode(), DOMAIN.encode(), pem, b"mx.forwarder.test"
    )
    return b"".join(fields) + message


def test_sealed_passes_altered_fails_unsealed_none(rsa_key, resolver):
    sealed = seal(rsa_key, MESSAGE)
    assert verify(sealed, resolver).result == "pass"
    assert verify(sealed.replace(b"Hello list.", b"Hello all."), resolver).result == "fail"
    assert verify(MESSAGE, resolver).result == "none"


def test_too_many_sets_fail_unverified(resolver):
    many = b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.test; s=s; b=AAAA\r\n" * (MAX_SETS + 1)
    result = verify(many + MESSAGE, resolver)
    assert (result.result, result.reason) == ("fail", f"over {MAX_SETS} ARC sets")
