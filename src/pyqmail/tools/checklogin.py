"""What one IMAP/POP3 login opens: its lock, its password, its mailbox (``pyqmail-checkpassword``).

One source of users: the SMTP AUTH database (``control/smtpusers``, scrypt hashes, see
:mod:`pyqmail.authdb`) holds the passwords, ``users/mailboxes`` the mailboxes local delivery
writes to, and ``users/logins`` says which login reads which mailbox::

    login:mailbox

(one per line, ``#`` comments allowed; written by the ``pyqmail_mailboxes`` role from
``pyqmail_mailboxes__list``, the same login names as SMTP AUTH, ``root:pyqmaila 0640``: the
checker reads it with the auth group Dovecot's auth process has). Every file is read at each
login, so a changed password or a removed mailbox counts at the very next login; nothing is
cached.

A password check obeys and feeds the login lock SMTP AUTH uses (:mod:`pyqmail.authlock`,
``control/authlockfails`` and ``control/authlocktime`` read at each login too): a locked
login is refused before its password is checked (``LockedError``, known and unknown names alike,
so a lock tells nothing; the program exits 111 for it, a temporary failure), a wrong password
counts towards the lock whichever protocol it came over, a right one clears the count. Unknown
logins cost one scrypt like a wrong password (:meth:`AuthDB.verify`), so timing does not tell
which logins exist.

Separate from the program (``pyqmail.tools.checkpassword``) because this is the heavy part:
it is imported only once the program holds a slot (``pyqmail.tools.loginslots``).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from pyqmail.authdb import AuthDB, AuthDBError
from pyqmail.authlock import AccountLocks, Rule, StateError
from pyqmail.control import table
from pyqmail.control.reader import ControlError
from pyqmail.send.dotqmail import MailboxesError, parse_mailboxes

__all__ = [
    "UNUSABLE",
    "Account",
    "LockedError",
    "LoginsError",
    "lock_rule",
    "parse_logins",
    "resolve",
]

_BAD_LOGIN_CHARS = frozenset(":\x00\t\r\n ")


class LoginsError(ValueError):
    """``users/logins`` is malformed; the message names file and line."""


# A file that cannot be used: a temporary failure (exit 111), never a wrong password.
UNUSABLE = (
    OSError,
    sqlite3.Error,
    AuthDBError,
    ControlError,
    LoginsError,
    MailboxesError,
    StateError,
)


class LockedError(Exception):
    """The login is locked (``pyqmail.authlock``): refused, no password was checked."""


@dataclass(frozen=True)
class Account:
    """What a successful login gets: its mailbox and where that mailbox lives."""

    login: str
    mailbox: str
    home: Path


def parse_logins(text: str, origin: str) -> dict[str, str]:
    """``login:mailbox`` lines -> {login: mailbox}; a bad or repeated line names its place."""
    logins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        login, sep, mailbox = line.rpartition(":")
        where = f"{origin}:{number}"
        if not sep or not login or not mailbox:
            raise LoginsError(f"{where}: expected login:mailbox, got {line!r}")
        if _BAD_LOGIN_CHARS.intersection(login):
            raise LoginsError(f"{where}: login {login!r} has a forbidden character")
        if login in logins:
            raise LoginsError(f"{where}: login {login!r} is listed twice")
        logins[login] = mailbox.lower()
    return logins


def _read(path: Path) -> str:
    """A whole file, or '' when it does not exist (no logins yet is not an error)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def lock_rule(control: Path) -> Rule:
    """``authlockfails`` and ``authlocktime`` as pyqmail-smtpd reads them (``control.table``:
    one parser, one default); ControlError naming the file when one is malformed."""
    return Rule(table.AUTHLOCKFAILS.read(control), table.AUTHLOCKTIME.read(control))


def _password_ok(root: Path, login: str, password: bytes) -> bool:
    """The lock first, then scrypt, then the verdict recorded in the shared lock."""
    users = AuthDB.load(str(root / "control" / "smtpusers"))
    rule = lock_rule(root / "control")
    locks = AccountLocks(root)
    try:
        if locks.locked(login, time.time(), rule):
            raise LockedError(login)
        # verify() runs scrypt even for an unknown login: equal cost, nothing to time.
        ok = users.verify(login, password)
        locks.record(login, ok=ok, now=time.time(), rule=rule)
    finally:
        locks.close()
    return ok


def resolve(root: Path, login: str, password: bytes | None) -> Account | None:
    """The account ``login`` opens with ``password`` (None = no password check), else None.

    Raises ``LockedError`` for a locked login; one of ``UNUSABLE`` when a file is unusable:
    that is a temporary failure, never a wrong password.
    """
    logins = parse_logins(_read(root / "users" / "logins"), str(root / "users" / "logins"))
    boxes = parse_mailboxes(_read(root / "users" / "mailboxes"), str(root / "users" / "mailboxes"))
    mailbox = logins.get(login)
    home = boxes.get(mailbox) if mailbox is not None else None
    if password is not None:
        if not _password_ok(root, login, password):
            return None
    elif login not in AuthDB.load(str(root / "control" / "smtpusers")):
        return None
    if mailbox is None or home is None:
        return None
    return Account(login=login, mailbox=mailbox, home=home)
