"""Greylisting's state of session 35 (``smtpd/greylist2.sqlite``) moved into the current file.

Why: session 36 changed the layout (networks packed, rows counted per source) and removed
the s35 file at the first decision, so every triplet that had passed and every known
(network, sender domain) client was lost: all correspondents were greylisted again, the
second time in two releases. The s35 rows hold all the current file needs: the pair and
sender domain hashes are the same (``greylist.digest``), a network's text (``192.0.2.0/24``,
``2001:db8::/64``) packs as a client in it does (``greylist.place``), and the per-source
counts are made from the rows moved. Its pending triplets are minutes old: not moved
(greylisted once more).

``upgrade`` runs once, in the current file's transaction, while that file holds no passed
triplet or known client; it removes the s35 file after, or sets it aside if the move fails
(one attempt: a failure left it in place, greylisting off and every decision moving it
again). ``greylist.move_before_serving`` calls it in pyqmail-smtpd's spawner, before the
workers are forked (a worker's first decision calls it too, finding nothing left to do).
This module knows nothing of the current layout's packing or caps: the caller hands them
in (the greylist module imports this one).

Cost, once, bounded by ``MOVED`` and ``MOVE_SECONDS``: measured on a busy 2-core machine,
400,000 passed triplets and 100,000 clients took 22 s (9.4 s of CPU, 39 MiB); 1,000,000 and
200,000 had taken 66 s (34 s of CPU: each row lands at a random place of three B-trees),
beyond the 60 s a spawner is given, and on a worker's loop held its sessions while the
other workers' decisions waited 2 s each and accepted (``greylist=error``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, suppress
from functools import lru_cache
from pathlib import Path

from pyqmail.log import log

BATCH = 10_000  # rows of the s35 file read (and held in memory) at once
PACKED = 65_536  # network texts packed kept at once (parsing one costs 10 to 20 us)
MOVED = {"passed": 400_000, "client": 100_000}
"""Rows of each table moved at most, the newest (the others are greylisted once more, as a
new correspondent is): 22 s on a busy 2-core machine, where 1,000,000 passed triplets and
200,000 clients took 66 s (34 s of CPU), over the 60 s a spawner is given (``prefork``)."""
MOVE_SECONDS = 40.0  # a move still running then is interrupted, rolled back, set aside
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
        limit, skipped = min(caps[table], MOVED[table]), 0
        insert = f"INSERT OR IGNORE INTO {table} VALUES ({', '.join('?' * width)})"  # noqa: S608 - names are this module's
        for batch in _old_rows(old, query, limit):
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


ASIDE = ".failed-move"  # the suffix of an s35 file whose move failed (its WAL and SHM follow)


def upgrade(
    db: sqlite3.Connection,
    old: Path,
    current: Path,
    pack: Callable[[str], tuple[bytes, int]],
    caps: Mapping[str, int],
) -> None:
    """The s35 file ``old``, while ``current`` (``db``) holds no passed triplet or known
    client yet: its rows ``move`` over in one transaction, then it is removed. One attempt,
    whatever happens: a file that cannot be read is logged and removed, as before; a move
    that fails on the current file (disk full, an I/O error) is rolled back, logged, and
    the s35 file set aside (``set_aside``), so greylisting goes on with the current file's
    state and no later decision moves it again. Another process moving it holds the lock:
    the busy error of ``BEGIN`` is the caller's decision's (``greylist=error``)."""
    if not old.exists():
        return
    moved: dict[str, int] = {}
    deadline = time.monotonic() + MOVE_SECONDS
    db.execute("BEGIN IMMEDIATE")
    try:
        kept = db.execute("SELECT sum(value) FROM meta WHERE name IN ('passed', 'client')")
        if not kept.fetchone()[0] and old.exists():  # else moved meanwhile, or in use
            db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            moved = move(db, old, pack, caps)
        db.execute("COMMIT")
    except UnreadableError as exc:
        _rollback(db)
        remove_old(old, str(exc))
        return
    except (sqlite3.Error, OSError) as exc:
        _rollback(db)
        late = f" (over {MOVE_SECONDS:g} s)" if time.monotonic() > deadline else ""
        _set_aside(old, current, f"{type(exc).__name__}: {exc}{late}")
        return
    except BaseException:
        _rollback(db)
        raise
    finally:
        db.set_progress_handler(None, 0)
    if moved:
        log("upgrade", text="greylist state of the older format moved", file=str(old), **moved)
    else:  # moved before by another process (or the current file was in use): nothing lost
        why = f"{current.name} holds passed triplets already"
        log("upgrade", text="greylist state of the older format removed", file=str(old), why=why)
    remove_old(old, None)


def _rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction; a failure of the rollback itself is not the one to report
    (SQLite may have ended the transaction already, as after a full disk)."""
    if db.in_transaction:
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _set_aside(old: Path, current: Path, error: str) -> None:
    """The move into ``current`` failed: ``set_aside``, or remove if it cannot be renamed;
    either way logged, never tried again."""
    try:
        aside = set_aside(old)
    except OSError as exc:
        remove_old(old, f"cannot move into {current}: {error}; cannot set aside: {exc}")
        return
    log(
        "warning",
        text="cannot move the older greylist state; set aside, greylisting goes on without it",
        file=str(old),
        into=str(current),
        aside=str(aside),
        error=error,
    )


def set_aside(old: Path) -> Path:
    """Rename the s35 file whose move failed, with its WAL and shared memory (named so that
    SQLite still pairs them), to ``<name>.failed-move``; where it went. Renamed, not removed:
    its rows are what the current file lacks, a rename takes no room on a full disk, and an
    admin can rename it back once there is room (the next start moves it). ``OSError`` if
    the file itself cannot be renamed."""
    aside = old.with_name(old.name + ASIDE)
    old.rename(aside)
    for suffix in ("-wal", "-shm"):
        with suppress(FileNotFoundError):
            old.with_name(old.name + suffix).rename(aside.with_name(aside.name + suffix))
    return aside


def remove_old(old: Path, why: str | None) -> None:
    """An older file is removed with its WAL; ``why`` its rows were not kept, logged
    (they are greylisted once more). An older process that still has it open keeps its
    own copy until it ends."""
    if not old.exists():
        return
    try:
        for suffix in ("", "-wal", "-shm"):
            old.with_name(old.name + suffix).unlink(missing_ok=True)
    except OSError as exc:  # never a reason to stop greylisting with the new file
        log("warning", text="cannot remove the older greylist state", error=str(exc))
        return
    if why is not None:
        log(
            "warning",
            text="greylist state of the older format removed; greylisting starts afresh",
            file=str(old),
            why=why,
        )
