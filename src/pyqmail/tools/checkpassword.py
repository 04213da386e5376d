"""``pyqmail-checkpassword``: Dovecot's IMAP/POP3 logins checked against pyqmail's own users.

One source of users: the SMTP AUTH database (``control/smtpusers``, scrypt hashes, see
:mod:`pyqmail.authdb`) holds the passwords, ``users/mailboxes`` the mailboxes local delivery
writes to, and ``users/logins`` says which login reads which mailbox::

    login:mailbox

(one per line, ``#`` comments allowed; written by the ``pyqmail_mailboxes`` role from
``pyqmail_mailboxes__list``, the same login names as SMTP AUTH). Every file is read at each
login, so a changed password or a removed mailbox counts at the very next login; nothing is
cached.

The program speaks DJB's checkpassword interface (https://cr.yp.to/checkpwd/interface.html)
with Dovecot's extensions, as ``passdb { driver = checkpassword }`` and
``userdb { driver = checkpassword }`` run it::

    pyqmail-checkpassword [--root R] [--mail-user U] [--mail-group G] PROG [ARGS...]

It reads ``login NUL password NUL timestamp NUL`` (at most 512 bytes) from descriptor 3. On
success it sets ``USER``, ``HOME`` (the mailbox home) and ``userdb_uid``/``userdb_gid`` (the
delivery user and group, so Dovecot opens the Maildir as the user that delivers into it) and
executes PROG (Dovecot's ``checkpassword-reply``). Exit 1 = wrong password or unknown login,
111 = temporary failure (a file cannot be read), 2 = called wrongly. With ``AUTHORIZED=1``
(Dovecot's userdb lookup, no password involved) an unknown login exits 3 and a known one sets
``AUTHORIZED=2``. ``CREDENTIALS_LOOKUP`` (a mechanism that needs the plain password, such as
CRAM-MD5) is refused: the hashes cannot give it; Dovecot is configured for PLAIN and LOGIN only.

Unknown logins cost one scrypt like a wrong password (:meth:`AuthDB.verify`), so timing does not
tell which logins exist. Messages go to stderr, which Dovecot writes to its log; the password
never appears in them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.authdb import AuthDB, AuthDBError
from pyqmail.send.dotqmail import MailboxesError, parse_mailboxes

__all__ = ["LoginsError", "main", "parse_logins", "resolve"]

MAX_REQUEST = 512  # the checkpassword interface's limit (Dovecot sends at most this)
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3  # Dovecot's "user unknown" for userdb lookups
EXIT_TEMP = 111
_BAD_LOGIN_CHARS = frozenset(":\x00\t\r\n ")


class LoginsError(ValueError):
    """``users/logins`` is malformed; the message names file and line."""


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


def resolve(root: Path, login: str, password: bytes | None) -> Account | None:
    """The account ``login`` opens with ``password`` (None = no password check), else None.

    Raises OSError, AuthDBError, MailboxesError or LoginsError when a file is unusable:
    that is a temporary failure, never a wrong password.
    """
    logins = parse_logins(_read(root / "users" / "logins"), str(root / "users" / "logins"))
    boxes = parse_mailboxes(_read(root / "users" / "mailboxes"), str(root / "users" / "mailboxes"))
    mailbox = logins.get(login)
    home = boxes.get(mailbox) if mailbox is not None else None
    if password is not None:
        users = AuthDB.load(str(root / "control" / "smtpusers"))
        # verify() runs scrypt even for an unknown login: equal cost, nothing to time.
        if not users.verify(login, password):
            return None
    elif login not in AuthDB.load(str(root / "control" / "smtpusers")):
        return None
    if mailbox is None or home is None:
        return None
    return Account(login=login, mailbox=mailbox, home=home)


def _read_request(fd: int) -> tuple[str, bytes] | None:
    """``login NUL password NUL ...`` from ``fd``; None when malformed or too long."""
    data = b""
    while len(data) <= MAX_REQUEST:
        chunk = os.read(fd, MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
    os.close(fd)
    fields = data.split(b"\0")
    if len(data) > MAX_REQUEST or len(fields) < 3:
        return None
    try:
        login = fields[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return login, fields[1]


def _complain(text: str) -> None:
    sys.stderr.write(f"pyqmail-checkpassword: {text}\n")


USAGE = (
    "usage: pyqmail-checkpassword [--root DIR] [--mail-user USER] [--mail-group GROUP]"
    " PROGRAM [ARGS...]\n"
    "Checks login NUL password NUL timestamp NUL from descriptor 3 against pyqmail's users"
    " (control/smtpusers, users/logins, users/mailboxes) and runs PROGRAM (Dovecot's"
    " checkpassword-reply) on success."
)
_OPTIONS = {"--root": "root", "--mail-user": "mail_user", "--mail-group": "mail_group"}


@dataclass
class Options:
    """The command line; parsed by hand because argparse alone costs milliseconds per login."""

    root: str = "/var/qmail"
    mail_user: str = "pyqmails"
    mail_group: str = "pyqmail"
    program: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """``--option value`` pairs, then the program and its arguments; ValueError says why not."""
    opts = Options()
    args = list(argv)
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--help":
            raise ValueError(USAGE)
        if flag not in _OPTIONS or not args:
            raise ValueError(f"unknown option or missing value: {flag}\n{USAGE}")
        setattr(opts, _OPTIONS[flag], args.pop(0))
    if not args:
        raise ValueError(f"no program to run after a successful login\n{USAGE}")
    opts.program = args
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Check one login; exec the reply program on success (does not return then)."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        _complain(str(exc))
        return EXIT_USAGE
    lookup_only = os.environ.get("AUTHORIZED") == "1"
    if lookup_only and os.environ.get("CREDENTIALS_LOOKUP") == "1":
        _complain("credentials lookup refused: only PLAIN and LOGIN work with scrypt hashes")
        return EXIT_FAIL
    try:
        request = _read_request(3)
    except OSError as exc:
        _complain(f"cannot read descriptor 3: {exc.strerror}")
        return EXIT_USAGE
    if request is None:
        _complain("malformed request on descriptor 3")
        return EXIT_FAIL
    login, password = request
    try:
        account = resolve(Path(args.root), login, None if lookup_only else password)
    except (OSError, AuthDBError, MailboxesError, LoginsError) as exc:
        _complain(f"temporary failure: {exc}")
        return EXIT_TEMP
    if account is None:
        return EXIT_UNKNOWN if lookup_only else EXIT_FAIL
    os.environ.update(
        USER=account.login,
        HOME=str(account.home),
        userdb_uid=args.mail_user,
        userdb_gid=args.mail_group,
        EXTRA="userdb_uid userdb_gid",
    )
    if lookup_only:
        os.environ["AUTHORIZED"] = "2"
    try:
        # The checkpassword interface: replace this process with the reply program.
        os.execv(args.program[0], args.program)  # noqa: S606
    except OSError as exc:
        _complain(f"cannot run {args.program[0]}: {exc.strerror}")
    return EXIT_TEMP


if __name__ == "__main__":
    sys.exit(main())
