"""What remote delivery remembers about remote addresses for a while, in the memory of the
delivery child (its threads share one ``PeerMemory``; nothing is written to disk, so a
restart forgets, as qmail's tcpto does not but costs one wait per address to relearn).

Keyed by (address, port): a name can have many addresses, and one of them can be dead.

- Connection failures (qmail's ``tcpto``). An address whose TCP connection timed out, or
  that accepted and then sent no greeting within ``timeoutremote``, costs a whole wait at
  each try; it rests for a back-off period (60 s, doubling with each further failure, up to
  an hour), during which the next messages to it, from any worker, are deferred at once
  ("not tried: ...") instead of holding a worker for the same wait. Only a failure of a
  try that began after the previous rest ended doubles the rest: the other workers whose
  tries were already under way when the address went down fail too, in the same outage,
  and twenty of them must not make one outage an hour's rest (qmail's tcpto counts a
  failure only when the previous one is older than the rest it caused). When a rest ends
  one probe goes through, and the other workers keep skipping the address until that
  probe greets (the record is cleared) or fails (the next, doubled rest), or until as long
  as the rest was has passed without an answer (the next probe). An address that refused
  the connection costs nothing to try: it is only tried after the other addresses of the
  host list for a minute, and a refusal neither starts nor doubles a rest.
- A STARTTLS whose handshake failed (not a certificate: a stall, a reset, a protocol
  error). The next message to that address goes straight to what the TLS policy allows
  without it (plaintext when opportunistic), for ``TLS_FAILED_TTL``. A ``tlshosts`` pin
  and an AUTH route (``smtproutes-auth``) ignore this record: neither may use plaintext,
  so for them it would only defer mail without trying (``pyqmail.send.remoteopen``).
- A certificate that did not verify: the next message goes straight to TLS without
  verification, for ``UNVERIFIABLE_TTL`` (again not for an AUTH route, which needs a
  verified certificate).
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
    count: int  # rests so far (each failure after a rest ended doubles the next); 0: none
    rest_until: float = 0.0  # monotonic time the current rest ends (0.0: never rested)
    refused_until: float = 0.0  # refused recently: tried after the others until then
    probe_until: float = 0.0  # a probe is under way: the others skip it until then


def _rest(count: int) -> float:
    """Seconds an address rests after the ``count``-th rest-starting failure."""
    return min(BACKOFF_FIRST * float(2 ** min(count - 1, 16)), BACKOFF_MAX)


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
    def now(self) -> float:
        """The memory's clock: what a caller passes as ``started`` to ``connect_failed``."""
        return self._clock()

    def connect_failed(self, peer: Peer, timed_out: bool, started: float | None = None) -> None:
        """``peer`` could not be reached: its connection timed out or it sent no greeting
        (``timed_out``), or it refused. ``started``: when that try began (``now()``;
        default: now), so that a try under way before a rest ended does not double it."""
        now = self._clock()
        key = (peer.address, peer.port)
        with self._lock:
            if len(self._failures) >= MAX_ENTRIES:
                self._sweep(now)
            record = self._failures.setdefault(key, _Failures(0))
            record.probe_until = 0.0  # a probe that failed is over
            if not timed_out:
                record.refused_until = now + BACKOFF_FIRST
                return
            if record.count == 0:
                record.count = 1
            elif record.rest_until > now:
                return  # another try of the same outage: the rest stands as it is
            elif (now if started is None else started) >= record.rest_until:
                record.count += 1  # tried again after the rest (the probe): still down
            record.rest_until = now + _rest(record.count)

    def _sweep(self, now: float) -> None:
        """Forget the records that no longer change anything (the table is full)."""
        for key, f in list(self._failures.items()):
            if max(f.rest_until, f.refused_until, f.probe_until) <= now:
                del self._failures[key]

    def connected(self, peer: Peer) -> None:
        """``peer`` greeted: it is reachable again."""
        with self._lock:
            self._failures.pop((peer.address, peer.port), None)

    def resting(self, peer: Peer) -> float:
        """Seconds ``peer`` is still not tried for (0: try it); refusals never rest. While
        a probe is under way, the seconds until another may go."""
        now = self._clock()
        with self._lock:
            record = self._failures.get((peer.address, peer.port))
            if record is None:
                return 0.0
            return max(0.0, record.rest_until - now, record.probe_until - now)

    def order(self, peers: Sequence[P]) -> tuple[list[P], list[P]]:
        """``peers`` to try, in order, and those left out: an address resting after a
        timeout is left out, and so is one whose rest ended while another worker probes it
        (the first caller after a rest gets it, and becomes that probe); one that refused
        in the last minute goes after the others."""
        now = self._clock()
        fresh: list[P] = []
        later: list[P] = []
        skipped: list[P] = []
        with self._lock:
            for peer in peers:
                record = self._failures.get((peer.address, peer.port))
                if record is None:
                    fresh.append(peer)
                    continue
                if record.rest_until > now or record.probe_until > now:
                    skipped.append(peer)
                    continue
                if record.count:  # the rest is over: this caller probes it
                    record.probe_until = now + _rest(record.count)
                (later if record.refused_until > now else fresh).append(peer)
        return fresh + later, skipped
