"""TLS contexts for both sides of SMTP, per Mozilla's "intermediate" profile.

- TLS 1.2 and 1.3 only (RFC 8996: no SSLv3, TLS 1.0, 1.1).
- TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only. Python's
  default list still has CBC suites, so the list is explicit. TLS 1.3 suites are all AEAD.
- No compression (CRIME), no renegotiation, no session tickets: pyqmail-smtpd turns tickets
  on with keys its workers share and rotate (``pyqmail.tickets``), which OpenSSL's own
  per-context keys cannot be.
- Cipher order: Mozilla's intermediate profile leaves it to the client (every suite is
  strong), but testssl.sh — the project's acceptance check — rates a server without its own
  order HIGH. So the server order (the list below) is enforced, with OpenSSL's
  PRIORITIZE_CHACHA so that clients that put ChaCha20 first (no AES hardware) still get it:
  the outcome Mozilla wants, and a clean testssl report.
- Key-exchange groups: Python 3.11's ``ssl`` cannot set a group list; OpenSSL 3's default
  (X25519, P-256, X448, P-521, P-384) is a superset of Mozilla's and is used as is. When
  the interpreter offers ``set_groups`` it is used.
- RSA keys under 2048 bits are refused by OpenSSL's security level 2 (Debian's default),
  which ``server_context`` turns into a clear error.

Client certificates (qmail-tls's relay by certificate): when ``clientca.pem`` exists the
server asks for a certificate *during* the handshake (TLS 1.3 has no renegotiation). The
only trust anchors loaded are those of ``clientca.pem``, so a certificate Python reports
as verified chains to it. A certificate that does not verify fails the handshake — the
price of the standard library having no verify callback; servers that do not use relay by
certificate should simply not have ``clientca.pem``.
"""

from __future__ import annotations

import datetime
import re
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
GROUPS = ("X25519", "prime256v1", "secp384r1")
OP_PRIORITIZE_CHACHA = 1 << 21  # SSL_OP_PRIORITIZE_CHACHA (OpenSSL 1.1.1+); not in ``ssl``

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CLIENTCA = "_pyqmail_clientca"  # the context's attribute: clientca.pem's bytes
_PEM_BEGIN = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----\s*$")


class TLSConfigError(Exception):
    """A certificate or key file cannot be used; the message names the file."""


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | OP_PRIORITIZE_CHACHA
    set_groups = getattr(ctx, "set_groups", None)
    if set_groups is not None:  # Python 3.15+
        set_groups(":".join(GROUPS))


def _read(path: Path) -> bytes:
    """The file's bytes; TLSConfigError if unreadable."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{path}: cannot read: {exc.strerror}") from exc


def _pem_blocks(data: bytes) -> list[tuple[int, str]]:
    """(line number, block type) of each PEM block of a file's bytes."""
    blocks = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        m = _PEM_BEGIN.match(line)
        if m:
            blocks.append((lineno, m.group(1).decode()))
        elif line.startswith(b"Proc-Type:") and b"ENCRYPTED" in line:
            blocks.append((lineno, "ENCRYPTED PRIVATE KEY"))
    return blocks


def _check_servercert_layout(path: Path) -> None:
    """qmail-tls's servercert.pem: private key, then certificate, then chain."""
    blocks = _pem_blocks(_read(path))
    keys = [(n, kind) for n, kind in blocks if kind.endswith("PRIVATE KEY")]
    certs = [n for n, kind in blocks if kind == "CERTIFICATE"]
    if not keys:
        raise TLSConfigError(
            f"{path}: no private key (expected: private key, then certificate, then chain)"
        )
    for lineno, kind in keys:
        if kind.startswith("ENCRYPTED"):
            raise TLSConfigError(f"{path}:{lineno}: the private key is encrypted; it must not be")
    if len(keys) > 1:
        raise TLSConfigError(f"{path}:{keys[1][0]}: more than one private key")
    if not certs:
        raise TLSConfigError(f"{path}: no certificate after the private key")
    if certs[0] < keys[0][0]:
        raise TLSConfigError(
            f"{path}:{certs[0]}: certificate before the private key "
            "(qmail order: private key, then certificate, then chain)"
        )


def _explain(exc: ssl.SSLError) -> str:
    reason = (exc.reason or "").upper()
    if "KEY_VALUES_MISMATCH" in reason:
        return "the private key does not match the certificate"
    if "KEY_TOO_SMALL" in reason:
        return "key too small (RSA keys need at least 2048 bits)"
    if "CA_MD_TOO_WEAK" in reason or "MD_TOO_WEAK" in reason:
        return "certificate signed with a weak digest"
    return f"{exc.reason or exc}"


def server_context(certfile: Path, clientca: Path | None = None) -> ssl.SSLContext:
    """Server context from qmail's servercert.pem (+ clientca.pem to ask for client certs)."""
    _check_servercert_layout(certfile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    try:
        ctx.load_cert_chain(certfile=certfile, keyfile=certfile, password=b"")
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{certfile}: {_explain(exc)}") from exc
    except OSError as exc:
        raise TLSConfigError(f"{certfile}: cannot read: {exc.strerror}") from exc
    if clientca is not None:
        _trust_clientca(ctx, clientca)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _trust_clientca(ctx: ssl.SSLContext, clientca: Path) -> None:
    """Ask for client certificates and trust clientca.pem's CAs alone. The file is read
    once, here: the CAs loaded and the bytes ``loaded_clientca`` gives the session id
    context (``pyqmail.tickets.session_context``) are the same, even if the file is
    replaced meanwhile; read twice, a worker could trust the old CAs while its tickets
    resume on workers that loaded the new ones (a HUP meant to drop a CA would not void
    them). ``cadata`` takes ASCII only: bytes outside it (in comments) are left out."""
    data = _read(clientca)
    if not any(kind == "CERTIFICATE" for _, kind in _pem_blocks(data)):
        raise TLSConfigError(f"{clientca}: no CA certificate in it")
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii", "ignore"))
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{clientca}: {_explain(exc)}") from exc
    ctx.verify_mode = ssl.CERT_OPTIONAL
    vars(ctx)[_CLIENTCA] = data


def loaded_clientca(ctx: ssl.SSLContext) -> bytes | None:
    """The bytes of clientca.pem whose CAs ``ctx`` trusts (None: no client certificates)."""
    data = vars(ctx).get(_CLIENTCA)
    return data if isinstance(data, bytes) else None


def client_context(
    *,
    verify: bool = True,
    cafile: str | Path | None = None,
    capath: str | Path | None = None,
    certfile: str | Path | None = None,
    keyfile: str | Path | None = None,
    check_hostname: bool | None = None,
) -> ssl.SSLContext:
    """Client context with the same protocol floor and suites.

    ``verify=False`` is opportunistic STARTTLS (encrypt, trust nothing); with ``verify``
    the system store is used unless ``cafile``/``capath`` name the trust anchors.
    ``certfile`` may hold key and certificate together (qmail's clientcert.pem).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    if verify:
        if cafile is None and capath is None:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            try:
                ctx.load_verify_locations(cafile=cafile, capath=capath)
            except (ssl.SSLError, OSError) as exc:
                raise TLSConfigError(f"{cafile or capath}: cannot load CA: {exc}") from exc
        ctx.check_hostname = True if check_hostname is None else check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if certfile is not None:
        try:
            ctx.load_cert_chain(certfile=certfile, keyfile=keyfile or certfile, password=b"")
        except ssl.SSLError as exc:
            raise TLSConfigError(f"{certfile}: {_explain(exc)}") from exc
        except OSError as exc:
            raise TLSConfigError(f"{certfile}: cannot read: {exc.strerror}") from exc
    return ctx


@dataclass(frozen=True)
class Session:
    """What the logs, the Received header and the relay decision need to know."""

    version: str
    cipher: str
    bits: int
    peer_identities: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.version}:{self.cipher}:{self.bits}"


def cert_identities(peercert: dict[str, Any] | None) -> tuple[str, ...]:
    """Lower-cased e-mail addresses, CNs and SANs of a verified peer certificate."""
    if not peercert:
        return ()
    found: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key in ("emailAddress", "commonName"):
                found.append(str(value).lower())
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("email", "DNS", "URI"):
            found.append(str(value).lower())
    return tuple(dict.fromkeys(found))


def _cert_time(value: str) -> float:
    """Seconds since the epoch of a date as ``getpeercert`` gives it (OpenSSL's
    ``ASN1_TIME_print``: ``Jan  5 09:34:43 2026 GMT``); ValueError if it is not one.
    Not ``ssl.cert_time_to_seconds``: it imports ``calendar`` and ``_strptime`` at its
    first call, in a worker that has dropped to a user who may not read them."""
    month, day, clock, year, zone = value.split()
    hours, minutes, seconds = clock.split(":")
    if zone != "GMT" or month not in _MONTHS:
        raise ValueError(f"not a certificate date: {value!r}")
    start = datetime.datetime(
        int(year),
        _MONTHS.index(month) + 1,
        int(day),
        int(hours),
        int(minutes),
        0,
        tzinfo=datetime.UTC,
    )
    return start.timestamp() + float(seconds)


def valid_now(peercert: dict[str, Any], now: float) -> bool:
    """Whether ``now`` lies within the certificate's notBefore and notAfter (a certificate
    without them, or with dates that cannot be read, is not)."""
    try:
        not_before = _cert_time(str(peercert["notBefore"]))
        not_after = _cert_time(str(peercert["notAfter"]))
    except (KeyError, ValueError):
        return False
    return not_before <= now <= not_after


def describe(sslobj: ssl.SSLObject | ssl.SSLSocket) -> Session:
    """The session as the logs and the relay decision see it.

    A resumed session carries the client certificate of the full handshake, verified then
    and never again: OpenSSL 3.0 re-issues a TLS 1.3 ticket on resumption (every rotation:
    ``pyqmail.tickets``) as a copy of the session, certificate included, with its time
    reset to now, so a client that reconnects often enough keeps its certificate's identity
    for ever, past the certificate's notAfter. The original time is lost in the copy, so
    the session's total age cannot be bounded here; the certificate's own dates can be
    checked: on a resumed session whose certificate is not valid now, the client has no
    identity (no relay by certificate; a full handshake would have failed)."""
    name, version, bits = sslobj.cipher() or ("unknown", "unknown", 0)
    peercert = sslobj.getpeercert()
    if peercert and sslobj.session_reused and not valid_now(peercert, time.time()):
        peercert = None
    return Session(
        version=sslobj.version() or version,
        cipher=name,
        bits=int(bits),
        peer_identities=cert_identities(peercert),
    )


def client_cert_relay(session: Session | None, tlsclients: Iterable[str]) -> str | None:
    """The identity that lets this client relay, or None.

    ``peer_identities`` is only filled from a certificate that verified against
    clientca.pem (the server context trusts nothing else); it must also be in tlsclients.
    """
    if session is None:
        return None
    allowed = set(tlsclients)
    for ident in session.peer_identities:
        if ident in allowed:
            return ident
    return None
