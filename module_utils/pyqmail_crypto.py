# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Certificates for qmail-tls and Postfix: the pure part of pyqmail_ca / pyqmail_certificate.

No AnsibleModule here: keys, a local CA, leaf certificates, checks of the user's own files
(for example from an ACME client), qmail's file order and the "regenerate or not" decision,
so that all of it is unit-tested directly.

Runs on managed hosts with Debian 12's python3-cryptography (38.0): every API used here exists
there, and the two newer conveniences (``not_valid_after_utc`` from 42,
``verify_directly_issued_by`` from 40) are used only when present.

qmail's ``servercert.pem`` / ``clientcert.pem`` hold the private key, then the certificate, then
the chain (qmail-tls reads key and certificate from one file, Postfix accepts the same order in
``smtpd_tls_chain_files``); Python's ``ssl.SSLContext.load_cert_chain(f, f)`` reads it too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import traceback
from dataclasses import dataclass

# Without cryptography this file still imports (ansible-test's import test loads every
# module_utils file where only the standard library is installed); the modules that use it
# report CRYPTOGRAPHY_IMPORT_ERROR through missing_required_lib before calling anything here.
try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:  # pragma: no cover - exercised by ansible-test sanity's import test
    CRYPTOGRAPHY_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    CRYPTOGRAPHY_IMPORT_ERROR = None

if CRYPTOGRAPHY_IMPORT_ERROR is None:
    PrivateKey = (
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
    )
    _EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
PURPOSES = ("server", "client")
SELF_SIGNED = "self-signed"
# Clocks of peers drift; a certificate made "now" starts a little in the past.
CLOCK_SKEW = dt.timedelta(minutes=5)
MIN_RSA_BITS = 2048  # Mozilla intermediate

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----\r?\n?", re.DOTALL)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


class CryptoError(Exception):
    """A bad input or file, with a message that names what is wrong.

    ``field`` says which input was bad (``key``, ``cert``, ``chain``, ``names``, ...) so that a
    module can name the option the user has to change.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- keys -----------------------------------------------------------------------------------


def generate_key(key_type: str) -> PrivateKey:
    """A new private key; ``key_type`` is one of KEY_TYPES."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise CryptoError(
        f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}", "key_type"
    )


def key_type_of(key: object) -> str:
    """``ec256``-style name of a private or public key (also for types we do not generate)."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"rsa{key.key_size}"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return {"secp256r1": "ec256", "secp384r1": "ec384", "secp521r1": "ec521"}.get(
            key.curve.name, f"ec-{key.curve.name}"
        )
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "ed448"
    return type(key).__name__


def key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8: neither qmail nor Postfix can ask for a passphrase."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes, field: str = "key") -> PrivateKey:
    """The first private key in ``data``; refuses passphrases and weak or odd key types."""
    blocks = [b for b in split_pem(data) if b[0].endswith("PRIVATE KEY")]
    if not blocks:
        raise CryptoError("contains no PEM private key (-----BEGIN ... PRIVATE KEY-----)", field)
    label, pem = blocks[0]
    if label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in pem:
        raise CryptoError(
            "the private key is protected by a passphrase, which neither qmail nor Postfix "
            "can use; remove it first (openssl pkey -in KEY -out KEY.plain)",
            field,
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"the private key cannot be read: {exc}", field) from exc
    if not isinstance(
        key,
        (
            rsa.RSAPrivateKey,
            ec.EllipticCurvePrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise CryptoError(f"{key_type_of(key)} keys cannot be used for TLS here", field)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise CryptoError(
            f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required", field
        )
    return key


def _spki(key: object) -> bytes:
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    return _spki(key) == _spki(cert.public_key())


# --- PEM and certificates ---------------------------------------------------------------------


def split_pem(data: bytes) -> list[tuple[str, bytes]]:
    """Every PEM block in ``data`` as (label, block), in file order; text between is ignored."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def load_certificates(
    data: bytes, field: str = "cert", *, required: bool = False
) -> list[x509.Certificate]:
    """Every certificate in ``data`` (cryptography 38 has no load_pem_x509_certificates)."""
    certs = []
    for number, (label, pem) in enumerate(
        (b for b in split_pem(data) if b[0] in ("CERTIFICATE", "TRUSTED CERTIFICATE")), 1
    ):
        if label != "CERTIFICATE":
            raise CryptoError(f"certificate {number} is an OpenSSL TRUSTED CERTIFICATE", field)
        try:
            certs.append(x509.load_pem_x509_certificate(pem))
        except ValueError as exc:
            raise CryptoError(f"certificate {number} cannot be read: {exc}", field) from exc
    if required and not certs:
        raise CryptoError("contains no PEM certificate (-----BEGIN CERTIFICATE-----)", field)
    return certs


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def not_after(cert: x509.Certificate) -> dt.datetime:
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=dt.UTC)


def not_before(cert: x509.Certificate) -> dt.datetime:
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc
    return cert.not_valid_before.replace(tzinfo=dt.UTC)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 in ``openssl x509 -fingerprint -sha256`` form (AB:CD:...)."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def key_id(cert: x509.Certificate) -> str:
    """Short SHA-256 of the public key: identifies a CA across re-issues of its certificate."""
    return hashlib.sha256(_spki(cert.public_key())).hexdigest()[:16]


def describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer`` names and signs ``cert`` (signature checked, not just names)."""
    if cert.issuer != issuer.subject:
        return False
    if hasattr(cert, "verify_directly_issued_by"):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
        return True
    return signature_valid(cert, issuer.public_key())


def signature_valid(cert: x509.Certificate, public: object) -> bool:
    """Check ``cert``'s signature with ``public`` (for cryptography < 40, Debian 12's 38)."""
    signature, tbs = cert.signature, cert.tbs_certificate_bytes
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(public, rsa.RSAPublicKey):
            if algorithm is None:
                return False
            # RSASSA-PSS certificates are rare; PKCS#1 v1.5 is what CAs issue.
            public.verify(signature, tbs, padding.PKCS1v15(), algorithm)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            if algorithm is None:
                return False
            public.verify(signature, tbs, ec.ECDSA(algorithm))
        elif isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public.verify(signature, tbs)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    return signed_by(cert, cert)


def cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    """SAN entries (DNS, IP, email) in certificate order, normalised like ``check_names``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names = []
    for general in san:
        if isinstance(general, x509.IPAddress):
            names.append(str(general.value))
        elif isinstance(general, (x509.DNSName, x509.RFC822Name)):
            names.append(general.value.lower())
    return tuple(names)


def cert_purposes(cert: x509.Certificate) -> frozenset[str]:
    """Which of server/client the certificate may be used for (no EKU = any, as OpenSSL)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return frozenset(PURPOSES)
    if ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        return frozenset(PURPOSES)
    return frozenset(p for p, oid in _EKU.items() if oid in eku)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def path_length(cert: x509.Certificate) -> int | None:
    """basicConstraints pathlen: how many CAs may sit below this one (None = no limit)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


# --- names ----------------------------------------------------------------------------------


def _check_dns(name: str, *, wildcard: bool) -> str:
    if not name.isascii():
        raise CryptoError(f"{name!r} is not ASCII; give the IDNA form (xn--...)", "names")
    lowered = name.lower()
    if lowered.endswith("."):
        raise CryptoError(f"{name!r} ends with a dot; leave the trailing dot out", "names")
    if len(lowered) > 253:
        raise CryptoError(f"{name!r} is longer than 253 characters", "names")
    labels = lowered.split(".")
    if labels[0] == "*":
        if not wildcard:
            raise CryptoError(f"{name!r}: wildcards are only allowed in server names", "names")
        if len(labels) < 3:
            raise CryptoError(f"{name!r}: a wildcard needs at least two labels after *.", "names")
        labels = labels[1:]
    if labels[-1].isdigit():
        raise CryptoError(
            f"{name!r} is neither a valid IP address nor a DNS name (numeric last label)",
            "names",
        )
    for label in labels:
        if not _LABEL.match(label):
            raise CryptoError(
                f"{name!r} is not a valid DNS name (label {label!r}: letters, digits and "
                "inner hyphens only, 1-63 characters), nor an IP address",
                "names",
            )
    return lowered


def check_name(name: object, purpose: str) -> str:
    """One SAN, normalised: IP addresses in canonical form, DNS names and emails lowercased."""
    if not isinstance(name, str) or not name:
        raise CryptoError(f"names contains an empty or non-text entry: {name!r}", "names")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if "@" in name:
        if purpose != "client":
            raise CryptoError(
                f"{name!r}: email addresses belong in client certificates (purpose: client)",
                "names",
            )
        local, _at, domain = name.rpartition("@")
        if not _LOCAL_PART.match(local) or ".." in local:
            raise CryptoError(f"{name!r} is not a valid email address", "names")
        return f"{local}@{_check_dns(domain, wildcard=False)}".lower()
    return _check_dns(name, wildcard=purpose == "server")


def check_names(names: object, purpose: str) -> tuple[str, ...]:
    """Validated, normalised names; the first one becomes the CN, so it must fit in 64."""
    if purpose not in PURPOSES:
        raise CryptoError(f"purpose must be server or client, not {purpose!r}", "purpose")
    if not isinstance(names, (list, tuple)) or not names:
        raise CryptoError(
            "names must list at least one host name or IP address (the first becomes the CN)",
            "names",
        )
    checked = tuple(check_name(n, purpose) for n in names)
    for i, name in enumerate(checked):
        if name in checked[:i]:
            raise CryptoError(f"names lists {name!r} twice", "names")
    if len(checked[0]) > 64:
        raise CryptoError(
            f"the first name {checked[0]!r} is longer than 64 characters and cannot be the CN; "
            "put a shorter name first",
            "names",
        )
    return checked


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if "@" in name:
        return x509.RFC822Name(name)
    return x509.DNSName(name)


# --- building certificates --------------------------------------------------------------------


def _sign_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def create_ca(
    common_name: str, key: PrivateKey, valid_days: int, now: dt.datetime | None = None
) -> x509.Certificate:
    """A self-signed CA certificate that may sign leaf certificates only (pathlen 0)."""
    if not common_name or len(common_name) > 64:
        raise CryptoError("common_name must have 1 to 64 characters", "common_name")
    if valid_days < 1:
        raise CryptoError("valid_days must be at least 1", "valid_days")
    now = now or utcnow()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _sign_hash(key))
    )


def issue(
    names: tuple[str, ...],
    purpose: str,
    key: PrivateKey,
    valid_days: int,
    *,
    ca_key: PrivateKey | None = None,
    ca_cert: x509.Certificate | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A leaf for ``names`` (already checked), signed by the CA or, without one, by itself.

    The self-signed form carries no KeyUsage: OpenSSL only treats a certificate as its own
    issuer (and so as a trust anchor in ``-CAfile``) when KeyUsage is absent or allows
    keyCertSign, and a leaf should not claim keyCertSign.
    """
    if (ca_key is None) != (ca_cert is None):
        raise CryptoError("a CA needs both its key and its certificate", "ca_path")
    if valid_days < 1:
        raise CryptoError("valid_days must be at least 1", "valid_days")
    now = now or utcnow()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    public = key.public_key()
    if ca_cert is not None and ca_key is not None:
        if not key_matches(ca_key, ca_cert):
            raise CryptoError("the CA key does not match the CA certificate", "ca_path")
        end = min(now + dt.timedelta(days=valid_days), not_after(ca_cert))
        issuer, signer = ca_cert.subject, ca_key
        try:
            ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    else:
        end = now + dt.timedelta(days=valid_days)
        issuer, signer = subject, key
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([_EKU[purpose]]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
    )
    if ca_cert is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(signer, _sign_hash(signer))


def assemble(key: PrivateKey, cert: x509.Certificate, chain: list[x509.Certificate]) -> bytes:
    """qmail's order: private key, then certificate, then the chain (issuer after issued)."""
    return key_to_pem(key) + cert_to_pem(cert) + b"".join(cert_to_pem(c) for c in chain)


# --- checking what exists -------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A parsed servercert.pem / clientcert.pem."""

    key: PrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def load_bundle(data: bytes) -> Bundle:
    """Parse a file in qmail's order; raise CryptoError if it is not one."""
    blocks = split_pem(data)
    if not blocks:
        raise CryptoError("holds no PEM data", "path")
    if not blocks[0][0].endswith("PRIVATE KEY"):
        raise CryptoError(
            f"does not start with the private key (found {blocks[0][0]} first); "
            "qmail needs the key, then the certificate, then the chain",
            "path",
        )
    if sum(1 for label, _body in blocks if label.endswith("PRIVATE KEY")) != 1:
        raise CryptoError("holds more than one private key", "path")
    key = load_private_key(blocks[0][1], "path")
    certs = load_certificates(data, "path")
    if not certs:
        raise CryptoError("holds a private key but no certificate", "path")
    if not key_matches(key, certs[0]):
        raise CryptoError("the private key does not match the certificate after it", "path")
    return Bundle(key, certs[0], tuple(certs[1:]))


def _check_times(cert: x509.Certificate, what: str, field: str, now: dt.datetime) -> None:
    if not_after(cert) <= now:
        raise CryptoError(
            f"{what} ({describe(cert)}) expired on {iso(not_after(cert))}; renew it", field
        )
    if not_before(cert) > now + CLOCK_SKEW:
        raise CryptoError(
            f"{what} ({describe(cert)}) is not valid before {iso(not_before(cert))}", field
        )


def check_provided(
    key: PrivateKey,
    certs: list[x509.Certificate],
    chain: list[x509.Certificate],
    purpose: str,
    now: dt.datetime | None = None,
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """Check the user's own key/certificate/chain; return (leaf, chain) ready to assemble.

    ``certs`` is what the certificate file holds: the leaf, optionally followed by its chain
    (certbot's fullchain.pem). ``chain`` is the separate chain file. Exact duplicates are
    dropped (fullchain.pem plus chain.pem). Each certificate must be signed by the next one;
    the last may be a root or may stop below it. Nothing may be expired or not yet valid.
    """
    now = now or utcnow()
    if not certs:
        raise CryptoError("contains no PEM certificate", "cert")
    leaf = certs[0]
    if not key_matches(key, leaf):
        raise CryptoError(
            f"the private key ({key_type_of(key)}) does not match the certificate "
            f"({describe(leaf)}, {key_type_of(leaf.public_key())} key)",
            "key",
        )
    _check_times(leaf, "the certificate", "cert", now)
    if purpose not in cert_purposes(leaf):
        raise CryptoError(
            f"the certificate ({describe(leaf)}) has no {purpose} authentication in its "
            f"extended key usage; get a certificate for TLS {purpose}s",
            "cert",
        )
    if is_ca(leaf):
        raise CryptoError(f"the certificate ({describe(leaf)}) is a CA certificate", "cert")
    full: list[x509.Certificate] = []
    seen = {leaf.fingerprint(hashes.SHA256())}
    sources = [(c, "cert") for c in certs[1:]] + [(c, "chain") for c in chain]
    for cert, _source in sources:
        digest = cert.fingerprint(hashes.SHA256())
        if digest not in seen:
            seen.add(digest)
            full.append(cert)
    field_of = {c.fingerprint(hashes.SHA256()): s for c, s in reversed(sources)}
    previous = leaf
    for number, cert in enumerate(full, 1):
        field = field_of[cert.fingerprint(hashes.SHA256())]
        if not signed_by(previous, cert):
            rest = full[number:]
            if any(signed_by(previous, other) for other in rest):
                raise CryptoError(
                    f"the chain is out of order: chain certificate {number} ({describe(cert)}) "
                    f"did not issue {describe(previous)}; list each issuer right after the "
                    "certificate it signs",
                    field,
                )
            raise CryptoError(
                f"chain certificate {number} ({describe(cert)}) did not issue "
                f"{describe(previous)} (issuer {previous.issuer.rfc4514_string()}); "
                "give the chain that belongs to this certificate",
                field,
            )
        if not is_ca(cert):
            raise CryptoError(
                f"chain certificate {number} ({describe(cert)}) is not a CA certificate", field
            )
        limit = path_length(cert)
        if limit is not None and number - 1 > limit:
            raise CryptoError(
                f"chain certificate {number} ({describe(cert)}) may only have {limit} CA(s) "
                f"below it (pathlen), but has {number - 1}",
                field,
            )
        _check_times(cert, f"chain certificate {number}", field, now)
        previous = cert
    return leaf, full


# --- the regeneration decision ----------------------------------------------------------------


@dataclass(frozen=True)
class CertSummary:
    """What matters about a certificate for the decision and for --diff (no key material)."""

    names: tuple[str, ...]
    key_type: str
    purposes: frozenset[str]
    issuer: str  # SELF_SIGNED, or issuer_label() of the CA that signed it
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    subject: str
    chain: tuple[str, ...] = ()  # fingerprints of the chain certificates

    def as_dict(self) -> dict[str, object]:
        return {
            "names": list(self.names),
            "key_type": self.key_type,
            "purposes": sorted(self.purposes),
            "issuer": self.issuer,
            "subject": self.subject,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "fingerprint": self.fingerprint,
            "chain": list(self.chain),
        }


@dataclass(frozen=True)
class Wanted:
    names: tuple[str, ...]
    key_type: str
    purpose: str
    issuer: str  # SELF_SIGNED or issuer_label(ca_cert)
    chain: tuple[str, ...] = ()


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def issuer_label(ca_cert: x509.Certificate) -> str:
    return f"{describe(ca_cert)} (key {key_id(ca_cert)})"


def summarize(
    cert: x509.Certificate,
    chain: tuple[x509.Certificate, ...] | list[x509.Certificate] = (),
    ca_cert: x509.Certificate | None = None,
) -> CertSummary:
    """Summary of ``cert``; its issuer is identified by signature, not just by name."""
    if is_self_signed(cert):
        issuer = SELF_SIGNED
    elif ca_cert is not None and signed_by(cert, ca_cert):
        issuer = issuer_label(ca_cert)
    elif chain and signed_by(cert, chain[0]):
        issuer = issuer_label(chain[0])
    else:
        issuer = f"{cert.issuer.rfc4514_string()} (not the CA at hand)"
    return CertSummary(
        names=cert_names(cert),
        key_type=key_type_of(cert.public_key()),
        purposes=cert_purposes(cert),
        issuer=issuer,
        not_before=not_before(cert),
        not_after=not_after(cert),
        fingerprint=fingerprint(cert),
        subject=describe(cert),
        chain=tuple(fingerprint(c) for c in chain),
    )


def _names_change(old: tuple[str, ...], new: tuple[str, ...]) -> str:
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    parts = []
    if added:
        parts.append("added " + ", ".join(added))
    if removed:
        parts.append("removed " + ", ".join(removed))
    if not parts:
        parts.append(f"order changed (first name, the CN, is now {new[0]})")
    return "names changed: " + "; ".join(parts)


def needs_regeneration(
    current: CertSummary | None,
    wanted: Wanted,
    *,
    now: dt.datetime,
    renew_before_days: int,
    force: bool = False,
    problem: str | None = None,
) -> tuple[bool, str]:
    """Whether to make a new certificate, and why (or why not), for the module's ``reason``.

    ``current`` is None when there is no usable file: ``problem`` then says why it is
    unusable (unreadable, wrong order, key mismatch), or is None when the file is missing.
    """
    if force:
        return True, "forced (force: true)"
    if current is None:
        if problem:
            return True, f"existing file unusable: {problem}"
        return True, "missing"
    if current.key_type != wanted.key_type:
        return True, f"key type changed: {current.key_type} -> {wanted.key_type}"
    if current.names != wanted.names:
        return True, _names_change(current.names, wanted.names)
    if wanted.purpose not in current.purposes:
        return True, f"purpose changed: the certificate is not for TLS {wanted.purpose}s"
    if current.issuer != wanted.issuer:
        return True, f"issuer changed: {current.issuer} -> {wanted.issuer}"
    if current.chain != wanted.chain:
        return True, "chain changed: the file's chain differs from the CA certificate"
    if current.not_after <= now:
        return True, f"expired on {iso(current.not_after)}"
    if current.not_before > now + CLOCK_SKEW:
        return True, f"not valid before {iso(current.not_before)}"
    left = current.not_after - now
    if left <= dt.timedelta(days=renew_before_days):
        return True, (
            f"expires within {renew_before_days} days (renew_before_days): "
            f"not_after {iso(current.not_after)}"
        )
    return False, (
        f"up to date: valid until {iso(current.not_after)}, "
        f"renewal due {renew_before_days} days before"
    )


def diff_text(summary: CertSummary | dict[str, object] | None) -> str:
    """A few lines for --diff: names, dates, fingerprint, key type; never key material."""
    if summary is None:
        return ""
    data = summary.as_dict() if isinstance(summary, CertSummary) else summary
    lines = []
    for field in ("subject", "names", "key_type", "issuer", "not_after", "fingerprint", "chain"):
        if field not in data:
            continue
        value = data[field]
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "(none)"
        lines.append(f"{field}: {value}")
    return "\n".join(lines) + "\n"


# --- the local CA -----------------------------------------------------------------------------


def common_name(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def summarize_ca(cert: x509.Certificate) -> CertSummary:
    """Like summarize(), with the CA's common name standing in for the names."""
    summary = summarize(cert)
    return CertSummary(
        names=(common_name(cert),),
        key_type=summary.key_type,
        purposes=frozenset(),
        issuer=summary.issuer if is_ca(cert) else "not a CA certificate",
        not_before=summary.not_before,
        not_after=summary.not_after,
        fingerprint=summary.fingerprint,
        subject=summary.subject,
    )


def ca_needs_regeneration(
    current: CertSummary | None,
    name: str,
    key_type: str,
    *,
    now: dt.datetime,
    renew_before_days: int,
    force: bool = False,
    problem: str | None = None,
) -> tuple[bool, str]:
    """Whether to make a new CA certificate (see needs_regeneration), and why."""
    if force:
        return True, "forced (force: true)"
    if current is None:
        return (True, f"existing CA unusable: {problem}") if problem else (True, "missing")
    if current.key_type != key_type:
        return True, f"key type changed: {current.key_type} -> {key_type}"
    if current.issuer != SELF_SIGNED:
        return True, f"ca.pem is not a self-signed CA certificate ({current.issuer})"
    if current.names != (name,):
        return True, f"common_name changed: {current.names[0]!r} -> {name!r}"
    if current.not_after <= now:
        return True, f"expired on {iso(current.not_after)}"
    if current.not_after - now <= dt.timedelta(days=renew_before_days):
        return True, (
            f"expires within {renew_before_days} days (renew_before_days): "
            f"not_after {iso(current.not_after)}"
        )
    return False, f"up to date: valid until {iso(current.not_after)}"
