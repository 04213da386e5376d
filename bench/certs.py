"""A throw-away CA and server certificate shared by every server under test.

All servers present the same ECDSA P-256 leaf, so the TLS cost per handshake is the
same for each of them and the comparison measures the servers, not the key type.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "mx.bench.test", "127.0.0.1")


@dataclass(frozen=True)
class CertFiles:
    """PEM files: the CA for clients, and the server's key and chain in the layouts needed."""

    ca: Path  # CA certificate, what the load generator verifies against
    key: Path  # server private key alone
    chain: Path  # server certificate then CA certificate
    combined: Path  # qmail-tls servercert.pem and Postfix chain file: key, cert, chain


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certs(directory: Path) -> CertFiles:
    """Generate a CA and a server certificate for SERVER_NAMES into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyqmail bench CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in SERVER_NAMES:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAMES[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files = CertFiles(
        ca=directory / "ca.pem",
        key=directory / "server.key",
        chain=directory / "server-chain.pem",
        combined=directory / "servercert.pem",
    )
    files.ca.write_bytes(_pem(ca_cert))
    files.ca.chmod(0o644)
    for path, data in (
        (files.key, key_pem),
        (files.chain, _pem(cert) + _pem(ca_cert)),
        (files.combined, key_pem + _pem(cert) + _pem(ca_cert)),
    ):
        path.write_bytes(data)
        path.chmod(0o600)  # every server reads its key before dropping privileges
    return files
