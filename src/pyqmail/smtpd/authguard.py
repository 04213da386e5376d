"""AUTH guessing limits shared by every worker of every listener (465 and 587 alike).

Why: a delay slept inside each session, with failure counts per worker and per listener,
let 40 parallel connections from one address make 120 guesses in 13.8 s (8.7/s), and every
guess cost about 68 ms of scrypt CPU. The listeners are separate daemons started by
separate supervise run scripts, so the state lives outside the processes: a small SQLite
database, ``<root>/smtpd/authstate.sqlite`` (the directory belongs to the smtpd user,
mode 0700; the role creates it, the daemon creates it when it can). SQLite serialises the
writers of all processes (``BEGIN IMMEDIATE``, a busy timeout), survives a crash of any of
them at any point (its journal; WAL mode, so readers never wait) and the tables are pruned
to a fixed number of rows.

What is enforced, per client (an IPv4 address or an IPv6 /64, ``limits.limit_key``):

- one AUTH in flight at a time, over every worker and listener: an attempt takes the
  client's *lease* before it verifies; the others wait for it (polling, at most
  ``WAIT_MAX`` seconds, then ``454 4.7.0``, logged). A lease whose holder died is taken
  over (the holder's pid is gone), and it expires anyway after ``VERIFY_LEASE`` seconds.
- after a failure the lease stays taken for the penalty delay (1, 2, then 4 s for the
  client's failures within ``WINDOW``), so every next attempt from that client, on any
  connection or listener, waits it out: one guess per about 4 s per client, whatever its
  number of connections. The failing attempt also waits it out before its 535.

Per account (the name as given; unknown names alike, so a lock reveals nothing): the
login lock of ``pyqmail.authlock``, in its own file (``<root>/auth/accounts.sqlite``)
because IMAP and POP3 logins (``pyqmail-checkpassword`` under Dovecot) count and obey the
same lock: ``authlockfails`` failures within ``authlocktime`` seconds, over SMTP AUTH and
IMAP/POP3 together, lock the name for ``authlocktime`` seconds. During a lock no password
is checked and every attempt, the right password included, gets the same 535 after the
same delay: no oracle. The lock is bounded (``pyqmail.authlock``): failures during it
neither count nor extend it, it ends ``authlocktime`` seconds after it began, and a
successful login clears the count. An attacker can lock a name again afterwards only with
``authlockfails`` new failures, each paced by the per-client delay above; fail2ban
(``files/fail2ban``) bans such clients. ``authlockfails`` 0 turns the account lock off.

Per worker: at most ``authconcurrency`` password checks run at once (scrypt: about 68 ms
of CPU and 16 MiB each); the rest wait for a turn (bounded by the same ``WAIT_MAX``).

Attempts the protocol core refuses by itself (undecodable or malformed responses, names
that fail validation, a foreign authorization identity) check no password and so guess
nothing: they are only logged (``auth-fail``, for fail2ban), not counted here.

The same file holds the sending limits' counts per login and minute (table ``sent``,
``pyqmail.smtpd.sendlimits``), so both share one set-up, one start-up check and one place.

Trade-off: clients behind one NAT address share the per-client limits: after one of them
mistypes a password, the others' next AUTH may wait up to the 4 s penalty (never longer;
successes carry no penalty).
"""

from __future__ import annotations

import asyncio
import collections
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyqmail.authlock import AccountLocks, Rule, StateError, open_db
from pyqmail.smtpd.limits import limit_key

FAIL_DELAY = 1.0  # seconds of penalty after a client's first failure; doubles per failure
FAIL_MAX_DELAY = 4.0  # well below the 10 s an impatient client waits for a reply
WINDOW = 600.0  # a client's failures are forgotten after this long without one
VERIFY_LEASE = 30.0  # a lease taken to verify expires after this (its holder died or hung)
WAIT_MAX = 20.0  # seconds an attempt may wait for its turn before 454
POLL = 0.2  # seconds between looks at a lease held elsewhere
MAX_ROWS = 50_000  # per table; the oldest rows not in force go first
PRUNE_EVERY = 200  # finished attempts per process between prunes


STATE_FILE = "smtpd/authstate.sqlite"

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS client (
    key TEXT PRIMARY KEY, fails INTEGER NOT NULL, last REAL NOT NULL,
    lease_pid INTEGER NOT NULL, lease_until REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_last ON client (last);
DROP TABLE IF EXISTS account;
CREATE TABLE IF NOT EXISTS sent (
    login TEXT NOT NULL, minute INTEGER NOT NULL, messages INTEGER NOT NULL,
    recipients INTEGER NOT NULL, PRIMARY KEY (login, minute)) WITHOUT ROWID;
"""  # sent: the sending limits' counts (pyqmail.smtpd.sendlimits); account: moved to
# pyqmail.authlock (its own file, shared with pyqmail-checkpassword), dropped here


@dataclass(frozen=True)
class Settings:
    """The control files' knobs (``config.Config``), as this module needs them."""

    lock_fails: int = 10  # authlockfails; 0: no account lock
    lock_secs: int = 600  # authlocktime
    concurrency: int = 2  # authconcurrency: password checks at once per worker

    @property
    def rule(self) -> Rule:
        """The account lock's part, the one ``pyqmail-checkpassword`` applies too."""
        return Rule(self.lock_fails, self.lock_secs)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: ``ok``; else ``reason`` for the log (password, locked, busy,
    state-error) and ``delay`` to wait before the 535; ``temporary``: answer 454."""

    ok: bool
    reason: str = ""
    delay: float = 0.0
    temporary: bool = False


def state_path(root: Path) -> Path:
    return root / STATE_FILE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def penalty(fails: int) -> float:
    """Seconds a client waits after its ``fails``-th failure in a row."""
    return float(min(FAIL_DELAY * 2 ** min(fails - 1, 16), FAIL_MAX_DELAY))


class AuthState:
    """The SQLite file, and the login locks (``pyqmail.authlock``) of the root this file is
    in (``<root>/smtpd/authstate.sqlite``). One connection per process, used from one
    thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accounts = AccountLocks(path.parent.parent)
        self._db: sqlite3.Connection | None = None
        self._finished = 0

    @classmethod
    def check(cls, path: Path) -> None:
        """At start and on HUP: the file can be created and written (a clear error if not)."""
        state = cls(path)
        try:
            state.connect()
        finally:
            state.close()

    def connect(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_db(self.path, _SCHEMA, "the AUTH state", self._prepare)
        return self._db

    def _prepare(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)

    def close(self) -> None:
        self.accounts.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    def begin(
        self, key: str, user: str, now: float, pid: int, settings: Settings
    ) -> tuple[str, float]:
        """Take the client's lease: ("go" | "locked", 0) or ("wait", seconds)."""
        db = self.connect()
        row = db.execute("SELECT lease_pid, lease_until FROM client WHERE key=?", (key,)).fetchone()
        if _held(row, now):  # a cheap read first: no write lock while someone holds it
            return "wait", float(row[1]) - now
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT lease_pid, lease_until FROM client WHERE key=?", (key,)
            ).fetchone()
            if _held(row, now):
                return "wait", float(row[1]) - now
            db.execute(
                "INSERT INTO client VALUES (?, 0, ?, ?, ?) ON CONFLICT (key) DO UPDATE"
                " SET lease_pid=excluded.lease_pid, lease_until=excluded.lease_until",
                (key, now, pid, now + VERIFY_LEASE),
            )
        finally:
            db.execute("COMMIT")
        try:
            locked = self.accounts.locked(user, now, settings.rule)
        except (StateError, sqlite3.Error):
            self.release(key)
            raise
        return ("locked" if locked else "go"), 0.0

    def finish(
        self, key: str, user: str, *, ok: bool, locked: bool, now: float, settings: Settings
    ) -> float:
        """Record the verdict and release the lease; returns the penalty delay (0 if ok).
        On failure the lease stays taken for that delay (nobody holds it: pid 0)."""
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            if ok:
                db.execute("UPDATE client SET lease_pid=0, lease_until=0 WHERE key=?", (key,))
                delay = 0.0
            else:
                delay = self._fail(db, key, now)
        finally:
            db.execute("COMMIT")
            self._finished += 1
        if not locked:
            self.accounts.record(user, ok=ok, now=now, rule=settings.rule)
        if self._finished % PRUNE_EVERY == 0:
            self.prune(now)
        return delay

    @staticmethod
    def _fail(db: sqlite3.Connection, key: str, now: float) -> float:
        """The client's failure count and penalty lease (inside the caller's transaction)."""
        row = db.execute("SELECT fails, last FROM client WHERE key=?", (key,)).fetchone()
        fails = (int(row[0]) if row is not None and now - float(row[1]) <= WINDOW else 0) + 1
        delay = penalty(fails)
        db.execute(
            "INSERT INTO client VALUES (?, ?, ?, 0, ?) ON CONFLICT (key) DO UPDATE"
            " SET fails=excluded.fails, last=excluded.last, lease_pid=0,"
            " lease_until=excluded.lease_until",
            (key, fails, now, now + delay),
        )
        return delay

    def release(self, key: str) -> None:
        """Give the lease back without a verdict (the attempt could not be made)."""
        self.connect().execute("UPDATE client SET lease_pid=0, lease_until=0 WHERE key=?", (key,))

    def prune(self, now: float) -> None:
        """Forget clients that no longer matter, then cap the table at MAX_ROWS rows (the
        login locks prune themselves: ``AccountLocks.record``)."""
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM client WHERE last < ? AND lease_until < ?", (now - WINDOW, now))
            (count,) = db.execute("SELECT count(*) FROM client").fetchone()
            if count > MAX_ROWS:
                # the leases in force go last
                db.execute(
                    "DELETE FROM client WHERE key IN (SELECT key FROM client"
                    " ORDER BY lease_until > ?, last LIMIT ?)",
                    (now, count - MAX_ROWS),
                )
        finally:
            db.execute("COMMIT")

    def rows(self) -> tuple[int, int]:
        """(client rows, login lock rows): for tests and curious admins."""
        clients = self.connect().execute("SELECT count(*) FROM client").fetchone()[0]
        return int(clients), self.accounts.rows()


def _held(row: tuple[int, float] | None, now: float) -> bool:
    """The lease is in force: a penalty (pid 0) until it ends, a check while its holder
    lives (a dead worker's lease is taken over)."""
    if row is None or float(row[1]) <= now:
        return False
    return int(row[0]) == 0 or _alive(int(row[0]))


class Slots:
    """At most ``limit`` password checks of a worker at once, a limit a HUP may change while
    checks run and others wait (``authconcurrency``). A semaphore swapped for a new one on
    HUP broke both: a check that took a turn of the old one gave it back to the new one,
    raising it above its limit for good, and the old one's waiters were never woken (454
    after ``WAIT_MAX`` with turns free). Here every turn is counted in one place and a new
    limit wakes as many waiters as it allows, first come first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        """Take a turn, waiting for one in order (cancellable: a turn handed over just as
        the wait is cancelled is given back)."""
        if self.busy < self.limit and not self._waiters:
            self.busy += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn  # counted in ``busy`` by whoever resolved it
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()
            elif turn in self._waiters:  # a cancelled turn ``_wake`` has not dropped yet
                self._waiters.remove(turn)
            raise

    def release(self) -> None:
        """Give a turn back; the first waiter gets it."""
        self.busy -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        """A new limit from now on: waiters get the turns a larger one frees at once; with a
        smaller one, checks already running finish and no new one starts until under it."""
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.busy < self.limit:
            turn = self._waiters.popleft()
            if not turn.done():
                self.busy += 1
                turn.set_result(None)


class AuthGuard:
    """One worker's way to the shared state: every database call runs in one thread of
    its own (SQLite may wait for a lock; the event loop must not), password checks in a
    pool bounded by ``settings.concurrency``."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.state = AuthState(state_path(root))
        self.settings = settings
        self._db_thread = ThreadPoolExecutor(1, "authstate")
        self._verify_pool = ThreadPoolExecutor(64, "auth")  # threads only as the semaphore lets
        self._verifying = Slots(settings.concurrency)
        self._local: dict[str, tuple[asyncio.Lock, int]] = {}  # per client: lock, users

    def configure(self, settings: Settings) -> None:
        """HUP: new knobs for attempts that start from now on."""
        self._verifying.resize(settings.concurrency)
        self.settings = settings

    def shutdown(self) -> None:
        self._verify_pool.shutdown(wait=False, cancel_futures=True)
        self._db_thread.submit(self.state.close)
        self._db_thread.shutdown(wait=True, cancel_futures=False)

    async def _db(self, func: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, lambda: func(*args, **kwargs))

    async def attempt(self, ip: str, user: str, verify: Callable[[], bool]) -> Outcome:
        """Wait for the client's turn, check the password (unless the name is locked),
        record the verdict. Never raises for a state problem: that is a 454."""
        key = limit_key(ip)
        lock, users = self._local.get(key, (asyncio.Lock(), 0))
        self._local[key] = (lock, users + 1)  # only one session per client here polls
        deadline = asyncio.get_running_loop().time() + WAIT_MAX
        try:
            async with asyncio.timeout_at(deadline):
                await lock.acquire()
        except TimeoutError:
            self._forget(key)
            return Outcome(ok=False, reason="busy", temporary=True)
        try:
            return await self._attempt(key, user, verify, deadline)
        except (StateError, sqlite3.Error) as exc:
            return Outcome(ok=False, reason=f"state-error:{exc}", temporary=True)
        finally:
            lock.release()
            self._forget(key)

    def _forget(self, key: str) -> None:
        lock, users = self._local[key]
        if users == 1:
            del self._local[key]
        else:
            self._local[key] = (lock, users - 1)

    async def _attempt(
        self, key: str, user: str, verify: Callable[[], bool], deadline: float
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        settings = self.settings
        while True:
            verdict, wait = await self._db(
                self.state.begin, key, user, time.time(), os.getpid(), settings
            )
            if verdict != "wait":
                break
            if loop.time() + min(wait, POLL) > deadline:
                return Outcome(ok=False, reason="busy", temporary=True)
            await asyncio.sleep(min(wait, POLL))
        locked = verdict == "locked"
        ok = False
        if not locked:
            try:
                await asyncio.wait_for(self._verifying.acquire(), deadline - loop.time())
            except TimeoutError:
                await self._db(self.state.release, key)
                return Outcome(ok=False, reason="busy", temporary=True)
            try:
                ok = await loop.run_in_executor(self._verify_pool, verify)
            finally:
                self._verifying.release()
        delay = await self._db(
            self.state.finish, key, user, ok=ok, locked=locked, now=time.time(), settings=settings
        )
        if ok:
            return Outcome(ok=True)
        return Outcome(ok=False, reason="locked" if locked else "password", delay=delay)
