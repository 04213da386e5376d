"""Greylisting (opt-in): a new (client network, sender, recipient) triplet is deferred once.

Control files:

====================  ========================================================================
``greylistdelay``     seconds a new triplet is deferred with ``451 4.7.1`` (the reply says how
                      long is left); 0 (default): no greylisting. At most 86400
``greylistlifetime``  seconds a triplet is remembered after it was last seen: a deferred one
                      must come back within it, a passed one is forgotten after it unused.
                      Default 2592000 (30 days), 60 to 31536000; it must be longer than
                      ``greylistdelay`` (``ControlError`` naming both files otherwise)
====================  ========================================================================

The triplet: the client's IPv4 /24 or IPv6 /64 (a sender's pool of outgoing servers retries
from a neighbour), the envelope sender as ``greysender.normalise`` makes it (BATV tags
stripped, SRS undone, ``+extensions`` dropped, digit runs of the local part made ``#``, as
postgrey does: a sender whose address changes with every message becomes known), and the
recipient, both lower case. The decision is made at RCPT, per recipient. Who skips it: relay
clients and authenticated sessions (the core asks only for clients that may not relay),
clients on a ``dnswl`` allow list and clients whose tcprules entry sets ``RBLSMTPD`` empty (a
known host, ``checks.dnsbl``), and clients greylisting has come to know (below).

State: ``<root>/smtpd/greylist2.sqlite``, beside the AUTH state (``smtpd.authguard``), opened
by the same ``open_db`` (``pyqmail.authlock``): WAL mode, a busy timeout, the set-up retried
while another worker holds the lock, so every worker of every listener shares it and it
survives restarts. Three tables, so that a flood of new triplets cannot push out what passed:

- ``client``: (network, sender domain) pairs whose triplets passed ``AUTO_ALLOW`` times,
  ``COUNT_APART`` seconds apart (postgrey's ``--auto-whitelist-clients``): consulted first,
  they skip greylisting (logged ``greylist=client``); forgotten only by age
  (``greylistlifetime`` unseen).
- ``passed``: the triplets that came back after the delay; forgotten only by age.
- ``pending``: the triplets waiting for their retry, at most ``PENDING_PER_NET`` per network:
  a source over it loses its own oldest pending triplets, never anybody else's. Only when all
  networks together hold ``MAX_PENDING`` are the oldest pending triplets anywhere dropped
  (many sources at once); ``client`` and ``passed`` never are.

Sender and recipient are kept as a 16-byte BLAKE2b hash of the pair, the sender domain as one
too (no log or check needs them back): a row is a few dozen bytes whatever the addresses.
The pending rows are counted as they come and go (a row of ``meta``), so no ``count(*)``
runs; the prune (every ``PRUNE_EVERY`` decisions) deletes at most ``PRUNE_BATCH`` rows of
each table by their age index: its time is bounded whatever the size of the file.

Each decision is one ``BEGIN IMMEDIATE`` transaction (workers decide one after the other),
made on the worker's loop: a few indexed reads and small writes, no fsync with
``synchronous=NORMAL``; the busy timeout is short (``BUSY_TIMEOUT_MS``), and any database
problem lets the recipient through (logged ``greylist=error``): greylisting never blocks mail
because of itself. The file of the older format (``OLD_STATE_FILE``: raw addresses, one
table) is removed at the first decision, logged: its triplets are greylisted once more.
"""

from __future__ import annotations

import hashlib
import ipaddress
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from pyqmail.authlock import StateError, open_db
from pyqmail.checks.greysender import normalise
from pyqmail.checks.verdict import Verdict
from pyqmail.log import log

STATE_FILE = "smtpd/greylist2.sqlite"
OLD_STATE_FILE = "smtpd/greylist.sqlite"  # before s35: raw addresses, one capped table
BUSY_TIMEOUT_MS = 250
SET_UP_WAIT = 2.0  # seconds the first connection of a worker may wait to set the file up
PRUNE_EVERY = 500  # decisions per process between prunes
PRUNE_BATCH = 2000  # rows of each table one prune deletes at most
AUTO_ALLOW = 5  # passed triplets of a (network, sender domain) that make it a known client
COUNT_APART = 60  # seconds between two passes that both count towards AUTO_ALLOW
PENDING_PER_NET = 1000  # pending triplets one network may have
MAX_PENDING = 1_000_000  # pending triplets of all networks together
HASH_BYTES = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    net TEXT NOT NULL, pair BLOB NOT NULL, first REAL NOT NULL,
    PRIMARY KEY (net, pair)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_first ON pending (first);
CREATE TABLE IF NOT EXISTS passed (
    net TEXT NOT NULL, pair BLOB NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (net, pair)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS passed_last ON passed (last);
CREATE TABLE IF NOT EXISTS client (
    net TEXT NOT NULL, domain BLOB NOT NULL, passes INTEGER NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (net, domain)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_last ON client (last);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('pending', 0);
"""


@dataclass(frozen=True)
class Settings:
    """``greylistdelay`` and ``greylistlifetime``; delay 0: off."""

    delay: int = 0
    lifetime: int = 2_592_000

    @property
    def active(self) -> bool:
        return self.delay > 0


def network(ip: str) -> str:
    """The client's /24 (IPv4, also an IPv4-mapped IPv6 address) or /64 (IPv6)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bits = 24 if isinstance(addr, ipaddress.IPv4Address) else 64
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def digest(*parts: str) -> bytes:
    """The fixed-size key of the addresses (NUL cannot be in an SMTP path)."""
    data = "\0".join(parts).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


@dataclass(frozen=True)
class Key:
    """One recipient's triplet as stored: the network, the pair's hash, the domain's."""

    net: str
    pair: bytes
    domain: bytes | None  # None: the null sender (or none with a domain): never a known client

    @classmethod
    def of(cls, ip: str, sender: str, rcpt: str) -> Key:
        """The null sender has no domain to come to know: bounces from a network must not
        make it a known client, or any ``MAIL FROM:<>`` spam from it would skip the delay."""
        who = normalise(sender)
        at, domain = who.rpartition("@")[1:]
        known = digest(domain) if at and domain else None
        return cls(network(ip), digest(who, rcpt.lower()), known)


class Greylist:
    """One process's connection to the shared state (opened at the first decision)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / STATE_FILE
        self._db: sqlite3.Connection | None = None
        self._decisions = 0

    def connect(self) -> sqlite3.Connection:
        """Open (and create) the database, as every shared state of pyqmail-smtpd is opened
        (``authlock.open_db``: a file that is no database is set aside and started afresh);
        ``StateError`` or ``sqlite3.Error`` if it cannot."""
        if self._db is None:
            self._db = open_db(
                self.path,
                _SCHEMA,
                "the greylist",
                self._prepare,
                busy_ms=BUSY_TIMEOUT_MS,
                set_up_wait=SET_UP_WAIT,
            )
        return self._db

    def _prepare(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        self._remove_old_format()

    def _remove_old_format(self) -> None:
        """The older file (raw addresses) is not read: it is removed with its WAL, logged.
        An older process that still has it open keeps its own copy until it ends."""
        old = self.root / OLD_STATE_FILE
        if not old.exists():
            return
        try:
            for suffix in ("", "-wal", "-shm"):
                old.with_name(old.name + suffix).unlink(missing_ok=True)
        except OSError as exc:  # never a reason to stop greylisting with the new file
            log("warning", text="cannot remove the older greylist state", error=str(exc))
            return
        log(
            "warning",
            text="greylist state of the older format removed; greylisting starts afresh",
            file=str(old),
        )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def check(self, ip: str, sender: str, rcpt: str, settings: Settings, now: float) -> Verdict:
        """Decide for one recipient; never raises for a database problem (accept, logged)."""
        try:
            verdict = self._decide(Key.of(ip, sender, rcpt), settings, now)
            self._decisions += 1
            if self._decisions % PRUNE_EVERY == 0:
                self.prune(settings, now)
        except (sqlite3.Error, OSError, StateError) as exc:
            self.close()
            return Verdict("accept", 250, "", f"greylist=error:{type(exc).__name__}")
        return verdict

    def _decide(self, key: Key, settings: Settings, now: float) -> Verdict:
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            state, left = self._state(db, key, settings, now)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if left:
            text = f"Greylisted, please try again in {left} seconds"
            return Verdict("defer", 451, text, f"greylist={state} greylist_wait={left}")
        return Verdict("accept", 250, "", f"greylist={state}")

    def _state(
        self, db: sqlite3.Connection, key: Key, settings: Settings, now: float
    ) -> tuple[str, int]:
        """(state, seconds left) for one triplet, the tables brought up to date."""
        horizon = now - settings.lifetime
        if key.domain is not None and self._known_client(db, key, now, horizon):
            return "client", 0
        where = (key.net, key.pair)
        passed = db.execute("SELECT last FROM passed WHERE net=? AND pair=?", where).fetchone()
        if passed is not None and passed[0] >= horizon:
            db.execute("UPDATE passed SET last=? WHERE net=? AND pair=?", (now, *where))
            return "known", 0
        row = db.execute("SELECT first FROM pending WHERE net=? AND pair=?", where).fetchone()
        if row is not None and row[0] >= horizon:
            if now < row[0] + settings.delay:
                return "early", max(1, int(row[0] + settings.delay - now + 0.999))
            self._pass(db, key, now)
            return "pass", 0
        if row is not None:  # expired: it starts again
            db.execute("UPDATE pending SET first=? WHERE net=? AND pair=?", (now, *where))
        else:
            self._add_pending(db, key, now)
        return "new", settings.delay

    def _known_client(self, db: sqlite3.Connection, key: Key, now: float, horizon: float) -> bool:
        """The (network, sender domain) passed ``AUTO_ALLOW`` times and was seen within the
        lifetime: it skips greylisting (and is seen now)."""
        where = (key.net, key.domain)
        row = db.execute("SELECT passes, last FROM client WHERE net=? AND domain=?", where)
        client = row.fetchone()
        if client is None or client[0] < AUTO_ALLOW or client[1] < horizon:
            return False
        db.execute("UPDATE client SET last=? WHERE net=? AND domain=?", (now, *where))
        return True

    def _pass(self, db: sqlite3.Connection, key: Key, now: float) -> None:
        """A pending triplet came back in time: it moves to ``passed``, and its (network,
        sender domain) counts one more pass towards ``AUTO_ALLOW`` if its last counted pass
        is ``COUNT_APART`` seconds old (postgrey's rule: the recipients of one message, or a
        burst of retries, count once, so a client is known after several deliveries, not
        after one message to five recipients)."""
        gone = db.execute(
            "DELETE FROM pending WHERE net=? AND pair=?", (key.net, key.pair)
        ).rowcount
        db.execute("UPDATE meta SET value=max(value-?, 0) WHERE name='pending'", (gone,))
        db.execute("INSERT OR REPLACE INTO passed VALUES (?, ?, ?)", (key.net, key.pair, now))
        if key.domain is None:  # the null sender: no domain to come to know
            return
        db.execute(
            "INSERT INTO client VALUES (?, ?, 1, ?) ON CONFLICT (net, domain) DO UPDATE"
            " SET passes=passes+1, last=excluded.last WHERE excluded.last >= client.last + ?",
            (key.net, key.domain, now, COUNT_APART),
        )

    def _add_pending(self, db: sqlite3.Connection, key: Key, now: float) -> None:
        """A new pending triplet; its network over ``PENDING_PER_NET`` loses its own oldest
        (the count is of that network's rows alone: an index range, at most the cap)."""
        (count,) = db.execute("SELECT count(*) FROM pending WHERE net=?", (key.net,)).fetchone()
        dropped = 0
        if count >= PENDING_PER_NET:
            dropped = db.execute(
                "DELETE FROM pending WHERE net=? AND pair IN (SELECT pair FROM pending"
                " WHERE net=? ORDER BY first LIMIT ?)",
                (key.net, key.net, count - PENDING_PER_NET + 1),
            ).rowcount
        db.execute("INSERT INTO pending VALUES (?, ?, ?)", (key.net, key.pair, now))
        db.execute("UPDATE meta SET value=max(value+?, 0) WHERE name='pending'", (1 - dropped,))

    def prune(self, settings: Settings, now: float) -> None:
        """Forget, by age, at most ``PRUNE_BATCH`` rows of each table; then, if all the
        networks' pending triplets are over ``MAX_PENDING``, the oldest pending ones. One
        transaction, bounded work: no ``count(*)`` (``meta`` keeps the pending count)."""
        db = self.connect()
        horizon = now - settings.lifetime
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, column in (("passed", "last"), ("client", "last")):
                self._delete_oldest(db, table, column, horizon, PRUNE_BATCH)
            gone = self._delete_oldest(db, "pending", "first", horizon, PRUNE_BATCH)
            (count,) = db.execute("SELECT value FROM meta WHERE name='pending'").fetchone()
            count = max(count - gone, 0)
            if count > MAX_PENDING:
                over = min(count - MAX_PENDING, PRUNE_BATCH)
                count -= self._delete_oldest(db, "pending", "first", None, over)
            db.execute("UPDATE meta SET value=? WHERE name='pending'", (count,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _delete_oldest(
        db: sqlite3.Connection, table: str, column: str, before: float | None, limit: int
    ) -> int:
        """Delete at most ``limit`` rows of ``table`` by its age index (older than
        ``before``, or the oldest at all when None); how many went."""
        keys = "net, domain" if table == "client" else "net, pair"
        older = f"WHERE {column} < ?" if before is not None else ""
        args: tuple[object, ...] = (before, limit) if before is not None else (limit,)
        return db.execute(
            f"DELETE FROM {table} WHERE ({keys}) IN (SELECT {keys} FROM {table}"  # noqa: S608 - names are this module's
            f" {older} ORDER BY {column} LIMIT ?)",
            args,
        ).rowcount
