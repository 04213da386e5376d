"""``pyqmail-checkpassword``: Dovecot's IMAP/POP3 logins checked against pyqmail's own users.

The program speaks DJB's checkpassword interface (https://cr.yp.to/checkpwd/interface.html)
with Dovecot's extensions, as ``passdb { driver = checkpassword }`` and
``userdb { driver = checkpassword }`` run it::

    pyqmail-checkpassword [--root R] [--mail-user U] [--mail-group G] [--concurrency N]
                          PROG [ARGS...]

It reads ``login NUL password NUL timestamp NUL`` (at most 512 bytes) from descriptor 3,
takes one of N password check slots (``pyqmail.tools.loginslots``: at most N checkers work at
once, default twice the CPUs; none free within 5 s: exit 111), then checks the login
(``pyqmail.tools.checklogin``: the login lock SMTP AUTH shares, the scrypt hash of
``control/smtpusers``, the mailbox through ``users/logins`` and ``users/mailboxes``). On
success it sets ``USER``, ``HOME`` (the mailbox home) and ``userdb_uid``/``userdb_gid`` (the
delivery user and group, so Dovecot opens the Maildir as the user that delivers into it) and
executes PROG (Dovecot's ``checkpassword-reply``). Exit 1 = wrong password or unknown login,
111 = temporary failure (a locked login, known or unknown alike: no password was checked, so
the attempt tested nothing, and Dovecot's "Child ... exited with status 111" is not the line
fail2ban counts; a file cannot be read; no slot in time), 2 = called wrongly.
With ``AUTHORIZED=1`` (Dovecot's userdb lookup, no password involved) an unknown login exits 3
and a known one sets ``AUTHORIZED=2``. ``CREDENTIALS_LOOKUP`` (a mechanism that needs the
plain password, such as CRAM-MD5) is refused: the hashes cannot give it; Dovecot is
configured for PLAIN and LOGIN only.

This module imports only what the wait for a slot needs (``os``, ``sys``, ``fcntl``, not even
``typing``): under a login flood the waiting checkers are many and each should cost little
(about 7 MB of private memory, against 35 MB for one that checks a password). Messages go
to stderr, which Dovecot writes to its log; the password never appears in them.
"""

from __future__ import annotations

import os
import sys

from pyqmail import authdir
from pyqmail.tools import loginslots

__all__ = ["main", "parse_args"]

MAX_REQUEST = 512  # the checkpassword interface's limit (Dovecot sends at most this)
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3  # Dovecot's "user unknown" for userdb lookups
EXIT_TEMP = 111


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
    " [--concurrency N] PROGRAM [ARGS...]\n"
    "Checks login NUL password NUL timestamp NUL from descriptor 3 against pyqmail's users"
    " (control/smtpusers, users/logins, users/mailboxes, the login locks in auth/) and runs"
    " PROGRAM (Dovecot's checkpassword-reply) on success; at most N checks at once (default"
    " twice the CPUs)."
)
_OPTIONS = {
    "--root": "root",
    "--mail-user": "mail_user",
    "--mail-group": "mail_group",
    "--concurrency": "concurrency",
}


class Options:
    """The command line; parsed by hand because argparse (and even dataclasses) cost
    milliseconds and megabytes per login."""

    def __init__(self) -> None:
        self.root = "/var/qmail"
        self.mail_user = "pyqmails"
        self.mail_group = "pyqmail"
        self.concurrency = ""  # "": loginslots.default_slots()
        self.program: list[str] = []

    @property
    def slots(self) -> int:
        """``--concurrency`` as a number; 0 when not given (then: the default)."""
        return loginslots.parse_slots(self.concurrency) if self.concurrency else 0


def parse_args(argv: list[str]) -> Options:
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
    if opts.concurrency:  # checked now: a bad value is a usage error, not a 111 per login
        loginslots.parse_slots(opts.concurrency)
    if not args:
        raise ValueError(f"no program to run after a successful login\n{USAGE}")
    opts.program = args
    return opts


def _take_slot(opts: Options) -> str | None:
    """Hold a slot until exit or exec; None, or the reason for a temporary failure."""
    try:
        loginslots.take(opts.root, opts.slots or loginslots.default_slots())
    except loginslots.BusyError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot take a password check slot: {exc} ({authdir.problem(opts.root)})"
    return None


def _check(opts: Options, login: str, password: bytes | None) -> int | dict[str, str]:
    """The login checked (after the slot: the heavy imports are made here): an exit status,
    or the environment of the reply program."""
    from pathlib import Path  # noqa: PLC0415 - after the slot: a waiting checker stays small

    from pyqmail.tools import checklogin  # noqa: PLC0415 - the same

    try:
        account = checklogin.resolve(Path(opts.root), login, password)
    except checklogin.LockedError:
        where = os.environ.get("TCPREMOTEIP", "-")
        _complain(f"login {login!r} from {where} is locked: refused, no password checked")
        # 111, not 1: a locked login is a temporary failure (the client retries later, it
        # does not ask its user for another password), and it tested no password, so it
        # must not count for fail2ban: Dovecot logs 1 as "Login failed", 111 as an error.
        return EXIT_TEMP
    except checklogin.UNUSABLE as exc:
        _complain(f"temporary failure: {exc}")
        return EXIT_TEMP
    if account is None:
        return EXIT_UNKNOWN if password is None else EXIT_FAIL
    return {
        "USER": account.login,
        "HOME": str(account.home),
        "userdb_uid": opts.mail_user,
        "userdb_gid": opts.mail_group,
        "EXTRA": "userdb_uid userdb_gid",
    }


def main(argv: list[str] | None = None) -> int:
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
    busy = _take_slot(args)
    if busy is not None:
        _complain(busy)
        return EXIT_TEMP
    login, password = request
    outcome = _check(args, login, None if lookup_only else password)
    if isinstance(outcome, int):
        return outcome
    os.environ.update(outcome)
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
