"""Greylisting's state of session 35 (``smtpd/greylist2.sqlite``) moved into the current file.

Why: session 36 changed the layout (networks packed, rows counted per source) and removed
the s35 file at the first decision, so every triplet that had passed and every known
(network, sender domain) client was lost: all correspondents were greylisted again, the
second time in two releases. The s35 rows hold all the current file needs: the pair and
sender domain hashes are the same (``greylist.digest``), a network's text (``192.0.2.0/24``,
``2001:db8::/64``) packs as a client in it does (``greylist.place``), and the per-source
counts are made from the rows moved. Its pending triplets are minutes old: not moved
(greylisted once more).

``greylist.Greylist`` calls ``move`` once, in the current file's transaction, while that file
holds no passed triplet or known client; it removes the s35 file after. This module knows
nothing of the current layout's packing or caps: the caller hands them in (the greylist
module imports this one).

Cost, once: measured with 1,000,000 passed triplets over tens of thousands of networks and
200,000 clients, about 25 s of CPU (each row lands at a random place of three B-trees) and
64 MiB of memory; 200,000 and 40,000, about 3 s. The worker that moves
them holds its sessions meanwhile; the other workers' decisions wait for the locked file
(``greylist.SET_UP_WAIT``, 2 s), then accept (``greylist=error``), as for any database
problem.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from functools import lru_cache
from pathlib import Path

BATCH = 10_000  # rows of the s35 file read (and held in memory) at once
PACKED = 65_536  # network texts packed kept at once (parsing one costs 10 to 20 us)
BUSY_SECONDS = 0.25  # an s35 process still writing it: wait as long as a decision does
# each table: s35's rows, the newest first (those over the current cap are left), and how
# many values a row of the current layout has
_TABLES = {
    "passed": ("SELECT net, pair, last FROM passed ORDER BY last DESC LIMIT ?", 4),
    "client": ("SELECT net, domain, passes, last FROM client ORDER BY last DESC LIMIT ?", 5),
}


class UnreadableError(Exception):
    """The s35 file could not be read (corrupt, not a database, a table missing): its rows
    are skipped, never a reason to stop greylisting."""


def _old_rows(old: Path, query: str, limit: int) -> Iterator[list[tuple[object, ...]]]:
    """The s35 file's rows, ``BATCH`` at a time; ``UnreadableError`` for any problem of that
    file, told apart from one of the current file (which the caller's decision reports)."""
    try:
        uri = f"{old.resolve().as_uri()}?mode=rw"  # never made afresh if gone meanwhile
        with closing(sqlite3.connect(uri, uri=True, timeout=BUSY_SECONDS)) as src:
            rows = src.execute(query, (limit,))
            while batch := rows.fetchmany(BATCH):
                yield batch
    except sqlite3.Error as exc:
        raise UnreadableError(f"{type(exc).__name__}: {exc}") from exc


def _packed(
    row: tuple[object, ...], pack: Callable[[str], tuple[bytes, int]]
) -> tuple[object, ...] | None:
    """An s35 row with its network's text packed (source, network within it); None for a
    row whose network is no address or whose hash is no bytes (skipped, counted)."""
    net, key, *rest = row
    if not isinstance(net, str) or not isinstance(key, bytes):
        return None
    try:
        return (*pack(net.partition("/")[0]), key, *rest)
    except ValueError:
        return None


def move(
    db: sqlite3.Connection,
    old: Path,
    pack: Callable[[str], tuple[bytes, int]],
    caps: Mapping[str, int],
) -> dict[str, int]:
    """Copy the s35 file's ``passed`` and ``client`` rows (the newest ``caps[table]`` of each)
    into ``db``'s empty tables, inside the caller's transaction, and count them per source
    (``held``) and in all (``meta``); how many of each moved and were skipped.
    ``UnreadableError`` if the s35 file cannot be read: the caller rolls back."""
    moved = {}
    pack = lru_cache(maxsize=PACKED)(pack)  # a network's rows share its text
    for table, (query, width) in _TABLES.items():
        skipped = 0
        insert = f"INSERT OR IGNORE INTO {table} VALUES ({', '.join('?' * width)})"  # noqa: S608 - names are this module's
        for batch in _old_rows(old, query, caps[table]):
            rows = [packed for row in batch if (packed := _packed(row, pack)) is not None]
            skipped += len(batch) - len(rows)
            db.executemany(insert, rows)
        db.execute("DELETE FROM held WHERE kind=?", (table,))
        db.execute(
            f"INSERT INTO held SELECT ?, unit, count(*) FROM {table} GROUP BY unit",  # noqa: S608
            (table,),
        )
        (count,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
        db.execute("UPDATE meta SET value=? WHERE name=?", (count, table))
        moved[table], moved[f"{table}_skipped"] = count, skipped
    return moved
