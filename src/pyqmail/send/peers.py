"""What remote delivery remembers about remote addresses for a while, in the memory of the
delivery child (its threads share one ``PeerMemory``; nothing is written to disk, so a
restart forgets, as qmail's tcpto does not but costs one wait per address to relearn).

Keyed by (address, port): a name can have many addresses, and one of them can be dead.

- Connection failures (qmail's ``tcpto``). An address whose TCP connection timed out, or
  that accepted and then sent no greeting within ``timeoutremote``, costs a whole wait at
  each try; it is not tried again for a back-off period (60 s, doubling with each further
  failure in a row up to an hour), so the next messages to it, from any worker, are
  deferred at once ("not tried: ...") instead of holding a worker for the same wait. An
  address that refused the connection costs nothing to try: it is only tried after the
  other addresses of the host list. A greeting clears the record.
- A STARTTLS whose handshake failed (not a certificate: a stall, a reset, a protocol
  error). The next message to that address goes straight to what the TLS policy allows
  without it (plaintext when opportunistic; a ``tlshosts`` pin never gets plaintext and
  ignores this record), for ``TLS_FAILED_TTL``.
- A certificate that did not verify: the next message goes straight to TLS without
  verification, for ``UNVERIFIABLE_TTL``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

UNVERIFIABLE_TTL = 3600.0
TLS_FAILED_TTL = 3600.0
BACKOFF_FIRST = 60.0  # seconds a failed address rests after its first failure
BACKOFF_MAX = 3600.0  # and at most, after many in a row (qmail's tcpto: about an hour)
MAX_ENTRIES = 4096  # records per kind before expired ones are swept out


class Peer(Protocol):
    """What is remembered about: an address and a port (``pyqmail.send.mx.Destination``)."""

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...


P = TypeVar("P", bound=Peer)


@dataclass
class _Failures:
    count: int  # failures in a row
    until: float  # monotonic time the back-off ends
    timed_out: bool  # the last one cost a whole wait (not a refusal)


class PeerMemory:
    """Thread-safe memory of the addresses remote delivery has had trouble with."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._unverifiable: dict[tuple[str, int], float] = {}
        self._tls_failed: dict[tuple[str, int], float] = {}
        self._failures: dict[tuple[str, int], _Failures] = {}

    # -- TLS ----------------------------------------------------------------------------
    def mark_unverifiable(self, peer: Peer) -> None:
        self._mark(self._unverifiable, peer, UNVERIFIABLE_TTL)

    def unverifiable(self, peer: Peer) -> bool:
        return self._known(self._unverifiable, peer)

    def mark_tls_failed(self, peer: Peer) -> None:
        self._mark(self._tls_failed, peer, TLS_FAILED_TTL)

    def tls_failed(self, peer: Peer) -> bool:
        return self._known(self._tls_failed, peer)

    def _mark(self, table: dict[tuple[str, int], float], peer: Peer, ttl: float) -> None:
        now = self._clock()
        with self._lock:
            if len(table) >= MAX_ENTRIES:
                for key in [k for k, until in table.items() if until <= now]:
                    del table[key]
            table[(peer.address, peer.port)] = now + ttl

    def _known(self, table: dict[tuple[str, int], float], peer: Peer) -> bool:
        with self._lock:
            return table.get((peer.address, peer.port), 0.0) > self._clock()

    # -- connections (tcpto) ------------------------------------------------------------
    def connect_failed(self, peer: Peer, timed_out: bool) -> None:
        """``peer`` could not be reached: its connection timed out or it sent no greeting
        (``timed_out``), or it refused."""
        now = self._clock()
        key = (peer.address, peer.port)
        with self._lock:
            if len(self._failures) >= MAX_ENTRIES:
                for old in [k for k, f in self._failures.items() if f.until <= now]:
                    del self._failures[old]
            count = self._failures[key].count + 1 if key in self._failures else 1
            rest = min(BACKOFF_FIRST * 2 ** min(count - 1, 16), BACKOFF_MAX)
            self._failures[key] = _Failures(count, now + rest, timed_out)

    def connected(self, peer: Peer) -> None:
        """``peer`` greeted: it is reachable again."""
        with self._lock:
            self._failures.pop((peer.address, peer.port), None)

    def resting(self, peer: Peer) -> float:
        """Seconds ``peer`` is still not tried for (0: try it); refusals never rest."""
        with self._lock:
            record = self._failures.get((peer.address, peer.port))
            if record is None or not record.timed_out:
                return 0.0
            return max(0.0, record.until - self._clock())

    def order(self, peers: Sequence[P]) -> tuple[list[P], list[P]]:
        """``peers`` to try, in order, and those left out: an address resting after a
        timeout is left out; one that refused in its back-off goes after the others."""
        now = self._clock()
        fresh: list[P] = []
        later: list[P] = []
        skipped: list[P] = []
        with self._lock:
            for peer in peers:
                record = self._failures.get((peer.address, peer.port))
                if record is None or record.until <= now:
                    fresh.append(peer)
                elif record.timed_out:
                    skipped.append(peer)
                else:
                    later.append(peer)
        return fresh + later, skipped
