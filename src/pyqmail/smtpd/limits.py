"""Connections per listener and per client, counted exactly across pre-forked workers.

``maxconnip`` limits the connections of one client: one IPv4 address, or one IPv6 /64
(``limit_key``; one host's usual share, since a host picks any address in its /64). An
earlier version counted hash buckets (``crc32(key) % 4096``), so two clients in one bucket
shared a limit: 127.0.0.77 was refused while 127.0.11.243 held 50 connections, and an
attacker with an IPv6 /48 could pick /64s in the bucket of any peer and lock it out. This
table counts the exact 16-byte key.

Layout: one shared mapping of a memfd that pyqmail-smtpd's supervisor creates and keeps
(the first spawner sizes and maps it, every later one maps it again with ``attach``; the
workers inherit the mapping by ``fork``), a header
with each worker's total, then an open-addressing table (linear probing, backward-shift
deletion: no tombstones to fill it up) of ``(key, worker slot, count)`` entries. One entry
per key *and worker*, so a worker that dies is forgotten exactly (``reset``: the spawner
of its replacement drops that slot's entries first thing, before it reads any file). Every operation
takes an ``fcntl`` lock on a memfd: the kernel releases it when its holder dies, so a
worker killed while holding it cannot wedge the others, and check-then-add is atomic (no
overshoot by one when two workers accept the same client at once).

Bounded: the capacity is fixed at start, at least twice ``maxconn`` plus one entry per
worker, and the table counts as full at three quarters (short probe runs). Live entries
never exceed the connections held, and those are capped by ``maxconn``, so an attacker
cannot fill the table without first hitting ``maxconn`` (a HUP that raises ``maxconn``
past the capacity is the only way). If the table is ever full,
a new key is admitted uncounted and ``admit`` says so (the caller logs it): fail open for
that client, never refuse a stranger because of someone else's entries. The probe order
comes from ``hash()`` of the key (SipHash with the supervisor's random seed, which every
worker inherits), so a client cannot choose addresses that pile up in one probe run.
"""

from __future__ import annotations

import fcntl
import ipaddress
import mmap
import os
import socket
import struct
from dataclasses import dataclass

_ENTRY = struct.Struct("=16sii")  # key, slot + 1 (0: empty), count
_TOTAL = struct.Struct("=i")
_MIN_CAPACITY = 1024
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4 addresses mapped into IPv6


def limit_key(ip: str) -> str:
    """What maxconnip counts: the address, or its /64 for IPv6 (one host's usual share)."""
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip.partition("%")[0])
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{addr}/64", strict=False))


def key_bytes(ip: str) -> bytes:
    """The 16 bytes ``ConnTable`` stores for a client: the IPv4 address mapped into IPv6
    (``::ffff:a.b.c.d``), or the IPv6 /64 with its host half zero. Anything else (a
    Unix socket's peer, "?") gets one key of its own, all zero."""
    key = limit_key(ip)
    try:  # once per connection: inet_pton takes 0.2 µs, ipaddress's two parses took 7
        if "/" in key:
            return socket.inet_pton(socket.AF_INET6, key.partition("/")[0])
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, key)
    except (OSError, ValueError):  # not an address; ValueError: a NUL in it
        return bytes(16)


@dataclass(frozen=True)
class Admission:
    """What ``admit`` decided: ``refused`` names the limit hit (``maxconn=N`` or
    ``maxconnip=N``), else None; ``counted`` is False when the table was full and the
    client got in without a per-client count (release it with the same flag)."""

    refused: str | None
    counted: bool
    held: int  # connections this client held before this one (when counted)


class ConnTable:
    """Exact connection counts shared by the workers of one listener (see module doc)."""

    def __init__(self, slots: int, maxconn: int, fd: int | None = None) -> None:
        """A new table for ``maxconn``, in the memfd ``fd`` (the supervisor's: later
        spawners map it with ``attach`` and the capacity this one reported) or in a memfd
        of its own."""
        capacity = _MIN_CAPACITY
        while capacity < 2 * (maxconn + slots):
            capacity *= 2
        if fd is None:
            fd = os.memfd_create("pyqmail-conns", os.MFD_CLOEXEC)
        os.ftruncate(fd, self._size(slots, capacity))
        self._map(fd, slots, capacity)

    @classmethod
    def attach(cls, fd: int, slots: int, capacity: int) -> ConnTable:
        """The table another process made in ``fd`` with this capacity."""
        table = cls.__new__(cls)
        table._map(fd, slots, capacity)
        return table

    @staticmethod
    def _size(slots: int, capacity: int) -> int:
        return _TOTAL.size * (slots + 1) + _ENTRY.size * capacity

    def _map(self, fd: int, slots: int, capacity: int) -> None:
        if capacity < _MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"connection table capacity {capacity}: not a power of two")
        self.slots = slots
        self.capacity = capacity
        self._base = _TOTAL.size * (slots + 1)  # each worker's total, then the entries in use
        self._totals = struct.Struct(f"={slots}i")  # every worker's total in one read
        self._fd = fd
        self._mm = mmap.mmap(fd, self._size(slots, capacity))  # MAP_SHARED: forks see it
        self.slot = 0  # this process's row; set in each worker after the fork

    # locking ------------------------------------------------------------------------------

    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    # the table ------------------------------------------------------------------------------

    def _home(self, key: bytes) -> int:
        return hash(key) & (self.capacity - 1)

    def _entry(self, i: int) -> tuple[bytes, int, int]:
        key, slot1, count = _ENTRY.unpack_from(self._mm, self._base + i * _ENTRY.size)
        return key, slot1, count

    def _put(self, i: int, key: bytes, slot1: int, count: int) -> None:
        _ENTRY.pack_into(self._mm, self._base + i * _ENTRY.size, key, slot1, count)

    def _scan(self, key: bytes) -> tuple[int, int, int | None]:
        """(connections of ``key`` over all workers, index of this worker's entry or -1,
        first free index or None when the table is full)."""
        mask = self.capacity - 1
        i = self._home(key)
        held, mine = 0, -1
        for _ in range(self.capacity):
            k, slot1, count = self._entry(i)
            if slot1 == 0:
                return held, mine, i
            if k == key:
                held += count
                if slot1 == self.slot + 1:
                    mine = i
            i = (i + 1) & mask
        return held, mine, None

    def _delete(self, i: int) -> None:
        """Backward-shift deletion: later entries of the probe run move up into the hole,
        so lookups never need tombstones."""
        mask = self.capacity - 1
        hole = i
        j = i
        while True:
            j = (j + 1) & mask
            key, slot1, count = self._entry(j)
            if slot1 == 0:
                break
            home = self._home(key)
            # move j into the hole unless its home lies cyclically in (hole, j]
            if (j > hole and (home <= hole or home > j)) or (j < hole and hole >= home > j):
                self._put(hole, key, slot1, count)
                hole = j
        self._put(hole, bytes(16), 0, 0)

    # the interface ----------------------------------------------------------------------------

    def total(self) -> int:
        """Connections of the whole listener (every worker's own count, summed)."""
        return sum(self._totals.unpack_from(self._mm, 0))  # read at each command: one call

    def held(self, key: bytes) -> int:
        """Connections of one client over all workers."""
        self._lock()
        try:
            return self._scan(key)[0]
        finally:
            self._unlock()

    def _add_total(self, delta: int) -> None:
        offset = self.slot * _TOTAL.size
        _TOTAL.pack_into(self._mm, offset, _TOTAL.unpack_from(self._mm, offset)[0] + delta)

    def admit(self, key: bytes, maxconn: int, maxconnip: int) -> Admission:
        """Check both limits and count the connection, atomically over all workers."""
        self._lock()
        try:
            if self.total() >= maxconn:
                return Admission(f"maxconn={maxconn}", counted=False, held=0)
            held, mine, free = self._scan(key)
            if held >= maxconnip:
                return Admission(f"maxconnip={maxconnip}", counted=False, held=held)
            self._add_total(1)
            if mine >= 0:
                _, slot1, count = self._entry(mine)
                self._put(mine, key, slot1, count + 1)
            elif free is not None and self._used() < self.capacity * 3 // 4:
                self._put(free, key, self.slot + 1, 1)
                self._count_used(1)
            else:
                return Admission(None, counted=False, held=held)
            return Admission(None, counted=True, held=held)
        finally:
            self._unlock()

    def release(self, key: bytes, *, counted: bool) -> None:
        """A connection admitted by this worker ended."""
        self._lock()
        try:
            self._add_total(-1)
            if not counted:
                return
            _, mine, _ = self._scan(key)
            if mine < 0:
                return
            k, slot1, count = self._entry(mine)
            if count > 1:
                self._put(mine, k, slot1, count - 1)
            else:
                self._delete(mine)
                self._count_used(-1)
        finally:
            self._unlock()

    def _used(self) -> int:
        return int(_TOTAL.unpack_from(self._mm, self.slots * _TOTAL.size)[0])

    def _count_used(self, delta: int) -> None:
        _TOTAL.pack_into(self._mm, self.slots * _TOTAL.size, self._used() + delta)

    def reset(self, slot: int) -> None:
        """A worker died (the spawner of its replacement, first thing): its connections
        died with it. Rebuilds the table without that worker's entries."""
        self._lock()
        try:
            _TOTAL.pack_into(self._mm, slot * _TOTAL.size, 0)
            keep: dict[tuple[bytes, int], int] = {}
            occupied = 0
            for i in range(self.capacity):
                key, slot1, count = self._entry(i)
                occupied += slot1 != 0
                if slot1 and slot1 != slot + 1:
                    # a worker killed in the middle of a backward shift leaves an entry
                    # twice (copied, not yet cleared): the same count, kept once
                    keep[key, slot1] = max(count, keep.get((key, slot1), 0))
            if len(keep) == occupied:
                return
            self._mm[self._base :] = bytes(len(self._mm) - self._base)
            _TOTAL.pack_into(self._mm, self.slots * _TOTAL.size, len(keep))
            mask = self.capacity - 1
            for (key, slot1), count in keep.items():
                i = self._home(key)
                while self._entry(i)[1]:
                    i = (i + 1) & mask
                self._put(i, key, slot1, count)
        finally:
            self._unlock()
