"""The TLS session ticket keys one listener's processes share: a ratchet, in memory only.

Why a module of its own: pyqmail-smtpd's supervisor draws the secret and ratchets it, and
the supervisor must stay small (``pyqmail.smtpd.prefork``: it imports neither ``ssl`` nor
``ctypes``); installing the keys in OpenSSL is ``pyqmail.tickets``'s, in the workers.

- One random 32-byte secret is drawn at start (``TicketKeys()``); it lives only in memory,
  so a restart invalidates every ticket.
- Time is cut into periods of ``lifetime`` seconds; the secret of period n+1 is the
  SHA-256 of period n's (a one-way ratchet), so every process, forked at any time,
  derives the same keys for the same period with no communication, and the keys of a
  period cannot be computed back from a later one (every process ratchets, the
  supervisor included, and keeps only the current and the previous period's).
- Each period's secret gives three keys (HMAC-SHA256 with a label each): the key name
  written in tickets, the HMAC key and the AES-256 key of OpenSSL's ticket format.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable

LIFETIME = 3600  # seconds a ticket is good for, and the key rotation period (Postfix's cache)
NAME_LENGTH = 16  # key name length in the ticket (OpenSSL's TLSEXT_KEYNAME_LENGTH)
SECRET_LENGTH = 32


class _Keys:
    """One period's key: its name in tickets, the HMAC key and the AES-256 key."""

    def __init__(self, secret: bytes) -> None:
        def derive(label: bytes) -> bytes:
            return hmac.digest(secret, b"pyqmail ticket " + label, "sha256")

        self.name = derive(b"name")[:NAME_LENGTH]
        self.hmac_key = derive(b"hmac")
        self.aes_key = derive(b"aes")


class TicketKeys:
    """The ratchet of ticket keys one listener's processes share (see the module's
    docstring); ``clock`` is the wall clock (every process must agree on the period)."""

    def __init__(self, lifetime: int = LIFETIME, clock: Callable[[], float] = time.time) -> None:
        if lifetime < 1:
            raise ValueError(f"ticket lifetime {lifetime}: must be at least 1 second")
        self.lifetime = lifetime
        self.clock = clock
        self._period = self._now()
        self._secret = os.urandom(SECRET_LENGTH)
        self._current = _Keys(self._secret)
        self._previous: _Keys | None = None

    def _now(self) -> int:
        return int(self.clock() // self.lifetime)

    def advance(self) -> None:
        """Ratchet forward to the current period; keep one previous key, forget older
        (as far as Python forgets: the old bytes are freed, not wiped). The supervisor
        calls it too, so that no process keeps the start's secret for its whole life."""
        now = self._now()
        if now <= self._period:
            return
        previous = self._secret
        while self._period < now:
            previous = self._secret
            self._secret = hashlib.sha256(b"pyqmail ticket ratchet" + previous).digest()
            self._period += 1
        self._previous = _Keys(previous)  # period now-1's, however far we jumped
        self._current = _Keys(self._secret)

    def for_issue(self) -> _Keys:
        """The key new tickets are sealed with."""
        self.advance()
        return self._current

    def for_name(self, name: bytes) -> tuple[_Keys | None, bool]:
        """The key a ticket names (None if too old or unknown), and whether it is the
        current one (a ticket under the previous key is re-issued)."""
        self.advance()
        if hmac.compare_digest(name, self._current.name):
            return self._current, True
        if self._previous is not None and hmac.compare_digest(name, self._previous.name):
            return self._previous, False
        return None, False
