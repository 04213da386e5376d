"""The pure certificate code of module_utils/pyqmail_crypto.py: decisions, order, chain checks.

Certificates are real (cryptography), checked with the real ``openssl verify``; one test runs
the same code under Debian's /usr/bin/python3 with python3-cryptography 38 (what hosts have).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.collection import module_utils

REPO = Path(__file__).resolve().parents[2]
crypto: Any = module_utils("pyqmail_crypto")

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


# --- the regeneration decision --------------------------------------------------------------

CURRENT = crypto.CertSummary(
    names=("mx.example.org", "192.0.2.25"),
    key_type="ec256",
    purposes=frozenset({"server"}),
    issuer="CN=ca (key 0011223344556677)",
    not_before=NOW - 100 * DAY,
    not_after=NOW + 200 * DAY,
    fingerprint="AA:BB",
    subject="CN=mx.example.org",
    chain=("CC:DD",),
)
WANTED = crypto.Wanted(
    names=("mx.example.org", "192.0.2.25"),
    key_type="ec256",
    purpose="server",
    issuer="CN=ca (key 0011223344556677)",
    chain=("CC:DD",),
)

# id, changes to CURRENT (None = no file), changes to WANTED, keyword args, needed, reason part
DECISIONS: list[tuple[str, dict[str, Any] | None, dict[str, Any], dict[str, Any], bool, str]] = [
    ("up to date", {}, {}, {}, False, "up to date: valid until 2026-12-18T12:00:00Z"),
    ("missing", None, {}, {}, True, "missing"),
    (
        "unreadable",
        None,
        {},
        {"problem": "holds no PEM data"},
        True,
        "existing file unusable: holds no PEM data",
    ),
    ("forced", {}, {}, {"force": True}, True, "forced (force: true)"),
    ("forced beats missing", None, {}, {"force": True}, True, "forced"),
    (
        "expiring within renew_before_days",
        {"not_after": NOW + 10 * DAY},
        {},
        {},
        True,
        "expires within 30 days (renew_before_days): not_after 2026-06-11T12:00:00Z",
    ),
    ("just outside the renewal window", {"not_after": NOW + 31 * DAY}, {}, {}, False, "up to"),
    ("exactly at the renewal window", {"not_after": NOW + 30 * DAY}, {}, {}, True, "expires"),
    (
        "renew_before_days 0 keeps a cert until it expires",
        {"not_after": NOW + DAY},
        {},
        {"renew_before_days": 0},
        False,
        "up to date",
    ),
    ("expired", {"not_after": NOW - DAY}, {}, {}, True, "expired on 2026-05-31T12:00:00Z"),
    ("not yet valid", {"not_before": NOW + 2 * DAY}, {}, {}, True, "not valid before"),
    (
        "name added",
        {},
        {"names": ("mx.example.org", "192.0.2.25", "mx2.example.org")},
        {},
        True,
        "names changed: added mx2.example.org",
    ),
    (
        "name removed",
        {},
        {"names": ("mx.example.org",)},
        {},
        True,
        "names changed: removed 192.0.2.25",
    ),
    (
        "name replaced",
        {},
        {"names": ("mx.example.org", "192.0.2.26")},
        {},
        True,
        "names changed: added 192.0.2.26; removed 192.0.2.25",
    ),
    (
        "names reordered: the CN changes",
        {},
        {"names": ("192.0.2.25", "mx.example.org")},
        {},
        True,
        "order changed (first name, the CN, is now 192.0.2.25)",
    ),
    (
        "key type changed",
        {},
        {"key_type": "rsa2048"},
        {},
        True,
        "key type changed: ec256 -> rsa2048",
    ),
    ("purpose changed", {}, {"purpose": "client"}, {}, True, "purpose changed"),
    (
        "issuer changed (new CA)",
        {},
        {"issuer": "CN=ca (key 8899aabbccddeeff)"},
        {},
        True,
        "issuer changed: CN=ca (key 0011223344556677) -> CN=ca (key 8899aabbccddeeff)",
    ),
    (
        "self-signed now wanted",
        {},
        {"issuer": crypto.SELF_SIGNED, "chain": ()},
        {},
        True,
        "issuer changed",
    ),
    ("chain changed", {"chain": ()}, {}, {}, True, "chain changed"),
    (
        "key type checked before expiry",
        {"not_after": NOW + DAY},
        {"key_type": "ec384"},
        {},
        True,
        "key type changed",
    ),
]


@pytest.mark.parametrize(
    ("current_changes", "wanted_changes", "kwargs", "needed", "reason"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_needs_regeneration(
    current_changes: dict[str, Any] | None,
    wanted_changes: dict[str, Any],
    kwargs: dict[str, Any],
    needed: bool,
    reason: str,
) -> None:
    current = None if current_changes is None else dataclasses.replace(CURRENT, **current_changes)
    wanted = dataclasses.replace(WANTED, **wanted_changes)
    args = {"now": NOW, "renew_before_days": 30, **kwargs}
    got_needed, got_reason = crypto.needs_regeneration(current, wanted, **args)
    assert (got_needed, reason in got_reason) == (needed, True), got_reason


CA_SUMMARY = dataclasses.replace(
    CURRENT, names=("Test CA",), issuer=crypto.SELF_SIGNED, purposes=frozenset(), chain=()
)
CA_DECISIONS: list[tuple[str, dict[str, Any] | None, dict[str, Any], bool, str]] = [
    ("up to date", {}, {}, False, "up to date"),
    ("missing", None, {}, True, "missing"),
    ("unusable", None, {"problem": "ca.pem is missing"}, True, "unusable: ca.pem is missing"),
    ("forced", {}, {"force": True}, True, "forced"),
    ("common name", {"names": ("Old CA",)}, {}, True, "common_name changed: 'Old CA'"),
    ("key type", {"key_type": "rsa2048"}, {}, True, "key type changed: rsa2048 -> ec256"),
    ("not self-signed", {"issuer": "CN=x (key 1)"}, {}, True, "not a self-signed CA"),
    ("expiring", {"not_after": NOW + 60 * DAY}, {}, True, "expires within 90 days"),
    ("expired", {"not_after": NOW - DAY}, {}, True, "expired on"),
]


@pytest.mark.parametrize(
    ("changes", "kwargs", "needed", "reason"),
    [case[1:] for case in CA_DECISIONS],
    ids=[case[0] for case in CA_DECISIONS],
)
def test_ca_needs_regeneration(
    changes: dict[str, Any] | None, kwargs: dict[str, Any], needed: bool, reason: str
) -> None:
    current = None if changes is None else dataclasses.replace(CA_SUMMARY, **changes)
    args = {"now": NOW, "renew_before_days": 90, **kwargs}
    got_needed, got_reason = crypto.ca_needs_regeneration(current, "Test CA", "ec256", **args)
    assert (got_needed, reason in got_reason) == (needed, True), got_reason


# --- names ----------------------------------------------------------------------------------

GOOD_NAMES = [
    (["MX.Example.ORG"], "server", ("mx.example.org",)),
    (["mx.example.org", "127.0.0.1", "::0001"], "server", ("mx.example.org", "127.0.0.1", "::1")),
    (["*.example.org", "example.org"], "server", ("*.example.org", "example.org")),
    (["xn--bcher-kva.example"], "server", ("xn--bcher-kva.example",)),
    (["localhost"], "server", ("localhost",)),
    (
        ["relay@Example.org", "relay.example.org"],
        "client",
        ("relay@example.org", "relay.example.org"),
    ),
]


@pytest.mark.parametrize(("names", "purpose", "expected"), GOOD_NAMES)
def test_check_names_accepts(names: list[str], purpose: str, expected: tuple[str, ...]) -> None:
    assert crypto.check_names(names, purpose) == expected


BAD_NAMES = [
    ([], "server", "at least one"),
    ("mx.example.org", "server", "at least one"),
    ([""], "server", "empty"),
    ([None], "server", "empty or non-text"),
    (["a..b"], "server", "not a valid DNS name"),
    (["-a.example"], "server", "not a valid DNS name"),
    (["a_b.example"], "server", "not a valid DNS name"),
    (["mx example.org"], "server", "not a valid DNS name"),
    (["mx.example.org."], "server", "trailing dot"),
    (["bücher.example"], "server", "IDNA form"),
    (["*.org"], "server", "at least two labels"),
    (["*.example.org"], "client", "only allowed in server"),
    (["a.*.example.org"], "server", "not a valid DNS name"),
    (["user@example.org"], "server", "email addresses belong in client"),
    (["bad user@example.org"], "client", "not a valid email"),
    (["mx.example.org", "MX.example.org"], "server", "twice"),
    (["127.0.0.1", "127.000.0.1"], "server", "neither a valid IP address"),
    (["10.1.2"], "server", "neither a valid IP address"),
    (["::1", "0::1"], "server", "twice"),
    ([("a" * 63 + ".") * 2 + "example"], "server", "longer than 64"),
    ([("a" * 63 + ".") * 4 + "example"], "server", "longer than 253"),
    (["mx.example.org"], "both", "purpose must be"),
]


@pytest.mark.parametrize(("names", "purpose", "message"), BAD_NAMES)
def test_check_names_rejects(names: Any, purpose: str, message: str) -> None:
    with pytest.raises(crypto.CryptoError, match=message.replace("*", r"\*")) as info:
        crypto.check_names(names, purpose)
    assert info.value.field in ("names", "purpose")


# --- generating, qmail's order, openssl verify ------------------------------------------------


def openssl_verify(purpose: str, ca: Path, target: Path, untrusted: Path | None = None) -> str:
    cmd = ["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca)]
    if untrusted is not None:
        cmd += ["-untrusted", str(untrusted)]
    proc = subprocess.run([*cmd, str(target)], capture_output=True, text=True, check=False)
    return proc.stdout + proc.stderr


def labels(data: bytes) -> list[str]:
    return [label for label, _ in crypto.split_pem(data)]


@pytest.mark.parametrize("key_type", crypto.KEY_TYPES)
def test_generated_servercert_in_qmail_order_verifies(key_type: str, tmp_path: Path) -> None:
    ca_key = crypto.generate_key("ec384")
    ca = crypto.create_ca("Unit CA", ca_key, 30)
    key = crypto.generate_key(key_type)
    assert crypto.key_type_of(key) == key_type
    names = crypto.check_names(["localhost", "127.0.0.1", "::1"], "server")
    cert = crypto.issue(names, "server", key, 10, ca_key=ca_key, ca_cert=ca)
    data = crypto.assemble(key, cert, [ca])
    assert labels(data) == ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    bundle = crypto.load_bundle(data)
    assert crypto.fingerprint(bundle.cert) == crypto.fingerprint(cert)
    assert [crypto.fingerprint(c) for c in bundle.chain] == [crypto.fingerprint(ca)]
    summary = crypto.summarize(bundle.cert, bundle.chain, ca)
    assert summary.names == names
    assert summary.key_type == key_type
    assert summary.issuer == crypto.issuer_label(ca)
    assert summary.purposes == frozenset({"server"})
    (tmp_path / "ca.pem").write_bytes(crypto.cert_to_pem(ca))
    (tmp_path / "servercert.pem").write_bytes(data)
    out = openssl_verify("sslserver", tmp_path / "ca.pem", tmp_path / "servercert.pem")
    assert out.strip().endswith(": OK"), out
    assert "OK" not in openssl_verify("sslclient", tmp_path / "ca.pem", tmp_path / "servercert.pem")


def test_client_cert_and_self_signed_verify(tmp_path: Path) -> None:
    ca_key = crypto.generate_key("ec256")
    ca = crypto.create_ca("Unit CA", ca_key, 30)
    key = crypto.generate_key("ec256")
    names = crypto.check_names(["relay@example.org", "relay.example.org"], "client")
    client = crypto.issue(names, "client", key, 10, ca_key=ca_key, ca_cert=ca)
    (tmp_path / "ca.pem").write_bytes(crypto.cert_to_pem(ca))
    (tmp_path / "clientcert.pem").write_bytes(crypto.assemble(key, client, [ca]))
    out = openssl_verify("sslclient", tmp_path / "ca.pem", tmp_path / "clientcert.pem")
    assert out.strip().endswith(": OK"), out
    assert crypto.cert_names(client) == names

    own = crypto.issue(("localhost",), "server", key, 10)
    assert crypto.is_self_signed(own)
    assert crypto.summarize(own).issuer == crypto.SELF_SIGNED
    (tmp_path / "self.pem").write_bytes(crypto.assemble(key, own, []))
    out = openssl_verify("sslserver", tmp_path / "self.pem", tmp_path / "self.pem")
    assert out.strip().endswith(": OK"), out


def test_leaf_never_outlives_its_ca() -> None:
    ca_key = crypto.generate_key("ec256")
    ca = crypto.create_ca("Short CA", ca_key, 5, NOW)
    key = crypto.generate_key("ec256")
    cert = crypto.issue(("a.example",), "server", key, 397, ca_key=ca_key, ca_cert=ca, now=NOW)
    assert crypto.not_after(cert) == crypto.not_after(ca)
    assert crypto.not_before(cert) == NOW - crypto.CLOCK_SKEW


def test_signature_check_without_verify_directly_issued_by() -> None:
    """The path Debian 12's cryptography 38 takes (verify_directly_issued_by came in 40)."""
    for key_type in ("ec256", "ec384", "rsa2048"):
        ca_key = crypto.generate_key(key_type)
        ca = crypto.create_ca("CA", ca_key, 5)
        other = crypto.create_ca("CA", crypto.generate_key(key_type), 5)
        leaf = crypto.issue(("a.example",), "server", crypto.generate_key("ec256"), 5,
                            ca_key=ca_key, ca_cert=ca)  # fmt: skip
        assert crypto.signature_valid(leaf, ca.public_key())
        assert not crypto.signature_valid(leaf, other.public_key())
        assert crypto.signed_by(leaf, ca)
        assert not crypto.signed_by(leaf, other)


# --- the user's own files (ACME) ----------------------------------------------------------------


@dataclasses.dataclass
class Acme:
    root: Any
    root_key: Any
    inter: Any
    inter_key: Any
    key: Any
    leaf: Any


def make_intermediate(root_key: Any, root: Any, name: str, *, ca: bool = True, **kw: Any) -> Any:
    """A CA signed by ``root`` (or by itself when root is None), built like an ACME issuer's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = crypto.generate_key("ec256")
    if root is None:
        root_key = key
    start = kw.get("now", crypto.utcnow())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.subject if root is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - DAY)
        .not_valid_after(start + kw.get("days", 60) * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="module")
def acme() -> Acme:
    root_key, root = make_intermediate(None, None, "Unit Root X1", days=365)
    inter_key, inter = make_intermediate(root_key, root, "Unit R3")
    key = crypto.generate_key("ec256")
    leaf = crypto.issue(("mx.example.org",), "server", key, 30, ca_key=inter_key, ca_cert=inter)
    return Acme(root, root_key, inter, inter_key, key, leaf)


def fp(certs: list[Any]) -> list[str]:
    return [crypto.fingerprint(c) for c in certs]


def test_provided_chain_assembled_and_verified(acme: Acme, tmp_path: Path) -> None:
    leaf, chain = crypto.check_provided(acme.key, [acme.leaf], [acme.inter], "server")
    data = crypto.assemble(acme.key, leaf, chain)
    assert labels(data) == ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    blocks = crypto.split_pem(data)
    assert crypto.load_private_key(blocks[0][1]).private_numbers() == acme.key.private_numbers()
    assert fp(crypto.load_certificates(data)) == fp([acme.leaf, acme.inter])
    (tmp_path / "root.pem").write_bytes(crypto.cert_to_pem(acme.root))
    (tmp_path / "servercert.pem").write_bytes(data)
    target = tmp_path / "servercert.pem"
    out = openssl_verify("sslserver", tmp_path / "root.pem", target, untrusted=target)
    assert out.strip().endswith(": OK"), out
    # Without the intermediate from the file, OpenSSL cannot build the path: it is needed.
    assert "OK" not in openssl_verify("sslserver", tmp_path / "root.pem", target)


def test_provided_fullchain_and_chain_are_deduplicated(acme: Acme) -> None:
    _, chain = crypto.check_provided(
        acme.key, [acme.leaf, acme.inter], [acme.inter, acme.root], "server"
    )
    assert fp(chain) == fp([acme.inter, acme.root])


def _expired_leaf(acme: Acme) -> Any:
    return crypto.issue(("mx.example.org",), "server", acme.key, 10,
                        ca_key=acme.inter_key, ca_cert=acme.inter,
                        now=crypto.utcnow() - 40 * DAY)  # fmt: skip


def _future_leaf(acme: Acme) -> Any:
    return crypto.issue(("mx.example.org",), "server", acme.key, 10,
                        ca_key=acme.inter_key, ca_cert=acme.inter,
                        now=crypto.utcnow() + 2 * DAY)  # fmt: skip


def _client_leaf(acme: Acme) -> Any:
    return crypto.issue(("mx.example.org",), "client", acme.key, 10,
                        ca_key=acme.inter_key, ca_cert=acme.inter)  # fmt: skip


def _other_inter(acme: Acme) -> Any:
    return make_intermediate(acme.root_key, acme.root, "Unit R4")[1]


def _expired_inter_case(acme: Acme) -> tuple[Any, list[Any], list[Any]]:
    """A leaf still valid under an intermediate that has expired (issue() would clamp it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key, inter = make_intermediate(acme.root_key, acme.root, "Old R2",
                                   now=crypto.utcnow() - 100 * DAY, days=50)  # fmt: skip
    leaf = (
        x509.CertificateBuilder()
        .subject_name(acme.leaf.subject)
        .issuer_name(inter.subject)
        .public_key(acme.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(crypto.utcnow() - DAY)
        .not_valid_after(crypto.utcnow() + 5 * DAY)
        .sign(key, hashes.SHA256())
    )
    return acme.key, [leaf], [inter]


def _non_ca_inter_case(acme: Acme) -> tuple[Any, list[Any], list[Any]]:
    key, inter = make_intermediate(acme.root_key, acme.root, "Not A CA", ca=False)
    leaf = crypto.issue(("mx.example.org",), "server", acme.key, 5, ca_key=key, ca_cert=inter)
    return acme.key, [leaf], [inter]


def _pathlen_case(acme: Acme) -> tuple[Any, list[Any], list[Any]]:
    """pyqmail's own CA has pathlen 0: it may not sign an intermediate."""
    root_key = crypto.generate_key("ec256")
    root = crypto.create_ca("Leaf-only CA", root_key, 30)
    key, inter = make_intermediate(root_key, root, "Sub CA")
    leaf = crypto.issue(("mx.example.org",), "server", acme.key, 5, ca_key=key, ca_cert=inter)
    return acme.key, [leaf], [inter, root]


CHAIN_ERRORS: list[tuple[str, Any, str, str]] = [
    ("key mismatch", lambda a: (crypto.generate_key("ec256"), [a.leaf], [a.inter]), "key",
     "does not match the certificate"),
    ("chain out of order", lambda a: (a.key, [a.leaf], [a.root, a.inter]), "chain",
     "out of order"),
    ("wrong chain", lambda a: (a.key, [a.leaf], [_other_inter(a)]), "chain",
     r"did not issue CN=mx\.example\.org"),
    ("no certificate", lambda a: (a.key, [], []), "cert", "no PEM certificate"),
    ("expired leaf", lambda a: (a.key, [_expired_leaf(a)], [a.inter]), "cert", "expired on"),
    ("leaf not yet valid", lambda a: (a.key, [_future_leaf(a)], [a.inter]), "cert",
     "not valid before"),
    ("client cert used as server", lambda a: (a.key, [_client_leaf(a)], [a.inter]), "cert",
     "no server authentication"),
    ("CA certificate as leaf", lambda a: (a.inter_key, [a.inter], []), "cert",
     "is a CA certificate"),
    ("intermediate expired", _expired_inter_case, "chain", "chain certificate 1 .* expired on"),
    ("intermediate is no CA", _non_ca_inter_case, "chain", "is not a CA certificate"),
    ("pathlen exceeded", _pathlen_case, "chain", r"may only have 0 CA\(s\) below it"),
    ("wrong chain inside fullchain", lambda a: (a.key, [a.leaf, _other_inter(a)], []), "cert",
     "did not issue"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "field", "message"),
    [case[1:] for case in CHAIN_ERRORS],
    ids=[case[0] for case in CHAIN_ERRORS],
)
def test_provided_chain_errors(acme: Acme, build: Any, field: str, message: str) -> None:
    key, certs, chain = build(acme)
    with pytest.raises(crypto.CryptoError, match=message) as info:
        crypto.check_provided(key, certs, chain, "server")
    assert info.value.field == field


def test_provided_keys_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    weak_pem = weak.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(crypto.CryptoError, match="1024 bits; at least 2048"):
        crypto.load_private_key(weak_pem)
    locked = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(crypto.CryptoError, match="passphrase"):
        crypto.load_private_key(locked)
    with pytest.raises(crypto.CryptoError, match="no PEM private key"):
        crypto.load_private_key(b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
    # "traditional" (BEGIN EC/RSA PRIVATE KEY) files from openssl req -nodes are fine
    good = ec.generate_private_key(ec.SECP384R1())
    pem = good.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert crypto.key_type_of(crypto.load_private_key(b"blurb\n" + pem)) == "ec384"


def test_load_bundle_refuses_wrong_order_and_mismatch(acme: Acme) -> None:
    key_pem = crypto.key_to_pem(acme.key)
    cert_pem = crypto.cert_to_pem(acme.leaf)
    good = crypto.load_bundle(key_pem + b"text between blocks\n" + cert_pem)
    assert good.chain == ()
    cases = [
        (cert_pem + key_pem, "does not start with the private key"),
        (b"", "holds no PEM data"),
        (key_pem, "no certificate"),
        (crypto.key_to_pem(crypto.generate_key("ec256")) + cert_pem, "does not match"),
        (key_pem + key_pem + cert_pem, "more than one private key"),
    ]
    for data, message in cases:
        with pytest.raises(crypto.CryptoError, match=message):
            crypto.load_bundle(data)


def test_diff_text_never_holds_key_material(acme: Acme) -> None:
    text = crypto.diff_text(crypto.summarize(acme.leaf, [acme.inter]))
    assert "names: mx.example.org" in text
    assert "not_after: " in text
    assert "PRIVATE" not in text
    assert "BEGIN" not in text


# --- the code under Debian's own python3-cryptography ---------------------------------------

DEBIAN_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("error")
    sys.path.insert(0, sys.argv[1])
    import cryptography, pyqmail_crypto as c
    ca_key = c.generate_key("ec384")
    ca = c.create_ca("Debian CA", ca_key, 30)
    for kt in c.KEY_TYPES:
        key = c.generate_key(kt)
        names = c.check_names(["localhost", "127.0.0.1"], "server")
        leaf = c.issue(names, "server", key, 10, ca_key=ca_key, ca_cert=ca)
        b = c.load_bundle(c.assemble(key, leaf, [ca]))
        s = c.summarize(b.cert, b.chain, ca)
        assert s.names == names and s.key_type == kt and s.issuer == c.issuer_label(ca), s
        assert c.check_provided(key, [leaf], [ca], "server")[1][0] == ca
        assert not c.signed_by(ca, leaf)
        w = c.Wanted(names, kt, "server", c.issuer_label(ca), (c.fingerprint(ca),))
        ok, why = c.needs_regeneration(s, w, now=c.utcnow(), renew_before_days=3)
        assert not ok, why
    own = c.issue(("a.example",), "server", key, 3)
    assert c.summarize(own).issuer == c.SELF_SIGNED
    print(cryptography.__version__)
    """
)


def test_runs_with_debian_python3_cryptography() -> None:
    python = Path("/usr/bin/python3")
    probe = subprocess.run(
        [str(python), "-c", "import cryptography; print(cryptography.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("Debian's python3-cryptography is not installed (apt install it)")
    proc = subprocess.run(
        [str(python), "-c", DEBIAN_SCRIPT, str(REPO / "module_utils")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == probe.stdout.strip()
