"""TLS session tickets for pyqmail-smtpd: keys every worker shares, rotated, never on disk.

Why: the servers that send to an MX reconnect all day, and a resumed handshake (TLS 1.3
PSK with a fresh (EC)DHE, or a TLS 1.2 ticket) skips the certificate signature and its
verification. Tickets are stateless: the server keeps no per-session cache (it is switched
off), so memory does not grow with the sessions.

The keys. OpenSSL gives each ``SSL_CTX`` random ticket keys at its creation and never
rotates them; workers forked after the context was made share them, but a worker that
builds its own context (every HUP) would not, and nothing would ever rotate. Python's
``ssl`` cannot set ticket keys, so this module installs OpenSSL's ticket key callback
(``SSL_CTX_set_tlsext_ticket_key_cb``) through ``ctypes``, on the ``SSL_CTX`` behind the
Python context:

- the supervisor draws one random 32-byte secret at start (``TicketKeys()``, in
  ``pyqmail.ticketkeys``, before the first fork; it lives only in memory, so a restart
  invalidates every ticket);
- time is cut into periods of ``lifetime`` seconds; the secret of period n+1 is the
  SHA-256 of period n's (a one-way ratchet), so every process, forked at any time, derives
  the same keys for the same period with no communication, and the keys of a period cannot
  be computed back from a later one (every process ratchets, the supervisor included, and
  keeps only the current and the previous period's: a worker ratchets, and drops the keys
  derived from older secrets, at each once-a-second tick too, handshakes or not);
- a ticket is issued under the current period's key and accepted under it or the previous
  one (then re-issued under the current one); anything older means a full handshake. The
  session timeout (the ticket's lifetime hint) is ``lifetime``, so every ticket stays
  decryptable for its whole life.

The ``ctypes`` parts, and why they are acceptable: the ``SSL_CTX *`` is read from the first
field after the object header of CPython's ``_ssl._SSLContext`` (``PySSLContext`` starts
with it in every CPython 3 release), and it is checked before use: OpenSSL must report the
context's options and verify mode exactly as Python does, otherwise ``TicketError`` is
raised and the caller serves without tickets (logged). The callback is OpenSSL's HMAC one
(deprecated in OpenSSL 3.0, still built in Debian's): its AES-256-CBC + HMAC-SHA256 ticket
encryption is the format OpenSSL itself uses. The alternative, a parent that re-creates the
context and hands it to the workers, cannot reach a running worker (an ``SSL_CTX`` does not
cross processes), and a context made before the fork never rotates. OpenSSL's static
keys (``SSL_CTRL_SET_TLSEXT_TICKET_KEYS``) hold one key only: a rotation would void every
ticket at once.

A ticket's session carries the client certificate verified at the full handshake; the
session id context is a digest of ``clientca.pem`` (``session_context``), so a changed
CA file makes tickets issued under the old one fall back to a full handshake. A TLS 1.3
ticket re-issued on resumption is a copy with its time reset (OpenSSL 3.0), so chained
resumptions have no total age; ``pyqmail.tls.describe`` therefore drops the identity of a
resumed session whose certificate is no longer valid.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import ssl
import sys
from typing import TYPE_CHECKING

from pyqmail.ticketkeys import LIFETIME, SECRET_LENGTH, TicketKeys

__all__ = [
    "LIFETIME",
    "NUM_TICKETS",
    "TicketError",
    "TicketKeys",
    "enable",
    "forget",
    "session_context",
]

NUM_TICKETS = 1  # TLS 1.3 tickets per full handshake: an MTA holds one connection per peer
NAME_LENGTH = 16  # key name length in the ticket (OpenSSL's TLSEXT_KEYNAME_LENGTH)

_CTRL_SESS_NUMBER = 20
_CTRL_SET_SESS_CACHE_MODE = 44
_CTRL_SET_TICKET_KEY_CB = 72
_SESS_CACHE_OFF = 0

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.POINTER(ctypes.c_ubyte),  # key_name[16]
    ctypes.POINTER(ctypes.c_ubyte),  # iv[EVP_MAX_IV_LENGTH]
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # HMAC_CTX *
    ctypes.c_int,  # enc
)


class TicketError(Exception):
    """The ticket machinery cannot be installed on this interpreter or OpenSSL."""


class _Keys:
    """One period's key, derived from its secret (``pyqmail.ticketkeys``): its name in
    tickets, the HMAC key and the AES-256 key of OpenSSL's ticket format."""

    def __init__(self, secret: bytes) -> None:
        def derive(label: bytes) -> bytes:
            return hmac.digest(secret, b"pyqmail ticket " + label, "sha256")

        self.name = derive(b"name")[:NAME_LENGTH]
        self.hmac_key = derive(b"hmac")
        self.aes_key = derive(b"aes")


_derived_keys: dict[bytes, _Keys] = {}  # by secret: the current and the previous period's


def _derived(secret: bytes) -> _Keys:
    """The keys of a secret, derived once per period (``forget`` drops older ones)."""
    found = _derived_keys.get(secret)
    if found is None:
        found = _derived_keys[secret] = _Keys(secret)
    return found


def forget(keys: TicketKeys) -> tuple[bytes, bytes | None]:
    """Ratchet ``keys`` to the current period and drop the derived keys of older ones;
    the secrets kept are returned. Why the worker's tick calls it (``pyqmail.smtpd.server``),
    not only the ticket callback: a worker that sees no handshake for days would keep the
    secret of the last period it used (in ``keys`` and, as the cache's key, here), and from
    it one ratchets forward to every later key, opening the TLS 1.2 tickets (master
    secrets) every other worker issued since. It is cheap: a division and a small dict."""
    current, previous = keys.secrets()
    for secret in [s for s in _derived_keys if s not in (current, previous)]:
        del _derived_keys[secret]
    return current, previous


def for_issue(keys: TicketKeys) -> _Keys:
    """The key new tickets are sealed with."""
    current, _ = forget(keys)
    return _derived(current)


def for_name(keys: TicketKeys, name: bytes) -> tuple[_Keys | None, bool]:
    """The key a ticket names (None if too old or unknown), and whether it is the current
    one (a ticket under the previous key is re-issued)."""
    current, previous = forget(keys)
    if hmac.compare_digest(name, _derived(current).name):
        return _derived(current), True
    if previous is not None and hmac.compare_digest(name, _derived(previous).name):
        return _derived(previous), False
    return None, False


class _LibSSL:
    """The OpenSSL functions this module calls, from the library Python's ``_ssl`` uses."""

    def __init__(self) -> None:
        import _ssl  # noqa: PLC0415 - only to find the very libssl Python links against

        try:
            lib = ctypes.CDLL(getattr(_ssl, "__file__", None))
            self.ctrl = _fn(lib.SSL_CTX_ctrl, ctypes.c_long, [_P, ctypes.c_int, ctypes.c_long, _P])
            self.callback_ctrl = _fn(
                lib.SSL_CTX_callback_ctrl, ctypes.c_long, [_P, ctypes.c_int, _CALLBACK]
            )
            self.get_options = _fn(lib.SSL_CTX_get_options, ctypes.c_uint64, [_P])
            self.get_verify_mode = _fn(lib.SSL_CTX_get_verify_mode, ctypes.c_int, [_P])
            self.set_timeout = _fn(lib.SSL_CTX_set_timeout, ctypes.c_long, [_P, ctypes.c_long])
            self.set_sid_ctx = _fn(
                lib.SSL_CTX_set_session_id_context, ctypes.c_int, [_P, _B, ctypes.c_uint]
            )
            self.rand_bytes = _fn(lib.RAND_bytes, ctypes.c_int, [_U, ctypes.c_int])
            self.aes_256_cbc = _fn(lib.EVP_aes_256_cbc, _P, [])
            self.sha256 = _fn(lib.EVP_sha256, _P, [])
            self.encrypt_init = _fn(lib.EVP_EncryptInit_ex, ctypes.c_int, [_P, _P, _P, _B, _U])
            self.decrypt_init = _fn(lib.EVP_DecryptInit_ex, ctypes.c_int, [_P, _P, _P, _B, _U])
            self.hmac_init = _fn(lib.HMAC_Init_ex, ctypes.c_int, [_P, _B, ctypes.c_int, _P, _P])
        except (OSError, AttributeError) as exc:
            raise TicketError(f"OpenSSL's ticket functions are not reachable: {exc}") from exc


_P = ctypes.c_void_p
_B = ctypes.c_char_p
_U = ctypes.POINTER(ctypes.c_ubyte)
if TYPE_CHECKING:
    _UBytes = ctypes._Pointer[ctypes.c_ubyte]  # the type of a _U value (typeshed only)
_VERIFY = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}  # SSL_VERIFY_* bits
_lib: _LibSSL | None = None


def _fn(
    f: ctypes._NamedFuncPointer, restype: object, argtypes: list[object]
) -> ctypes._NamedFuncPointer:
    """Declare a foreign function's types (ctypes would guess ``int`` everywhere)."""
    f.restype = restype  # type: ignore[assignment]
    f.argtypes = argtypes  # type: ignore[assignment]
    return f


def _libssl() -> _LibSSL:
    global _lib  # noqa: PLW0603 - loaded once per process
    if _lib is None:
        _lib = _LibSSL()
    return _lib


def _ctx_pointer(ctx: ssl.SSLContext, lib: _LibSSL) -> int:
    """The ``SSL_CTX *`` behind ``ctx``, checked: OpenSSL must see the options and verify
    mode Python reports, or the field is not what we think (then TicketError)."""
    if sys.implementation.name != "cpython":
        raise TicketError(f"session tickets need CPython, not {sys.implementation.name}")
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise TicketError("no SSL_CTX found in the Python SSLContext")
    if lib.get_options(ptr) != int(ctx.options) or lib.get_verify_mode(ptr) != _VERIFY.get(
        ctx.verify_mode
    ):
        raise TicketError("the Python SSLContext's layout is not the one expected")
    return int(ptr)


def _callback(keys: TicketKeys, lib: _LibSSL) -> object:
    """OpenSSL's ticket key callback over ``keys``. Returns: 1 key set, 2 key set and
    re-issue the ticket, 0 no ticket / full handshake (also when anything goes wrong:
    an exception must not cross into OpenSSL, and a missing ticket only costs speed)."""

    def sealed(name: _UBytes, iv: _UBytes, cctx: int, hctx: int) -> int:
        key = for_issue(keys)
        if lib.rand_bytes(iv, 16) != 1:
            return 0
        ctypes.memmove(name, key.name, NAME_LENGTH)
        if lib.encrypt_init(cctx, lib.aes_256_cbc(), None, key.aes_key, iv) != 1:
            return 0
        return int(lib.hmac_init(hctx, key.hmac_key, SECRET_LENGTH, lib.sha256(), None) == 1)

    def opened(name: _UBytes, iv: _UBytes, cctx: int, hctx: int) -> int:
        key, current = for_name(keys, ctypes.string_at(name, NAME_LENGTH))
        if key is None:
            return 0
        if lib.hmac_init(hctx, key.hmac_key, SECRET_LENGTH, lib.sha256(), None) != 1:
            return 0
        if lib.decrypt_init(cctx, lib.aes_256_cbc(), None, key.aes_key, iv) != 1:
            return 0
        return 1 if current else 2

    def callback(_ssl: int, name: _UBytes, iv: _UBytes, cctx: int, hctx: int, enc: int) -> int:
        try:
            return sealed(name, iv, cctx, hctx) if enc else opened(name, iv, cctx, hctx)
        except Exception:  # noqa: BLE001 - see the docstring
            return 0

    return _CALLBACK(callback)


def session_context(clientca: bytes | None) -> bytes:
    """The session id context: a session resumes only under the same client CAs."""
    return hashlib.sha256(b"pyqmail-smtpd clientca\0" + (clientca or b"")).digest()


def enable(ctx: ssl.SSLContext, keys: TicketKeys, sid_context: bytes) -> None:
    """Session tickets under ``keys`` on a server context, no server-side session cache;
    TicketError if this interpreter or OpenSSL cannot do it (tickets then stay off: they
    are enabled last, after every OpenSSL call succeeded)."""
    lib = _libssl()
    ptr = _ctx_pointer(ctx, lib)
    callback = _callback(keys, lib)
    if lib.callback_ctrl(ptr, _CTRL_SET_TICKET_KEY_CB, callback) != 1:
        raise TicketError("OpenSSL refused the session ticket key callback")
    vars(ctx)["_pyqmail_ticket_callback"] = callback  # lives as long as the context
    lib.ctrl(ptr, _CTRL_SET_SESS_CACHE_MODE, _SESS_CACHE_OFF, None)
    lib.set_timeout(ptr, keys.lifetime)
    if lib.set_sid_ctx(ptr, sid_context[:32], min(len(sid_context), 32)) != 1:
        raise TicketError("OpenSSL refused the session id context")
    ctx.num_tickets = NUM_TICKETS
    ctx.options &= ~ssl.OP_NO_TICKET


def cached_sessions(ctx: ssl.SSLContext) -> int:
    """Sessions in the context's server-side cache (stays 0 with tickets: memory check)."""
    return int(ctx.session_stats()["number"])
