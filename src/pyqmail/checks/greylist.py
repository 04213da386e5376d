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
from a neighbour), the envelope sender and the recipient, both lower case. The decision is
made at RCPT, per recipient. Who skips it: relay clients and authenticated sessions (the
core asks only for clients that may not relay), clients on a ``dnswl`` allow list and
clients whose tcprules entry sets ``RBLSMTPD`` empty (a known host, ``checks.dnsbl``).

State: ``<root>/smtpd/greylist.sqlite``, beside the AUTH state (``smtpd.authguard``) and
opened by the same ``open_db`` (``pyqmail.authlock``): WAL mode, a busy timeout, the set-up retried
while another worker holds the lock, so every worker of every listener shares it and it
survives restarts. The call is made on the worker's loop (one indexed read and at most one
small write, no fsync with ``synchronous=NORMAL``); the busy timeout is short
(``BUSY_TIMEOUT_MS``), and any database problem lets the recipient through (logged
``greylist=error``): greylisting never blocks mail because of itself.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from pyqmail.authlock import StateError, open_db
from pyqmail.checks.verdict import Verdict

STATE_FILE = "smtpd/greylist.sqlite"
BUSY_TIMEOUT_MS = 250
SET_UP_WAIT = 2.0  # seconds the first connection of a worker may wait to set the file up
PRUNE_EVERY = 500  # decisions per process between prunes
MAX_ROWS = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplet (
    net TEXT NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
    first REAL NOT NULL, last REAL NOT NULL, passed INTEGER NOT NULL,
    PRIMARY KEY (net, sender, rcpt)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS triplet_last ON triplet (last);
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


class Greylist:
    """One process's connection to the shared state (opened at the first decision)."""

    def __init__(self, root: Path) -> None:
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

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def check(self, ip: str, sender: str, rcpt: str, settings: Settings, now: float) -> Verdict:
        """Decide for one recipient; never raises for a database problem (accept, logged)."""
        try:
            return self._decide(network(ip), sender.lower(), rcpt.lower(), settings, now)
        except (sqlite3.Error, OSError, StateError) as exc:
            self.close()
            return Verdict("accept", 250, "", f"greylist=error:{type(exc).__name__}")

    def _decide(self, net: str, sender: str, rcpt: str, settings: Settings, now: float) -> Verdict:
        db = self.connect()
        key = (net, sender, rcpt)
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT first, last, passed FROM triplet WHERE net=? AND sender=? AND rcpt=?", key
            ).fetchone()
            if row is None or float(row[1]) + settings.lifetime < now:
                db.execute(
                    "INSERT OR REPLACE INTO triplet VALUES (?, ?, ?, ?, ?, 0)", (*key, now, now)
                )
                state, left = "new", settings.delay
            elif int(row[2]):
                db.execute(
                    "UPDATE triplet SET last=? WHERE net=? AND sender=? AND rcpt=?", (now, *key)
                )
                state, left = "known", 0
            elif now >= float(row[0]) + settings.delay:
                db.execute(
                    "UPDATE triplet SET last=?, passed=1 WHERE net=? AND sender=? AND rcpt=?",
                    (now, *key),
                )
                state, left = "pass", 0
            else:
                state, left = "early", max(1, int(float(row[0]) + settings.delay - now + 0.999))
        finally:
            db.execute("COMMIT")
        self._decisions += 1
        if self._decisions % PRUNE_EVERY == 0:
            self.prune(settings, now)
        if left:
            text = f"Greylisted, please try again in {left} seconds"
            return Verdict("defer", 451, text, f"greylist={state} greylist_wait={left}")
        return Verdict("accept", 250, "", f"greylist={state}")

    def prune(self, settings: Settings, now: float) -> None:
        """Forget triplets not seen within the lifetime; cap the table at MAX_ROWS."""
        db = self.connect()
        db.execute("DELETE FROM triplet WHERE last < ?", (now - settings.lifetime,))
        (count,) = db.execute("SELECT count(*) FROM triplet").fetchone()
        if count > MAX_ROWS:
            db.execute(
                "DELETE FROM triplet WHERE (net, sender, rcpt) IN"
                " (SELECT net, sender, rcpt FROM triplet ORDER BY last LIMIT ?)",
                (count - MAX_ROWS,),
            )
