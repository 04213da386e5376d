"""The per-login lock every password check shares: SMTP AUTH and IMAP/POP3 alike.

Why its own file, outside ``smtpd``: a login name is guessed wherever its password is
checked. pyqmail-smtpd checks it for AUTH on 465/587; Dovecot checks it for IMAP and POP3
through ``pyqmail-checkpassword``, a short process per login that runs as Dovecot's auth
user. When each kept its own count, a botnet guessing ``admin@domain`` on 993 never tripped
the SMTP lock, and a login SMTP had locked still had its password checked over IMAP. So
both read and write one store, with one rule (this module); the checker imports nothing of
the SMTP daemon (its start-up cost is paid per login).

The rule, per name as given (unknown names alike, so a lock reveals nothing): ``fails``
(``control/authlockfails``) failures within ``secs`` (``control/authlocktime``) seconds lock
the name for ``secs`` seconds. During a lock no password is checked and every attempt, the
right password included, is refused the same way. The lock is bounded: failures during it
neither count nor extend it (nor lift it: a failure whose check began before the lock only
finds the lock in place), it ends ``secs`` after it began (clamped to that even if the clock
jumps), and a right password clears the count. ``fails`` 0: no new locks.

The store: ``<root>/auth/accounts.sqlite``, in the directory both verifiers share
(``pyqmail.authdir``: ``root:pyqmaila 2770``, the group of ``control/smtpusers``), mode
``0660`` (SQLite gives its ``-wal`` and ``-shm`` the database's mode, and the directory
their group): pyqmail-smtpd's user and Dovecot's auth process may both read and write it,
nobody else. WAL mode, a busy timeout and ``BEGIN IMMEDIATE`` serialise the writers of
every process; the table is pruned every ``PRUNE_EVERY`` failures (counted in the file,
since a checker process lives for one login) and capped at ``MAX_ROWS`` names, locks in
force evicted last: a flood of new names neither grows the file without bound nor frees
the name it was meant to free.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyqmail import authdir

LOCK_FILE = "accounts.sqlite"  # in authdir.AUTH_DIR
MAX_ROWS = 50_000
PRUNE_EVERY = 200  # failures (of every process) between prunes
BUSY_TIMEOUT_MS = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS account (
    name TEXT PRIMARY KEY, fails INTEGER NOT NULL, first REAL NOT NULL,
    locked_until REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS account_first ON account (first);
CREATE TABLE IF NOT EXISTS counter (
    name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""


class StateError(Exception):
    """A shared AUTH state file cannot be opened or used; the message names the file."""


def open_db(
    path: Path,
    schema: str,
    what: str,
    prepare: Callable[[], None],
    problem: Callable[[], str] | None = None,
    *,
    busy_ms: int = BUSY_TIMEOUT_MS,
    set_up_wait: float = BUSY_TIMEOUT_MS / 1000,
) -> sqlite3.Connection:
    """Open the SQLite state file ``path`` (``what`` it holds, for the errors) after
    ``prepare`` (its directory, its mode) and ``set_up`` with ``schema``, waiting at most
    ``busy_ms`` for another process's lock on each statement and ``set_up_wait`` seconds to
    set it up. A file that is not a database (any more) is moved aside and started afresh:
    every state opened here holds counts, not mail (the AUTH state, the login locks, the
    greylist). StateError when it cannot be opened or used; ``problem`` says what it must
    be."""
    try:
        prepare()
        db = sqlite3.connect(path, timeout=busy_ms / 1000, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        hint = f" ({problem()})" if problem is not None else ""
        raise StateError(f"{path}: cannot open {what}: {exc}{hint}") from exc
    try:
        set_up(db, schema, set_up_wait)
    except sqlite3.DatabaseError as exc:
        db.close()
        if isinstance(exc, sqlite3.OperationalError):
            raise StateError(f"{path}: cannot use {what}: {exc}") from exc
        _set_aside(path)
        return open_db(
            path, schema, what, prepare, problem, busy_ms=busy_ms, set_up_wait=set_up_wait
        )
    return db


def _set_aside(path: Path) -> None:
    broken = path.with_name(f"{path.name}.broken-{int(time.time())}")
    try:
        path.rename(broken)
    except OSError as exc:
        raise StateError(f"{path}: broken and cannot be moved aside: {exc}") from exc


@dataclass(frozen=True)
class Rule:
    """``authlockfails`` and ``authlocktime``, as every verifier reads them."""

    fails: int = 10  # 0: no new locks
    secs: int = 600


def set_up(db: sqlite3.Connection, schema: str, wait: float) -> None:
    """WAL mode and ``schema``, retried for ``wait`` seconds while another process holds
    the lock (every SQLite state of pyqmail is set up this way).

    Switching to WAL takes the database's exclusive lock and SQLite answers "database is
    locked" at once instead of calling the busy handler when another connection holds it: the
    workers of a listener that start together and see their first AUTH together would give
    a client 454 for nothing. So the set-up waits for its turn, as long as a busy timeout.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: consistent after a crash
            db.executescript(schema)
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (
                sqlite3.SQLITE_BUSY,
                sqlite3.SQLITE_LOCKED,
            )
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def lock_path(root: Path) -> Path:
    return root / authdir.AUTH_DIR / LOCK_FILE


class AccountLocks:
    """The shared file. One connection per process, used from one thread at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = lock_path(root)
        self._db: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        """Open (creating the directory and file when missing); StateError if it cannot."""
        if self._db is None:
            self._db = open_db(self.path, _SCHEMA, "the login locks", self._prepare, self._problem)
        return self._db

    def _prepare(self) -> None:
        authdir.make_dir(self.root)
        # created 0660 here: SQLite would create it 0644 less the umask
        os.close(authdir.open_file(str(self.path), os.O_RDWR))

    def _problem(self) -> str:
        return authdir.problem(self.root)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def locked(self, name: str, now: float, rule: Rule) -> bool:
        """Whether ``name`` is locked at ``now`` (a lock never outlasts ``rule.secs``)."""
        row = (
            self.connect()
            .execute("SELECT locked_until FROM account WHERE name=?", (name,))
            .fetchone()
        )
        return row is not None and min(float(row[0]), now + rule.secs) > now

    def record(self, name: str, *, ok: bool, now: float, rule: Rule) -> None:
        """The verdict of a password check of ``name``: a right one clears the count, a
        wrong one counts (unless the name is locked by now) and may lock it."""
        db = self.connect()
        if ok:
            db.execute("DELETE FROM account WHERE name=?", (name,))
            return
        if not rule.fails:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            _count(db, name, now, rule)
            (done,) = db.execute(
                "INSERT INTO counter VALUES ('failures', 1) ON CONFLICT (name) DO UPDATE"
                " SET value=value+1 RETURNING value"
            ).fetchone()
        finally:
            db.execute("COMMIT")
        if int(done) % PRUNE_EVERY == 0:
            self.prune(now, rule)

    def prune(self, now: float, rule: Rule) -> None:
        """Forget counts and locks that ended, then cap the table at MAX_ROWS names: the
        locks in force go last, then the oldest counts first."""
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "DELETE FROM account WHERE first < ? AND locked_until < ?",
                (now - rule.secs, now),
            )
            (count,) = db.execute("SELECT count(*) FROM account").fetchone()
            if count > MAX_ROWS:
                db.execute(
                    "DELETE FROM account WHERE name IN (SELECT name FROM account"
                    " ORDER BY locked_until > ?, first LIMIT ?)",
                    (now, count - MAX_ROWS),
                )
        finally:
            db.execute("COMMIT")

    def rows(self) -> int:
        """Names in the table: for tests and curious admins."""
        return int(self.connect().execute("SELECT count(*) FROM account").fetchone()[0])


def _count(db: sqlite3.Connection, name: str, now: float, rule: Rule) -> None:
    """One more failure of ``name`` inside the caller's transaction. A name locked by now
    is left alone: the failure neither counts nor shortens or lifts the lock."""
    row = db.execute(
        "SELECT fails, first, locked_until FROM account WHERE name=?", (name,)
    ).fetchone()
    if row is not None and min(float(row[2]), now + rule.secs) > now:
        return
    if row is None or now - float(row[1]) > rule.secs:
        fails, first = 1, now
    else:
        fails, first = int(row[0]) + 1, float(row[1])
    locked_until = 0.0
    if fails >= rule.fails:
        fails, first, locked_until = 0, now, now + rule.secs
    db.execute(
        "INSERT INTO account VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE"
        " SET fails=excluded.fails, first=excluded.first, locked_until=excluded.locked_until",
        (name, fails, first, locked_until),
    )
