"""The secret behind the TLS session ticket keys one listener's processes share: a ratchet,
in memory only.

Why a module of its own: pyqmail-smtpd's supervisor draws the secret and ratchets it, and
the supervisor must stay small (``pyqmail.smtpd.prefork``): this module imports neither
``ssl`` nor ``hashlib``/``hmac``, whose OpenSSL cost the supervisor 1.7 MiB of PSS (the
pages of libcrypto it touched at load, which no worker shares). The ratchet's SHA-256 is
CPython's own (``_sha256``, ``_sha2`` from 3.12; ``hashlib``'s only where neither exists):
the same function, the same bytes. Deriving the keys from a secret, and installing them in
OpenSSL, is ``pyqmail.tickets``'s, in the workers.

- One random 32-byte secret is drawn at start (``TicketKeys()``); it lives only in memory,
  so a restart invalidates every ticket.
- Time is cut into periods of ``lifetime`` seconds; the secret of period n+1 is the
  SHA-256 of period n's (a one-way ratchet), so every process, forked at any time,
  derives the same keys for the same period with no communication, and the keys of a
  period cannot be computed back from a later one (every process ratchets, the
  supervisor included, and keeps only the current and the previous period's).
- The time is CLOCK_BOOTTIME's, not the wall clock's: the ratchet only goes forward, so
  a wall clock stepped back (NTP, by hours) would keep one key in use until it caught up
  again. CLOCK_BOOTTIME never steps back, counts a suspend (CLOCK_MONOTONIC does not), and
  is the same clock for every process of the machine, so the supervisor and the workers
  it forks still agree on the period; nothing else has to (a restart draws a new secret).
"""

from __future__ import annotations

import importlib
import os
import time

TYPE_CHECKING = False  # typing costs the supervisor 1.6 MiB (prefork)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class _Hash(Protocol):
        def digest(self) -> bytes: ...


LIFETIME = 3600  # seconds a ticket is good for, and the key rotation period (Postfix's cache)
SECRET_LENGTH = 32


def _sha256_function() -> Callable[[bytes], _Hash]:
    """SHA-256 without OpenSSL where CPython has its own (see the module's docstring)."""
    for name in ("_sha256", "_sha2"):
        try:
            function: Callable[[bytes], _Hash] = importlib.import_module(name).sha256
        except ImportError:
            continue
        return function
    fallback: Callable[[bytes], _Hash] = importlib.import_module("hashlib").sha256
    return fallback


_sha256 = _sha256_function()


def steady() -> float:
    """The ratchet's clock: CLOCK_BOOTTIME (see the module's docstring)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class TicketKeys:
    """The ratchet of the ticket secret one listener's processes share (see the module's
    docstring); ``clock``: seconds that never step back, on which every process of the
    listener agrees (the tests pass their own)."""

    def __init__(self, lifetime: int = LIFETIME, clock: Callable[[], float] = steady) -> None:
        if lifetime < 1:
            raise ValueError(f"ticket lifetime {lifetime}: must be at least 1 second")
        self.lifetime = lifetime
        self.clock = clock
        self._period = self._now()
        self._secret = os.urandom(SECRET_LENGTH)
        self._previous: bytes | None = None

    def _now(self) -> int:
        return int(self.clock() // self.lifetime)

    def advance(self) -> None:
        """Ratchet forward to the current period; keep one previous secret, forget older
        (as far as Python forgets: the old bytes are freed, not wiped). The supervisor
        calls it too, so that no process keeps the start's secret for its whole life."""
        now = self._now()
        if now <= self._period:
            return
        previous = self._secret
        while self._period < now:
            previous = self._secret
            self._secret = _sha256(b"pyqmail ticket ratchet" + previous).digest()
            self._period += 1
        self._previous = previous  # period now-1's, however far we jumped

    def secrets(self) -> tuple[bytes, bytes | None]:
        """The current period's secret and the previous one's (None right after start)."""
        self.advance()
        return self._secret, self._previous
