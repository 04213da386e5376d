"""``pyqmail-users``: add, delete, list and check the SMTP AUTH users in ``control/smtpusers``.

The file format, the hashes and the atomic rewrite belong to ``pyqmail.authdb`` (which the
daemon and the Ansible module import too); this is only the command line around them. A new
password for an existing user, or a deleted user, also ends that login's open IMAP/POP3
sessions (``pyqmail.tools.dovecotkick``; ``kick`` does only that, for the mailbox role).
Logins whose sessions could not be confirmed ended stay in ``control/smtpusers.kick`` and
are tried again by every later ``add``, ``del`` and ``kick`` (``kick`` with no login: only
those).
"""

from __future__ import annotations

import grp
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyqmail.authdb import (
    DAEMON_GROUPS,
    DEFAULT_PATH,
    AuthDB,
    AuthDBError,
    User,
    atomic_write,
    change_locked,
    hash_password,
    kicks_path,
    validate_name,
    validate_password,
)
from pyqmail.tools.dovecotkick import DEFAULT_CONFIG, KickError, end_sessions, remember

if TYPE_CHECKING:
    import argparse


def _read_password(confirm: bool) -> str:
    """From the terminal (asked twice when ``confirm``) or one line of stdin; never argv."""
    if sys.stdin.isatty():
        import getpass  # noqa: PLC0415 - CLI only, kept out of the per-login import cost

        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Again: ") != password:
            raise AuthDBError("passwords do not match")
    else:
        password = sys.stdin.read()
        if password.endswith("\n"):
            password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    return validate_password(password)


def _daemon_gid() -> int | None:
    """The verifiers' group for a new file (pyqmail-smtpd reads it after dropping root)."""
    for name in DAEMON_GROUPS:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return None


def _load_or_empty(path: str) -> AuthDB:
    if not os.path.exists(path):
        return AuthDB(path=path)
    return AuthDB.load(path)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _complain(text: str) -> None:
    sys.stderr.write(f"pyqmail-users: {text}\n")


def _record(logins: list[str], config: str, pending: str) -> None:
    """Before a change: ``logins`` to the pending file. A file that cannot be written is
    said and does not stop the change (a stolen password must still be replaceable); the
    kick after it then fails the same way, exit 3."""
    try:
        remember(pending, logins, config)
    except (OSError, AuthDBError) as exc:
        _complain(f"{pending}: cannot record the logins whose sessions must end: {exc}")


def _end_sessions(logins: list[str], config: str, pending: str) -> int:
    """End the IMAP/POP3 sessions of ``logins`` and of those still pending; 0, or 3 when
    that failed (the file's change is done and stays: the message says which sessions may
    still be open, and they stay pending for the next run)."""
    try:
        done = end_sessions(logins, config, pending)
    except KickError as exc:
        _complain(
            f"{exc}; kept in {pending} for the next pyqmail-users kick (or end them by hand: "
            f"doveadm -c {config} kick LOGIN)"
        )
        return 3
    except (OSError, AuthDBError) as exc:
        _complain(
            f"{pending}: {exc}; the sessions of {', '.join(logins) or 'the logins pending'} "
            f"may still be open (end them by hand: doveadm -c {config} kick LOGIN)"
        )
        return 3
    for line in done.lines():
        _say(line)
    return 0


def _run(args: argparse.Namespace) -> int:
    path: str = args.file
    config: str = args.dovecot_config
    pending = kicks_path(path)
    if args.command == "kick" and args.record_only:
        remember(pending, args.names, config)
        return 0
    if args.command == "kick":
        return _end_sessions(args.names, config, pending)
    if args.command == "add":
        name = validate_name(args.name)
        password = _read_password(confirm=True)
        cram = password if args.cram_md5 else None
        user = User(name=name, hash=hash_password(password), cram=cram)  # scrypt before the lock
        with change_locked(path):  # read, change, replace: no other writer in between
            db = _load_or_empty(path)
            existed = name in db
            db.set(user)
            if existed:  # before the change: a crash after it still leaves the kick to do
                _record([name], config, pending)
            atomic_write(path, db.dump().encode("utf-8"), default_gid=_daemon_gid())
        _say(f"{'updated' if existed else 'added'} {name}")
        return _end_sessions([name] if existed else [], config, pending)
    if args.command == "del":
        with change_locked(path):
            db = AuthDB.load(path)
            if not db.remove(args.name):
                _complain(f"{path}: no user {args.name!r}")
                return 1
            _record([args.name], config, pending)
            atomic_write(path, db.dump().encode("utf-8"))
        _say(f"deleted {args.name}")
        return _end_sessions([args.name], config, pending)
    if args.command == "list":
        for user in _load_or_empty(path):
            _say(user.name + ("\tcram-md5" if user.cram is not None else ""))
        return 0
    db = AuthDB.load(path)  # check
    if db.verify(args.name, _read_password(confirm=False)):
        _say("ok")
        return 0
    _complain("unknown user or wrong password")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``pyqmail-users``: add, del, list and check SMTP AUTH users.

    Exit codes: 0 done, 1 no such user or wrong password, 2 bad input or unreadable file,
    3 the file was changed (or not: ``kick``) but IMAP/POP3 sessions meant to end could not
    be confirmed ended: this login's, or those of an earlier change still pending (then
    even after ``add`` of a new user); they stay pending.
    """
    import argparse  # noqa: PLC0415 - CLI only, kept out of the per-login import cost

    parser = argparse.ArgumentParser(
        prog="pyqmail-users",
        description="Manage the SMTP AUTH users of pyqmail-smtpd. Passwords are read from "
        "the terminal or from stdin, never from the command line.",
    )
    parser.add_argument("--file", default=DEFAULT_PATH, help=f"default {DEFAULT_PATH}")
    parser.add_argument(
        "--dovecot-config",
        default=DEFAULT_CONFIG,
        help="the Dovecot whose sessions of a changed or deleted user end "
        f"(default {DEFAULT_CONFIG}; no such file: none)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a user or set a new password")
    add.add_argument(
        "--cram-md5",
        action="store_true",
        help="also store a CRAM-MD5 secret (password-equivalent; off by default)",
    )
    add.add_argument("name")
    delete = sub.add_parser("del", help="remove a user")
    delete.add_argument("name")
    sub.add_parser("list", help="print user names (and whether CRAM-MD5 is on)")
    check = sub.add_parser("check", help="exit 0 if the password read matches")
    check.add_argument("name")
    end = sub.add_parser(
        "kick",
        help="end the open IMAP/POP3 sessions of these logins, and of those an earlier "
        "failed kick left in FILE.kick (no login: only those)",
    )
    end.add_argument(
        "--record-only",
        action="store_true",
        help="only record the logins in FILE.kick, for the next kick (the mailbox role, "
        "before it moves logins to other mailboxes)",
    )
    end.add_argument("names", nargs="*", metavar="name")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except AuthDBError as exc:
        _complain(str(exc))
    except OSError as exc:
        _complain(f"{exc.filename or args.file}: {exc.strerror}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
