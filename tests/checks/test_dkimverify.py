"""DKIM verification (pyqmail.checks.dkimverify) of messages signed by tools no one here
wrote: dkimpy's ``dkimsign`` CLI and OpenDKIM (``opendkim -t`` in signing mode), each with an
RSA-2048 and an Ed25519 key, the keys published by a real knotd. Signed: pass; a changed
body or signed header: fail; several signatures: each its own result. And the d= a result
names, which DMARC aligns: only one dkimpy verified, never one whose failure the signer chose
to make temporary.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from pyqmail.checks.dkimverify import verify
from pyqmail.checks.resolver import make_resolver
from pyqmail.dkim import sign
from pyqmail.dkim.keys import Key
from tests.dkim_util import KeyPair, make_keys, opendkim_verify, zone
from tests.dnsserver import DnsServer, silent_server

DOMAIN = "signer.test"
MESSAGE = (
    b"From: Alice <alice@signer.test>\r\nTo: bob@example.org\r\nSubject: quarterly figures\r\n"
    b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@signer.test>\r\n\r\n"
    b"Hello Bob,\r\n\r\nthe figures are attached.\r\n"
)
BANK = b"From: CEO <ceo@bank.test>\r\nTo: v@example.org\r\nSubject: wire\r\n\r\nPay now.\r\n"
DKIMSIGN = str(Path(sys.executable).parent / "dkimsign")
OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> list[KeyPair]:
    return make_keys(tmp_path_factory.mktemp("keys"), DOMAIN)


@pytest.fixture(scope="module")
def dns_server(keys):
    with DnsServer({f"{DOMAIN}.": zone(keys)}) as server:
        yield server


@pytest.fixture
def resolver(dns_server):
    return make_resolver([(dns_server.host, dns_server.port)], timeout=2.0)


def dkimsign(key: KeyPair, message: bytes, tmp: Path) -> bytes:
    """``message`` signed by dkimpy's dkimsign CLI (its key formats: PKCS#1 PEM for RSA, the
    base64 seed for Ed25519)."""
    private = serialization.load_pem_private_key(key.path.read_bytes(), None)
    keyfile = tmp / f"{key.selector}.dkimpy"
    if key.algorithm == "rsa-sha256":
        keyfile.write_bytes(
            private.private_bytes(  # type: ignore[union-attr]
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    else:
        raw = private.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        keyfile.write_bytes(base64.b64encode(raw))
    out = subprocess.run(
        [
            DKIMSIGN,
            "--signalg",
            key.algorithm,
            "--bcanon",
            "relaxed",
            key.selector,
            DOMAIN,
            str(keyfile),
        ],
        input=message,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.startswith(b"DKIM-Signature:"), out
    return out.stdout


def opendkim_sign(key: KeyPair, message: bytes, tmp: Path) -> bytes:
    """``message`` signed by ``opendkim -t`` (Mode s): its signature field put on top."""
    d = tmp / f"opendkim-{key.selector}"
    d.mkdir()
    (d / "keytable").write_text(f"k._domainkey.{DOMAIN} {DOMAIN}:{key.selector}:{key.path}\n")
    (d / "signingtable").write_text(f"*@{DOMAIN} k._domainkey.{DOMAIN}\n")
    (d / "opendkim.conf").write_text(
        f"Syslog no\nMode s\nRequireSafeKeys no\nSignatureAlgorithm {key.algorithm}\n"
        f"Canonicalization relaxed/relaxed\nKeyTable file:{d}/keytable\n"
        f"SigningTable refile:{d}/signingtable\n"
    )
    (d / "msg").write_bytes(message)
    out = subprocess.run(
        [OPENDKIM, "-x", str(d / "opendkim.conf"), "-t", str(d / "msg")],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    start = out.index(b"DKIM-Signature:")
    return out[start:].rstrip(b"\r\n") + b"\r\n" + message


SIGNERS = {"dkimsign": dkimsign, "opendkim": opendkim_sign}


@pytest.mark.parametrize("signer", sorted(SIGNERS))
@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signed_passes_altered_fails(keys, resolver, tmp_path, signer, algorithm):
    key = next(k for k in keys if k.algorithm == algorithm)
    signed = SIGNERS[signer](key, MESSAGE, tmp_path)
    [result] = verify(signed, resolver)
    assert (result.result, result.domain, result.selector, result.algorithm) == (
        "pass",
        DOMAIN,
        key.selector,
        algorithm,
    ), result
    body = signed.replace(b"attached.", b"attached!")
    assert [r.result for r in verify(body, resolver)] == ["fail"]
    header = signed.replace(b"quarterly figures", b"quarterly figures (urgent)")
    assert [r.result for r in verify(header, resolver)] == ["fail"]
    # OpenDKIM's verifier (opendkim -t, its key from the same knotd) agrees on all three
    host, port = resolver.nameservers[0], resolver.port
    for name, msg, word in [
        ("signed", signed, "succeeded"),
        ("body", body, "failed"),
        ("header", header, "failed"),
    ]:
        report = opendkim_verify(msg, [DOMAIN], host, port, tmp_path / f"verify-{name}")
        assert word in report, (name, report)


def test_a_failing_signature_does_not_hide_a_passing_one(keys, resolver, tmp_path):
    """A forged signature on top of two good ones: fail, pass, pass, in that order."""
    rsa, ed = keys
    good = dkimsign(ed, opendkim_sign(rsa, MESSAGE, tmp_path), tmp_path)
    forged = dkimsign(rsa, MESSAGE.replace(b"Hello", b"Hi"), tmp_path).split(b"From:", 1)[0]
    results = verify(forged + good, resolver)
    assert [r.result for r in results] == ["fail", "pass", "pass"], results
    assert [r.selector for r in results] == [rsa.selector, ed.selector, rsa.selector]


def test_unsigned_and_unknown_selector(keys, resolver, tmp_path):
    assert verify(MESSAGE, resolver) == []
    signed = dkimsign(keys[0], MESSAGE, tmp_path).replace(b"s=sa-rsa", b"s=nosuch", 1)
    [result] = verify(signed, resolver)
    assert (result.result, result.selector, result.reason) == ("permerror", "nosuch", "no key")


def sign_with_tags(key: KeyPair, message: bytes, tags: str) -> bytes:
    """``message`` with a valid signature whose tag list is ``tags`` (h=, bh=, b= added)."""
    private = serialization.load_pem_private_key(key.path.read_bytes(), None)
    fields, body = sign.split_message(message)
    names = sign.signed_names(fields)
    head = (
        f"DKIM-Signature: v=1; {tags};\r\n\th={':'.join(names)}; bh={sign.body_hash(body)};\r\n\tb="
    )
    data = sign.header_input(fields, names) + sign.relaxed_header(head.encode()).removesuffix(
        b"\r\n"
    )
    signer = Key(key.domain, key.selector, key.algorithm, private)  # type: ignore[arg-type]
    return head.encode() + base64.b64encode(sign._private_op(signer, data)) + b"\r\n" + message


def test_an_upper_case_tag_is_not_the_domain(keys):
    """dkimpy reads tag names case-sensitively (RFC 6376 3.2): ``D=`` is an unknown tag it
    ignores, so the d= it verified is the one reported, not the bank's name in D=."""
    rsa = keys[0]
    forged = sign_with_tags(
        rsa, BANK, f"a=rsa-sha256; c=relaxed/relaxed; d={DOMAIN}; s={rsa.selector}; D=bank.test"
    )
    with DnsServer({f"{DOMAIN}.": zone(keys)}) as server:
        res = make_resolver([(server.host, server.port)], timeout=2.0)
        [result] = verify(forged, res)
        assert (result.result, result.domain) == ("pass", DOMAIN), result
        twice = sign_with_tags(
            rsa, BANK, f"a=rsa-sha256; d={DOMAIN}; s={rsa.selector}; d=bank.test"
        )
        [result] = verify(twice, res)  # a duplicate tag invalidates the signature (3.2)
    assert (result.result, result.domain) == ("permerror", ""), result


@pytest.mark.parametrize(
    ("d", "s"),
    [("bank.test", "a..b"), ("bank.test", "x" * 64), ("bank.test.", "sel"), ("bank..test", "s")],
)
def test_a_key_name_that_is_no_dns_name_is_permerror(resolver, d, s):
    """RFC 6376 6.1.1: no retry makes ``s=a..b._domainkey.bank.test`` a name; a temperror
    aligned with the From domain would turn its DMARC reject into an accept."""
    msg = f"DKIM-Signature: v=1; a=rsa-sha256; d={d}; s={s}; h=from; bh=AAAA; b=AAAA\r\n"
    [result] = verify(msg.encode() + BANK, resolver)
    assert result.result == "permerror", result
    assert result.reason.startswith("key name is no DNS name"), result


def test_a_lookup_cut_short_by_other_signatures_names_no_domain():
    """The signer's own silent DNS spends the budget; the key lookup of the next signature
    (the bank's, here: the same silent server) then times out because of that, and its
    temperror must not name d=bank.test for DMARC to align. The first lookup's timeout is
    the DNS's own: it keeps its d=."""
    sig = "DKIM-Signature: v=1; a=rsa-sha256; d={}; s=s; h=from; bh=AAAA; b=AAAA\r\n"
    msg = (sig.format("slow.example") + sig.format("bank.test")).encode() + BANK
    with silent_server() as server:
        res = make_resolver([server], timeout=5.0)
        first, second = verify(msg, res, budget=1.5)
    assert (first.result, first.domain, first.reason) == (
        "temperror",
        "slow.example",
        "key lookup: Timeout",
    )
    assert (second.result, second.domain, second.reason) == ("temperror", "", "time budget spent")
