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

The triplet: the client's network, its IPv4 /24 or IPv6 /64 (a sender's pool of outgoing
servers retries from a neighbour), the envelope sender as ``greysender.normalise`` makes it
(BATV tags stripped, SRS undone, ``+extensions`` dropped, digit runs of the local part made
``#``, as postgrey does: a sender whose address changes with every message becomes known),
and the recipient, both lower case. The decision is made at RCPT, per recipient. Who skips
it: relay clients and authenticated sessions (the core asks only for clients that may not
relay), clients on a ``dnswl`` allow list and clients whose tcprules entry sets ``RBLSMTPD``
empty (a known host, ``checks.dnsbl``), and clients greylisting has come to know (below).

The bounds count by *source*: the /24 of an IPv4 client, the /48 of an IPv6 one. A /64 is
one network, but an IPv6 customer is given a /48 or a /56 (65,536 or 256 /64s): counted by
/64 alone, one customer would be thousands of sources and could push everybody else out.
(Customers given /56s out of one /48 share it as a source: residential pools, rarely mail
servers.)

State: ``<root>/smtpd/greylist3.sqlite``, beside the AUTH state (``smtpd.authguard``), opened
by the same ``open_db`` (``pyqmail.authlock``): WAL mode, a busy timeout, the set-up retried
while another worker holds the lock, so every worker of every listener shares it and it
survives restarts. Three tables, so that a flood of new triplets cannot push out what passed:

- ``client``: (network, sender domain) pairs whose triplets passed ``AUTO_ALLOW`` times,
  ``COUNT_APART`` seconds apart (postgrey's ``--auto-whitelist-clients``): consulted first,
  they skip greylisting (logged ``greylist=client``); forgotten by age (``greylistlifetime``
  unseen), and a pair unseen that long counts its passes from one again even while its row
  waits for the prune: what it did before it was forgotten never counts. A pair's first
  pass makes its row, so ``client`` is kept at ``MAX_CLIENTS`` rows as ``passed`` is (the
  sender retrying through fresh sender domains adds a row at each pass). Making the row
  only at a pair's second counted pass would not bound it (two passes a minute apart per
  fresh domain), and could not keep the count exact: ``passed`` knows neither a triplet's
  sender domain nor when its pass counted (its ``last`` moves with each use, its rows are
  evicted), so the first pass would need those bytes there instead of here.
- ``passed``: the triplets that came back after the delay; forgotten by age, and kept at
  ``MAX_PASSED`` at most: over it, the source holding the most passed triplets loses its
  oldest (passes cost a sender only patience: one retrying through fresh sender domains
  would fill the disk otherwise).
- ``pending``: the triplets waiting for their retry, at most ``PENDING_PER_NET`` per network,
  ``PENDING_PER_SOURCE`` per source and ``MAX_PENDING`` in all. At any cap, only a row whose
  retry is no longer due (first seen ``greylistdelay`` and ``RETRY_GRACE`` ago) is evicted to
  make room: the network's or the source's own, or at ``MAX_PENDING`` those of the source
  holding the most first (``_evict_stale``). With none, the newcomer is deferred all the same
  but not stored (logged ``greylist=full``) and stored at a later retry; at ``MAX_PENDING``
  that is so for the biggest source's newcomers only, anybody else's is accepted unstored
  (``greylist=full``, no wait: greylisting fails open, as on an error). Senders retry a fixed
  time after their first attempt, in the order they came: evicting the oldest pending
  triplets evicted those about to pass, and a sender with more new triplets than the cap had
  every retry greylisted again. ``client`` and ``passed`` are never evicted for pending ones.

Every table is bounded, but not every source is protected. One source cannot fill
``pending`` (``PENDING_PER_SOURCE``); many sources filling it with young rows (``MAX_PENDING``
new triplets within ``RETRY_GRACE``) let the newcomers of all but the biggest through
ungreylisted until the rows go stale. At ``MAX_PASSED`` and ``MAX_CLIENTS`` the rule takes
from the source holding the *most* rows, which is a flood only when the flood comes from few
sources: an attacker with many sources each holding few rows (thousands of IPv6 /48s, or of
/24s) is never the biggest, and the eviction falls on whoever holds most, possibly a
legitimate busy sender whose passed triplets and known pairs go. No simple rule found tells
such a flood from a busy sender.

A network is stored packed (``place``: the source's address bytes and the /64 within it),
sender and recipient as a 16-byte BLAKE2b hash of the pair, the sender domain as one too (no
log or check needs them back): a row is a few dozen bytes whatever the addresses. The rows of
the three tables are counted as they come and go, per source (``held``, indexed by count:
the source holding the most is one lookup) and in all (``meta``), in the transaction that
adds or deletes them: a worker that dies in the middle leaves no count wrong, and no
``count(*)`` over a table runs. The prune (every ``PRUNE_EVERY`` decisions) deletes at most
``PRUNE_BATCH`` rows of each table by their age index, then at most ``PRUNE_BATCH`` of a table
over its cap: its time is bounded whatever the size of the file. Measured with 400,000
passed triplets (about 125 bytes each, indexes and counts included): 2000 of one source
evicted, 0.02 s; 2000 scattered over 20,000 sources of the same size, or 2000 forgotten by
age, 0.08 to 0.1 s of CPU (the s35 layout, without per-source counts and index: 0.03 s);
2000 of 200,000 ``client`` rows (about 100 bytes each), 0.02 s from one source, 0.04 s
scattered over 20,000. Counting the ``client`` rows costs a pass about 0.05 ms of CPU
(0.26 ms instead of 0.21, 20,000 rows in each table); other decisions, nothing.

Each decision is one ``BEGIN IMMEDIATE`` transaction (workers decide one after the other),
made on the worker's loop: a few indexed reads and small writes, no fsync with
``synchronous=NORMAL``; the busy timeout is short (``BUSY_TIMEOUT_MS``), and any database
problem lets the recipient through (logged ``greylist=error``): greylisting never blocks mail
because of itself. The files of the older formats (``OLD_STATE_FILES``) go before the
workers serve (``move_before_serving``; a worker's first decision does it otherwise): s35's
``greylist2.sqlite`` once its newest passed triplets and known clients are moved into this
file (``greyupgrade``: its pending triplets and older rows are greylisted once more; a move
that fails sets it aside as ``greylist2.sqlite.failed-move``); the raw addresses of
``greylist.sqlite``, or an s35 file that cannot be read, are not kept (logged: their
triplets are greylisted once more).
"""

from __future__ import annotations

import hashlib
import ipaddress
import sqlite3
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyqmail.authlock import StateError, open_db
from pyqmail.checks.greysender import normalise
from pyqmail.checks.greyupgrade import remove_old, upgrade
from pyqmail.checks.verdict import Verdict
from pyqmail.log import log

STATE_FILE = "smtpd/greylist3.sqlite"
OLD_STATE_FILES = (
    "smtpd/greylist.sqlite",  # before s35: raw addresses, one capped table: removed
    "smtpd/greylist2.sqlite",  # s35: text networks, no counts: moved over (greyupgrade)
)
BUSY_TIMEOUT_MS = 250
SET_UP_WAIT = 2.0  # seconds the first connection of a worker may wait to set the file up
PRUNE_EVERY = 500  # decisions per process between prunes
PRUNE_BATCH = 2000  # rows of each table one prune deletes at most
AUTO_ALLOW = 5  # passed triplets of a (network, sender domain) that make it a known client
COUNT_APART = 60  # seconds between two passes that both count towards AUTO_ALLOW
PENDING_PER_NET = 1000  # pending triplets one network (IPv4 /24, IPv6 /64) may have
MAX_PENDING = 1_000_000  # pending triplets of all sources together
PENDING_PER_SOURCE = 50_000
"""Pending triplets one source (an IPv6 /48; an IPv4 /24 is one network) may have. Without
it, one /48 sending from a thousand /64s, each under ``PENDING_PER_NET``, held ``pending``
full of young rows as long as it kept sending (``MAX_PENDING`` new triplets within the delay
and ``RETRY_GRACE``): every newcomer from anyone was deferred unstored for days. Fifty
networks' worth: ten times Microsoft 365's 5000 new triplets of one delay from its /48.
At it, only the source's own stale rows make room; with none, its newcomer waits unstored."""
RETRY_GRACE = 4000
"""Seconds past ``greylistdelay`` a deferred sender may still be on its way back: a pending
triplet younger than the delay and this is never evicted to make room (at a cap, a newcomer
is deferred without being stored instead). Senders retry a fixed time after their own first
attempt, in the order they came, so the oldest pending triplets are the ones about to pass:
evicting them starves a busy sender for good (every retry new again). Postfix's longest
retry interval (``maximal_backoff_time``) is 4000 s; Exim retries every 15 minutes for the
first two hours, sendmail's queue runs are commonly an hour apart."""
MAX_PASSED = 5_000_000  # passed triplets of all sources together (about 125 bytes each)
MAX_CLIENTS = 1_000_000  # (network, sender domain) pairs of all sources together
EVICT_ROUNDS = 64  # sources one prune takes rows from, the biggest first, before the oldest
HASH_BYTES = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    unit BLOB NOT NULL, sub INTEGER NOT NULL, pair BLOB NOT NULL, first REAL NOT NULL,
    PRIMARY KEY (unit, sub, pair)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_first ON pending (first);
CREATE INDEX IF NOT EXISTS pending_unit ON pending (unit, first);
CREATE TABLE IF NOT EXISTS passed (
    unit BLOB NOT NULL, sub INTEGER NOT NULL, pair BLOB NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (unit, sub, pair)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS passed_last ON passed (last);
CREATE INDEX IF NOT EXISTS passed_unit ON passed (unit, last);
CREATE TABLE IF NOT EXISTS client (
    unit BLOB NOT NULL, sub INTEGER NOT NULL, domain BLOB NOT NULL,
    passes INTEGER NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (unit, sub, domain)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_last ON client (last);
CREATE INDEX IF NOT EXISTS client_unit ON client (unit, last);
CREATE TABLE IF NOT EXISTS held (
    kind TEXT NOT NULL, unit BLOB NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (kind, unit)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS held_most ON held (kind, n);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('pending', 0);
INSERT OR IGNORE INTO meta VALUES ('passed', 0);
INSERT OR IGNORE INTO meta VALUES ('client', 0);
"""
# each table: the column that tells its rows of one network apart, the one it ages by
_COLUMNS = {"pending": ("pair", "first"), "passed": ("pair", "last"), "client": ("domain", "last")}


@dataclass(frozen=True)
class Settings:
    """``greylistdelay`` and ``greylistlifetime``; delay 0: off."""

    delay: int = 0
    lifetime: int = 2_592_000

    @property
    def active(self) -> bool:
        return self.delay > 0


def place(ip: str) -> tuple[bytes, int]:
    """(source, network within it) of a client, packed: ``4`` and the /24 of an IPv4 address
    (also an IPv4-mapped IPv6 one), network 0; ``6`` and the /48 of an IPv6 address, and its
    /64 within the /48 (0 to 65535). 4 or 7 bytes and a small integer where the text of a
    network would take 15 to 25 bytes, in each row and each index of the file."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    packed = addr.packed
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\x04" + packed[:3], 0
    return b"\x06" + packed[:6], int.from_bytes(packed[6:8], "big")


def digest(*parts: str) -> bytes:
    """The fixed-size key of the addresses (NUL cannot be in an SMTP path)."""
    data = "\0".join(parts).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


@dataclass(frozen=True)
class Key:
    """One recipient's triplet as stored: the source, the network within it (the two are the
    triplet's network), the pair's hash, the sender domain's."""

    unit: bytes
    sub: int
    pair: bytes
    domain: bytes | None  # None: the null sender (or none with a domain): never a known client

    @classmethod
    def of(cls, ip: str, sender: str, rcpt: str) -> Key:
        """The null sender has no domain to come to know: bounces from a network must not
        make it a known client, or any ``MAIL FROM:<>`` spam from it would skip the delay."""
        who = normalise(sender)
        at, domain = who.rpartition("@")[1:]
        known = digest(domain) if at and domain else None
        return cls(*place(ip), digest(who, rcpt.lower()), known)

    @property
    def triplet(self) -> tuple[bytes, int, bytes]:
        return self.unit, self.sub, self.pair


def _tally(db: sqlite3.Connection, table: str, counts: Mapping[bytes, int]) -> None:
    """Count rows of ``table`` in (positive) or out, per source and in all: in the same
    transaction as the rows themselves, so the counts are right whenever the rows are."""
    total = 0
    for unit, n in counts.items():
        if not n:
            continue
        total += n
        (left,) = db.execute(
            "INSERT INTO held VALUES (?, ?, ?) ON CONFLICT (kind, unit) DO UPDATE"
            " SET n=n+excluded.n RETURNING n",
            (table, unit, n),
        ).fetchone()
        if left <= 0:  # a source that holds nothing has no row: the table stays its size
            db.execute("DELETE FROM held WHERE kind=? AND unit=?", (table, unit))
    if total:
        db.execute("UPDATE meta SET value=max(value+?, 0) WHERE name=?", (total, table))


def _stale(settings: Settings, now: float) -> float:
    """Pending triplets first seen before this may be evicted: no retry of theirs is due
    any more (``RETRY_GRACE`` past the delay; past the lifetime they are forgotten anyway)."""
    return now - min(settings.delay + RETRY_GRACE, settings.lifetime)


def _drop(
    db: sqlite3.Connection,
    table: str,
    where: str,
    args: tuple[object, ...],
    limit: int,
    *,
    order: str | None = None,
) -> int:
    """Delete the oldest ``limit`` rows of a table that ``where`` selects (found by an
    index: the age one or the source's; ``order``, the age column as ``where`` spells it),
    counted out; how many went."""
    key, age = _COLUMNS[table]
    gone = db.execute(
        f"DELETE FROM {table} WHERE (unit, sub, {key}) IN (SELECT unit, sub, {key} FROM {table}"  # noqa: S608 - names are this module's
        f" {where} ORDER BY {order or age} LIMIT ?) RETURNING unit",
        (*args, limit),
    ).fetchall()
    counted = Counter(unit for (unit,) in gone)
    _tally(db, table, {unit: -n for unit, n in counted.items()})
    return len(gone)


def _evict(db: sqlite3.Connection, table: str, budget: int) -> None:
    """``budget`` rows of ``table`` over its cap go: the oldest of the source holding the
    most, down to the next biggest (or a sixteenth of its rows when they hold as many),
    source after source; only when the biggest holds one row, or after ``EVICT_ROUNDS``
    sources, the oldest anywhere. A flood from one source, however spread over its
    networks, is what goes, not the one triplet a correspondent waits to retry."""
    for _ in range(EVICT_ROUNDS):
        top = db.execute(
            "SELECT unit, n FROM held WHERE kind=? ORDER BY n DESC LIMIT 2", (table,)
        ).fetchall()
        if budget <= 0 or not top or top[0][1] <= 1:
            break
        most, second = int(top[0][1]), int(top[1][1]) if len(top) > 1 else 0
        take = min(budget, max(most - second, -(-most // 16)))
        budget -= _drop(db, table, "WHERE unit=?", (top[0][0],), take)
    if budget > 0:
        _drop(db, table, "", (), budget)


def _evict_stale(db: sqlite3.Connection, budget: int, stale: float) -> int:
    """At most ``budget`` pending triplets first seen before ``stale`` go (no retry of theirs
    can still be on its way, ``RETRY_GRACE``): those of the source holding the most first,
    source after source (``EVICT_ROUNDS``), then the oldest anywhere; how many went. The
    source (an IPv6 /48) only ranks who loses: no young row goes, whoever holds it."""
    if db.execute("SELECT 1 FROM pending WHERE first < ? LIMIT 1", (stale,)).fetchone() is None:
        return 0  # a full table of young rows: one index probe, not EVICT_ROUNDS
    gone = 0
    biggest = db.execute(
        "SELECT unit FROM held WHERE kind='pending' ORDER BY n DESC LIMIT ?", (EVICT_ROUNDS,)
    ).fetchall()
    for (unit,) in biggest:
        if gone >= budget:
            return gone
        gone += _drop(db, "pending", "WHERE unit=? AND first < ?", (unit, stale), budget - gone)
    if gone < budget:
        gone += _drop(db, "pending", "WHERE first < ?", (stale,), budget - gone)
    return gone


def _pending_held(db: sqlite3.Connection, unit: bytes) -> int:
    """Pending triplets the source holds, as counted (``held``)."""
    row = db.execute("SELECT n FROM held WHERE kind='pending' AND unit=?", (unit,)).fetchone()
    return int(row[0]) if row is not None else 0


def move_before_serving(root: Path, settings: Settings) -> None:
    """s35's file moved into the current one before any worker serves: pyqmail-smtpd's
    spawner calls this after reading the configuration, before it forks the workers (and
    the one process of ``--workers 1`` before it serves), as the daemon's user, who owns
    the files. A worker moving it at its first decision held its sessions (53 s with
    1,000,000 passed triplets) while the other workers' decisions waited 2 s each and
    accepted (``greylist=error``); now at most 22 s (``greyupgrade.MOVED``), once, before
    the port is served. A failure to open the current file is logged and left to the
    first decision, as before (never a reason not to serve)."""
    if not settings.active or not (root / OLD_STATE_FILES[1]).exists():
        return
    grey = Greylist(root)
    try:
        grey.connect()
    except (sqlite3.Error, OSError, StateError) as exc:
        text = "the older greylist state not moved before serving; the first decision will"
        log("warning", text=text, error=f"{type(exc).__name__}: {exc}")
    finally:
        grey.close()


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
            db = open_db(
                self.path,
                _SCHEMA,
                "the greylist",
                self._prepare,
                busy_ms=BUSY_TIMEOUT_MS,
                set_up_wait=SET_UP_WAIT,
            )
            try:
                caps = {"passed": MAX_PASSED, "client": MAX_CLIENTS}
                upgrade(db, self.root / OLD_STATE_FILES[1], self.path, place, caps)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _prepare(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        remove_old(self.root / OLD_STATE_FILES[0], "raw addresses, not kept")

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
        where = key.triplet
        passed = db.execute(
            "SELECT last FROM passed WHERE unit=? AND sub=? AND pair=?", where
        ).fetchone()
        if passed is not None and passed[0] >= horizon:
            db.execute("UPDATE passed SET last=? WHERE unit=? AND sub=? AND pair=?", (now, *where))
            return "known", 0
        row = db.execute(
            "SELECT first FROM pending WHERE unit=? AND sub=? AND pair=?", where
        ).fetchone()
        if row is not None and row[0] >= horizon:
            if now < row[0] + settings.delay:
                return "early", max(1, int(row[0] + settings.delay - now + 0.999))
            self._pass(db, key, now, horizon, replaces=passed is not None)
            return "pass", 0
        if row is not None:  # expired: it starts again
            db.execute(
                "UPDATE pending SET first=? WHERE unit=? AND sub=? AND pair=?", (now, *where)
            )
        elif (room := self._add_pending(db, key, now, _stale(settings, now))) != "stored":
            return "full", settings.delay if room == "defer" else 0
        return "new", settings.delay

    def _known_client(self, db: sqlite3.Connection, key: Key, now: float, horizon: float) -> bool:
        """The (network, sender domain) passed ``AUTO_ALLOW`` times and was seen within the
        lifetime: it skips greylisting (and is seen now)."""
        where = (key.unit, key.sub, key.domain)
        row = db.execute(
            "SELECT passes, last FROM client WHERE unit=? AND sub=? AND domain=?", where
        )
        client = row.fetchone()
        if client is None or client[0] < AUTO_ALLOW or client[1] < horizon:
            return False
        db.execute("UPDATE client SET last=? WHERE unit=? AND sub=? AND domain=?", (now, *where))
        return True

    def _pass(
        self, db: sqlite3.Connection, key: Key, now: float, horizon: float, replaces: bool
    ) -> None:
        """A pending triplet came back in time: it moves to ``passed``, and its (network,
        sender domain) counts one more pass towards ``AUTO_ALLOW`` if its last counted pass
        is ``COUNT_APART`` seconds old (postgrey's rule: the recipients of one message, or a
        burst of retries, count once, so a client is known after several deliveries, not
        after one message to five recipients). A pair unseen for the lifetime starts again
        at one: passes it made before it was forgotten never count (its row may wait for
        the prune long after)."""
        gone = db.execute(
            "DELETE FROM pending WHERE unit=? AND sub=? AND pair=?", key.triplet
        ).rowcount
        _tally(db, "pending", {key.unit: -gone})
        db.execute("INSERT OR REPLACE INTO passed VALUES (?, ?, ?, ?)", (*key.triplet, now))
        if not replaces:  # a row forgotten but not yet pruned is replaced, not added
            _tally(db, "passed", {key.unit: 1})
        if key.domain is None:  # the null sender: no domain to come to know
            return
        pair = (key.unit, key.sub, key.domain)
        client = db.execute(
            "SELECT last FROM client WHERE unit=? AND sub=? AND domain=?", pair
        ).fetchone()
        if client is None:  # a row more: counted, like those of pending and passed
            db.execute("INSERT INTO client VALUES (?, ?, ?, 1, ?)", (*pair, now))
            _tally(db, "client", {key.unit: 1})
        elif now >= client[0] + COUNT_APART:
            db.execute(
                "UPDATE client SET passes=CASE WHEN last < ? THEN 1 ELSE passes+1 END, last=?"
                " WHERE unit=? AND sub=? AND domain=?",
                (horizon, now, *pair),
            )

    def _add_pending(self, db: sqlite3.Connection, key: Key, now: float, stale: float) -> str:
        """Store a new pending triplet (``stored``), or say why not: ``defer`` (deferred all
        the same, not stored: it tries again later) or ``open`` (accepted unstored).

        Its network at ``PENDING_PER_NET`` (counted over its rows alone: a primary key range,
        at most the cap), or its source at ``PENDING_PER_SOURCE`` (``held``: one lookup),
        makes room only by evicting its own rows first seen before ``stale``; with none,
        ``defer``. Evicting the oldest pending triplets (those about to be retried) would
        greylist every retry again, forever. At ``MAX_PENDING``, anybody's stale rows go
        (``_evict_stale``, the biggest source's first); with none, the biggest source's
        newcomer is deferred and anybody else's accepted (``open``, logged ``greylist=full``
        as ``greylist=error`` is): a table full of young rows from many sources must not
        shut greylisting for every new correspondent until they go stale."""
        net = (key.unit, key.sub)
        (count,) = db.execute("SELECT count(*) FROM pending WHERE unit=? AND sub=?", net).fetchone()
        over = count - PENDING_PER_NET + 1
        if over > 0:  # +first: the network's primary key range, not the /48's age index
            where = "WHERE unit=? AND sub=? AND +first < ?"
            if _drop(db, "pending", where, (*net, stale), over, order="+first") < over:
                return "defer"
        over = _pending_held(db, key.unit) - PENDING_PER_SOURCE + 1
        mine = "WHERE unit=? AND first < ?"  # the source's age index (unit, first)
        if over > 0 and _drop(db, "pending", mine, (key.unit, stale), over) < over:
            return "defer"
        (total,) = db.execute("SELECT value FROM meta WHERE name='pending'").fetchone()
        over = total - MAX_PENDING + 1
        if over > 0 and _evict_stale(db, over, stale) < over:
            most = db.execute("SELECT max(n) FROM held WHERE kind='pending'").fetchone()[0]
            return "defer" if _pending_held(db, key.unit) >= int(most or 0) else "open"
        db.execute("INSERT INTO pending VALUES (?, ?, ?, ?)", (*key.triplet, now))
        _tally(db, "pending", {key.unit: 1})
        return "stored"

    def prune(self, settings: Settings, now: float) -> None:
        """Forget, by age, at most ``PRUNE_BATCH`` rows of each table; then, of each table
        over its cap (``MAX_PENDING``, ``MAX_PASSED``, ``MAX_CLIENTS``), at most
        ``PRUNE_BATCH`` more (``_evict``; of ``pending`` only stale rows, ``_evict_stale``:
        it is over its cap only if the cap was lowered). One transaction, bounded work: the
        counts are read, not made."""
        db = self.connect()
        horizon = now - settings.lifetime
        caps = {"pending": MAX_PENDING, "passed": MAX_PASSED, "client": MAX_CLIENTS}
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, (_, age) in _COLUMNS.items():
                _drop(db, table, f"WHERE {age} < ?", (horizon,), PRUNE_BATCH)
            for table, cap in caps.items():
                (count,) = db.execute("SELECT value FROM meta WHERE name=?", (table,)).fetchone()
                if count > cap and table == "pending":  # none that may still be retried
                    _evict_stale(db, min(count - cap, PRUNE_BATCH), _stale(settings, now))
                elif count > cap:
                    _evict(db, table, min(count - cap, PRUNE_BATCH))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
