# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The keys pyqmail_certificate works with beyond the certificate itself: the local CA it signs
with, and the certificate's own key, which a DANE TLSA record (``3 1 1``) pins.

Why its own module: library/pyqmail_certificate.py decides and writes; reading the CA and
telling when the pinned key changes are parts it can hand out whole (and the module stays
under the project's 600 lines).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os

from ansible_collections.pyqmail.mail.plugins.module_utils import pyqmail_crypto as crypto  # type: ignore[import-untyped,import-not-found,unused-ignore]
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import read_if_exists  # type: ignore[import-untyped,import-not-found,unused-ignore]


class CaError(Exception):
    """The CA in ca_path cannot sign (the message names ca_path and what to do)."""


def load_ca(
    ca_path: str, renew_before_days: int, now: dt.datetime, check_mode: bool
) -> tuple[crypto.PrivateKey, crypto.x509.Certificate] | None:
    """The CA key and certificate in ``ca_path``, or None in check mode when the CA is still
    to come. Refuses a CA that expires within ``renew_before_days``: what it signs would be
    renewed on every run."""
    key_file = os.path.join(ca_path, "ca.key")
    cert_file = os.path.join(ca_path, "ca.pem")
    try:
        key_data, cert_data = read_if_exists(key_file), read_if_exists(cert_file)
    except OSError as exc:
        raise CaError(f"ca_path: cannot read the CA in {ca_path}: {exc}") from exc
    if key_data is None or cert_data is None:
        if check_mode:
            return None
        raise CaError(
            f"ca_path: {ca_path} holds no CA (ca.key and ca.pem); create it with "
            "pyqmail_ca first, or omit ca_path for a self-signed certificate"
        )
    try:
        key = crypto.load_private_key(key_data, "ca_path")
        certs = crypto.load_certificates(cert_data, "ca_path")
    except crypto.CryptoError as exc:
        raise CaError(f"ca_path: the CA in {ca_path} is unusable: {exc}") from exc
    if len(certs) != 1:
        raise CaError(f"ca_path: {cert_file} must hold exactly one certificate")
    ca_cert = certs[0]
    if not crypto.key_matches(key, ca_cert) or not crypto.is_ca(ca_cert):
        raise CaError(
            f"ca_path: {cert_file} is not a CA certificate for {key_file}; "
            "recreate the CA with pyqmail_ca"
        )
    if crypto.not_after(ca_cert) - now <= dt.timedelta(days=renew_before_days):
        raise CaError(
            f"ca_path: the CA expires on {crypto.iso(crypto.not_after(ca_cert))}, within "
            "renew_before_days, so certificates it signs would be renewed on every run; "
            "renew the CA first (pyqmail_ca with force: true)"
        )
    return key, ca_cert


def spki_sha256(key: object) -> str:
    """The SHA-256 of a key's SubjectPublicKeyInfo: the data of a TLSA 3 1 1 record."""
    public = key.public_key() if hasattr(key, "public_key") else key
    der = public.public_bytes(  # type: ignore[attr-defined]
        crypto.serialization.Encoding.DER, crypto.serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def read_existing(
    existing: bytes | None, ca_cert: crypto.x509.Certificate | None
) -> tuple[crypto.Bundle | None, crypto.CertSummary | None, str | None]:
    """What the certificate file there holds: its bundle (and so the key a TLSA record pins)
    and summary, or why it is unusable; all None when there is no file."""
    if existing is None:
        return None, None, None
    try:
        bundle = crypto.load_bundle(existing)
        return bundle, crypto.summarize(bundle.cert, bundle.chain, ca_cert), None
    except crypto.CryptoError as exc:
        return None, None, str(exc)


def tlsa_warning(path: str, old_key: object | None, new_key: object, why: str) -> list[str]:
    """The warning for a certificate file whose key changes ([] when it stays): a TLSA 3 1 1
    record pins the key, so until DNS has the new record, senders that use DANE defer mail to
    this host (RFC 7672). ``old_key`` None: the old file was unusable (its key unknown, the
    record changes all the same). ``why`` "" says the key type changed, or the file was
    unusable."""
    new = spki_sha256(new_key)
    old = spki_sha256(old_key) if old_key is not None else "(the unusable file's key)"
    if old == new:
        return []
    if not why:
        changed = f"key_type {crypto.key_type_of(old_key)} -> {crypto.key_type_of(new_key)}"
        why = changed if old_key is not None else "the file was unusable"
    return [
        f"{path}: the private key changed ({why}), so its TLSA record changes: "
        f"_25._tcp.<name> TLSA 3 1 1 {old} -> 3 1 1 {new}. Publish the new record "
        "(artifacts/<host>/dns.zone after this run; keep the old one until caches expire): "
        "until DNS has it, senders that use DANE defer mail to this host"
    ]
