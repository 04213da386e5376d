"""Sending limits per SMTP AUTH login: messages and recipients per hour, over every worker of
every listener and across restarts.

Why: a leaked password must not be able to send 100,000 messages before anyone notices.
The count lives where the AUTH guessing limits live (``pyqmail.smtpd.authguard``: the SQLite
file ``<root>/smtpd/authstate.sqlite``, WAL, a busy timeout, the set-up that waits its turn),
in its own table ``sent``: one row per login and minute (messages, recipients), so a login
costs at most 60 rows and the hour is a sliding window accurate to the minute.

- ``control/authmsgsperhour`` (default 200) and ``control/authrcptsperhour`` (default 1000),
  read with the session knobs (``pyqmail.smtpd.knobs``); 0 = no limit of that kind.
- A login that has sent ``authmsgsperhour`` messages in the last hour gets ``450 4.7.1`` at
  MAIL; one whose recipients in the last hour plus this message's reach ``authrcptsperhour``
  gets ``450 4.7.1`` at the RCPT that would pass it. Both logged ``send-limit`` with the
  login and the counts. A temporary reply: the client's queue keeps the mail and retries.
- Only messages actually queued count (after their 250), with their number of recipients:
  a refused or failed message costs nothing.
- The check reads the table on the event loop (a WAL read never waits for a writer); the
  count is written by one thread per worker, and what this worker queued but has not yet
  written is added to what it reads. Workers do not see each other's messages in flight:
  a login with sessions on several workers at once may pass the limit by the messages those
  sessions are queueing at that moment (bounded by its connections, ``maxconnip``).
- A state file that cannot be read gives ``451 4.3.0`` (fail closed, as the AUTH limits'
  ``454``): a limit that silently stops counting protects nobody.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pyqmail.authlock import StateError
from pyqmail.log import log
from pyqmail.smtpd.authguard import AuthState, state_path

WINDOW = 60  # minutes in the window (one hour)
PRUNE_EVERY = 500  # messages recorded per worker between prunes of rows out of the window

_USAGE = "SELECT sum(messages), sum(recipients) FROM sent WHERE login=? AND minute>?"
_ADD = (
    "INSERT INTO sent VALUES (?, ?, 1, ?) ON CONFLICT (login, minute) DO UPDATE"
    " SET messages=messages+1, recipients=recipients+excluded.recipients"
)
REPLY_UNAVAILABLE = "451 4.3.0 sending limits unavailable, try again later"


@dataclass(frozen=True)
class Settings:
    """Per login and hour; 0 = no limit."""

    messages: int = 200
    recipients: int = 1000

    @property
    def on(self) -> bool:
        return bool(self.messages or self.recipients)


def minute(now: float) -> int:
    """The minute ``now`` falls in (the window's unit)."""
    return int(now // 60)


class SendState(AuthState):
    """The AUTH state file's ``sent`` table (its schema is authguard's); one per thread."""

    def usage(self, login: str, now: float) -> tuple[int, int]:
        """(messages, recipients) of ``login`` in the window that ends at ``now``."""
        row = self.connect().execute(_USAGE, (login, minute(now) - WINDOW)).fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def add(self, login: str, recipients: int, now: float) -> None:
        """One more message of ``login`` with ``recipients``; prune now and then."""
        db = self.connect()
        db.execute(_ADD, (login, minute(now), recipients))
        self._finished += 1
        if self._finished % PRUNE_EVERY == 0:
            db.execute("DELETE FROM sent WHERE minute<=?", (minute(now) - WINDOW,))


class SendLimits:
    """One worker's way to the counts: reads on the loop, writes in a thread of its own."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.settings = settings
        self.reader = SendState(state_path(root))
        self.writer = SendState(state_path(root))
        self._thread = ThreadPoolExecutor(1, "sendstate")
        self._pending: dict[str, tuple[int, int]] = {}  # queued here, not yet written

    def configure(self, settings: Settings) -> None:
        """HUP: the limits of the new configuration, for messages from now on."""
        self.settings = settings

    def usage(self, login: str) -> tuple[int, int]:
        """(messages, recipients) of the last hour, this worker's unwritten ones included."""
        messages, recipients = self.reader.usage(login, time.time())
        extra = self._pending.get(login, (0, 0))
        return messages + extra[0], recipients + extra[1]

    def mail(self, login: str, ip: str) -> str | None:
        """MAIL: 450 when the login's messages of the hour are used up."""
        limit = self.settings.messages
        if not limit:
            return None
        try:
            messages, recipients = self.usage(login)
        except (sqlite3.Error, StateError) as exc:
            log("send-limit", ip=ip, user=login, error=str(exc))
            return REPLY_UNAVAILABLE
        if messages < limit:
            return None
        log("send-limit", ip=ip, user=login, messages=messages, recipients=recipients, limit=limit)
        return f"450 4.7.1 too many messages from you this hour ({messages}), try again later"

    def rcpt(self, login: str, count: int, ip: str) -> str | None:
        """RCPT: 450 when this message's ``count`` recipients would pass the hour's limit."""
        limit = self.settings.recipients
        if not limit:
            return None
        try:
            messages, recipients = self.usage(login)
        except (sqlite3.Error, StateError) as exc:
            log("send-limit", ip=ip, user=login, error=str(exc))
            return REPLY_UNAVAILABLE
        if recipients + count <= limit:
            return None
        log(
            "send-limit",
            ip=ip,
            user=login,
            messages=messages,
            recipients=recipients,
            adding=count,
            limit=limit,
        )
        return f"450 4.7.1 too many recipients from you this hour ({recipients}), try again later"

    def record(self, login: str, recipients: int) -> None:
        """A message of ``login`` was queued: count it (written in the worker's thread)."""
        if not self.settings.on:
            return
        messages, rcpts = self._pending.get(login, (0, 0))
        self._pending[login] = (messages + 1, rcpts + recipients)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._thread, self._write, login, recipients, time.time())
        future.add_done_callback(lambda f: self._written(login, recipients, f))

    def _write(self, login: str, recipients: int, now: float) -> None:
        self.writer.add(login, recipients, now)

    def _written(self, login: str, recipients: int, future: asyncio.Future[None]) -> None:
        """On the loop: the count is in the table (or could not be written: logged)."""
        messages, rcpts = self._pending.pop(login, (1, recipients))
        if messages > 1:
            self._pending[login] = (messages - 1, rcpts - recipients)
        if not future.cancelled() and future.exception() is not None:
            log("send-limit", user=login, error=f"not counted: {future.exception()}")

    def shutdown(self) -> None:
        """The worker stops: the counts queued so far are written, the files closed."""
        self._thread.submit(self.writer.close)
        self._thread.shutdown(wait=True, cancel_futures=False)
        self.reader.close()
