"""Constant databases in D. J. Bernstein's cdb format (https://cr.yp.to/cdb/cdb.txt).

tcprules(1) compiles ``/etc/tcp/smtp`` into a cdb; pyqmail-smtpd reads it and the
``pyqmail_tcprules`` Ansible module writes it, so both sides must agree with ucspi-tcp
byte for byte. ``make`` reproduces ``cdb_make.c`` exactly (same record order, same hash
table layout), so a file built here from the same key/value pairs, in the same order, is
identical to the one tcprules writes; the compatibility tests compare the bytes.

Layout, all integers 32-bit little-endian:

- 2048-byte header: 256 pairs ``(table position, table slot count)``;
- the records, in insertion order: ``key length, data length, key, data``;
- 256 hash tables; table ``h & 255`` has twice as many slots as it has keys, each slot
  ``(hash, record position)``, a key starting its linear probe at slot ``(h >> 8) % slots``;
  a slot whose record position is 0 is empty.

The hash is ``h = 5381; h = ((h << 5) + h) ^ c`` over the key bytes, modulo 2**32.

The reader loads the whole file once (rules files are small, and one read gives the
daemon a consistent snapshot even if tcprules renames a new file into place meanwhile)
and checks every offset up front, so a truncated or corrupt file fails at ``open`` with
``CDBError`` rather than with a wrong answer later.

This module imports only the standard library: it is also loaded by Ansible modules as
the collection's ``plugins/module_utils/pyqmail_cdb`` (a symlink to this file).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator

__all__ = ["CDB", "CDBError", "cdb_hash", "make"]

HEADER_SIZE = 2048
_MAX = 0xFFFFFFFF
_PAIR = struct.Struct("<II")


class CDBError(ValueError):
    """The file is not a well-formed cdb (truncated, corrupt) or would not fit in one."""


def cdb_hash(key: bytes) -> int:
    """The cdb hash of ``key`` (djb's "times 33 xor" hash, 32 bits)."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) & _MAX) ^ c
    return h


def make(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Build a cdb holding ``pairs`` in order (duplicate keys are kept, as cdbmake does)."""
    records: list[bytes] = []
    slots: list[list[tuple[int, int]]] = [[] for _slot in range(256)]
    pos = HEADER_SIZE
    for key, data in pairs:
        if not isinstance(key, bytes) or not isinstance(data, bytes):
            raise TypeError("cdb keys and data must be bytes")
        h = cdb_hash(key)
        slots[h & 255].append((h, pos))
        records.append(_PAIR.pack(len(key), len(data)) + key + data)
        pos += 8 + len(key) + len(data)
        if pos > _MAX:
            raise CDBError("cdb would exceed 4 GiB")

    header = bytearray()
    tables = bytearray()
    for entries in slots:
        size = 2 * len(entries)
        header += _PAIR.pack(pos + len(tables), size)
        table: list[tuple[int, int]] = [(0, 0)] * size
        for h, rec in entries:
            where = (h >> 8) % size
            while table[where][1]:
                where = where + 1 if where + 1 < size else 0
            table[where] = (h, rec)
        for h, rec in table:
            tables += _PAIR.pack(h, rec)
    if pos + len(tables) > _MAX:
        raise CDBError("cdb would exceed 4 GiB")
    return bytes(header) + b"".join(records) + bytes(tables)


class CDB:
    """A read-only cdb held in memory. ``get``/``getall`` look keys up like cdb_find."""

    def __init__(self, data: bytes, name: str = "<cdb>") -> None:
        self._data = data
        self.name = name
        self._tables = self._check_header()
        self._count = self._check_records()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CDB:
        """Read the cdb at ``path`` (OSError if it cannot be read, CDBError if corrupt)."""
        with open(path, "rb") as f:
            return cls(f.read(), os.fspath(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<cdb>") -> CDB:
        return cls(bytes(data), name)

    def _fail(self, what: str) -> CDBError:
        return CDBError(f"{self.name}: not a valid cdb ({len(self._data)} bytes): {what}")

    def _check_header(self) -> list[tuple[int, int]]:
        size = len(self._data)
        if size < HEADER_SIZE:
            raise self._fail(f"shorter than the {HEADER_SIZE}-byte header (truncated?)")
        tables = [_PAIR.unpack_from(self._data, 8 * i) for i in range(256)]
        for i, (tpos, tlen) in enumerate(tables):
            if tpos < HEADER_SIZE or tpos + 8 * tlen > size:
                raise self._fail(
                    f"hash table {i} at {tpos} with {tlen} slots lies outside the file (truncated?)"
                )
        return tables

    def _check_records(self) -> int:
        """Walk the records between the header and the first hash table."""
        end = min(tpos for tpos, _tlen in self._tables)
        pos, count = HEADER_SIZE, 0
        while pos < end:
            if pos + 8 > end:
                raise self._fail(f"record header at {pos} runs into the hash tables")
            klen, dlen = _PAIR.unpack_from(self._data, pos)
            pos += 8 + klen + dlen
            if pos > end:
                raise self._fail(f"record {count} runs past the hash tables (truncated?)")
            count += 1
        slots = sum(tlen for _tpos, tlen in self._tables)
        if slots != 2 * count:
            raise self._fail(f"{count} records but {slots} hash slots (expected {2 * count})")
        return count

    def __len__(self) -> int:
        return self._count

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, data) record in file order, duplicates included."""
        end = min(tpos for tpos, _tlen in self._tables)
        pos = HEADER_SIZE
        while pos < end:
            klen, dlen = _PAIR.unpack_from(self._data, pos)
            kpos = pos + 8
            yield self._data[kpos : kpos + klen], self._data[kpos + klen : kpos + klen + dlen]
            pos = kpos + klen + dlen

    def _find(self, key: bytes) -> Iterator[bytes]:
        """Probe like cdb_findnext: the data of each record with ``key``, in file order."""
        h = cdb_hash(key)
        tpos, tlen = self._tables[h & 255]
        if not tlen:
            return
        start = (h >> 8) % tlen
        for i in range(tlen):
            slot = tpos + 8 * ((start + i) % tlen)
            shash, rpos = _PAIR.unpack_from(self._data, slot)
            if not rpos:
                break
            if shash != h:
                continue
            if rpos < HEADER_SIZE or rpos + 8 > len(self._data):
                raise self._fail(f"hash slot at {slot} points to {rpos}, outside the records")
            klen, dlen = _PAIR.unpack_from(self._data, rpos)
            kpos = rpos + 8
            if kpos + klen + dlen > len(self._data):
                raise self._fail(f"record at {rpos} runs past the end of the file")
            if self._data[kpos : kpos + klen] == key:
                yield self._data[kpos + klen : kpos + klen + dlen]

    def getall(self, key: bytes) -> list[bytes]:
        """The data of every record with ``key``, in file order."""
        return list(self._find(key))

    def get(self, key: bytes) -> bytes | None:
        """The data of the first record with ``key``, or None (what tcpserver uses)."""
        return next(self._find(key), None)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None
