"""Ending the open IMAP/POP3 sessions of logins whose password changed or which were removed.

Dovecot checks a password once, at login (pyqmail's configuration caches nothing): a client
logged in before the admin replaced a stolen password, or removed the mailbox, goes on
reading mail over its open connection for as long as it keeps it (IDLE: days). ``doveadm
kick`` ends them; this module runs it and reads its answer, for ``pyqmail-users`` and for the
``pyqmail_mailboxes`` role (which calls ``pyqmail-users kick``).

``doveadm kick`` (Dovecot 2.3, ``doveadm-kick.c``) exits 0 and prints "kicked connections
from the following users" when it ended sessions; 68 (``DOVEADM_EX_NOTFOUND``, which is
``EX_NOHOST``) with "no users kicked" when the login had none; 75 with
"net_connect_unix(.../anvil) failed" when no Dovecot listens on that configuration's anvil
socket, so no session is open either. Anything else, and an exit 0 that ended nothing (its
warning that a process serving other users too would need ``-f``), is an error said with
doveadm's own words: a session the admin meant to end may still be open. Every login is
tried; the error names each one whose sessions were not confirmed gone.

doveadm reads its argument as a mask: a login with ``*`` or ``?`` (wildcards) or one that
parses as an IP address or network (``who_parse_args``, with ``inet_aton``'s lenient forms:
``127.1``, ``4711``) would end other users' sessions, so such a login is left out, and said;
Dovecot's ``auth_username_chars`` never lets ``*`` or ``?`` in, and pyqmail's logins are
addresses. The login goes after ``--`` (one starting with
``-`` is not an option). The match is case-insensitive: kicking ``Alice@example.org`` ends
``alice@example.org``'s sessions too, the same mailbox's login as Dovecot knows it.

A kick that fails is not forgotten: the logins whose sessions must still end are kept in
``control/smtpusers.kick`` (``pyqmail.authdb.kicks_path``), recorded before the change they
come from by whoever changes ``control/smtpusers`` (``pyqmail-users``, the
``pyqmail_smtp_user`` module where Dovecot is set up), and rewritten after each round
without the lines it read for the logins confirmed (removed once nothing is left). A
login recorded again while a round is under way has a second line, which that round does
not take out: its kick may have come before that change. Every later ``pyqmail-users kick``,
``add`` or ``del``, and so every later run of the mailbox role, tries them again: re-running
a play that failed here, or died before its kick, ends the sessions although nothing changes
in that run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyqmail.authdb import add_kicks, drop_kicks, read_kicks, validate_name

DEFAULT_CONFIG = "/etc/dovecot/pyqmail.conf"  # roles/pyqmail: pyqmail__dovecot_config
EX_NOTFOUND = 68  # doveadm.h: DOVEADM_EX_NOTFOUND = EX_NOHOST
EX_TEMPFAIL = 75
ENDED = "kicked connections from"
_NOT_RUNNING = re.compile(r"net_connect_unix\(.*/anvil\) failed: (No such file|Connection refused)")
TIMEOUT = 30.0
DOVEADM_DIRS = "/usr/bin:/usr/sbin:/usr/local/bin"  # after $PATH (an apt hook's PATH may be bare)


class KickError(Exception):
    """doveadm could not say that some login's sessions are gone (each one named, and
    listed in ``logins``)."""

    def __init__(self, message: str, logins: list[str]) -> None:
        super().__init__(message)
        self.logins = logins


@dataclass
class Kicked:
    """What one round of kicks did: the logins whose sessions ended, the ones that had
    none, the ones left out (masks), whether Dovecot is set up here (its configuration file
    exists), installed (doveadm is there) and running."""

    ended: list[str] = field(default_factory=list)
    had_none: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    configured: bool = True
    installed: bool = True
    running: bool = True

    def lines(self) -> list[str]:
        """One line per login, for the command's output (the role reads "ended"), sorted in
        each kind (the logins come in the order they were recorded); nothing where Dovecot is
        not set up (a host without IMAP/POP3)."""
        if not self.configured:
            return []
        out = [f"ended the IMAP/POP3 sessions of {login}" for login in sorted(self.ended)]
        out += [f"no IMAP/POP3 session of {login}" for login in sorted(self.had_none)]
        out += [f"left out {x}: doveadm would read it as a mask" for x in sorted(self.skipped)]
        if not self.installed:
            out.append("Dovecot is not installed (no doveadm): no IMAP/POP3 session is open")
        elif not self.running:
            out.append("Dovecot is not running: no IMAP/POP3 session is open")
        return out


def kick(logins: Iterable[str], config: str = DEFAULT_CONFIG) -> Kicked:
    """End the sessions of each of ``logins`` on the Dovecot of ``config``.

    No configuration file there: Dovecot was never set up, nothing to end. Every login is
    tried; then ``KickError`` names each one doveadm did not answer for as expected.
    """
    done = Kicked()
    wanted = list(dict.fromkeys(logins))  # in order, once each
    done.skipped = [login for login in wanted if is_mask(login)]
    if not os.path.exists(config):
        done.configured = done.running = False
        return done
    doveadm = shutil.which("doveadm") or shutil.which("doveadm", path=DOVEADM_DIRS)
    if doveadm is None:  # the package is gone (its configuration file stays): nothing runs
        done.installed = done.running = False
        return done
    failed: list[KickError] = []
    for login in wanted:
        if login in done.skipped:
            continue
        try:
            if not _kick_one(doveadm, config, login, done):
                break  # Dovecot is not running: nobody has a session
        except KickError as exc:
            failed.append(exc)  # the others are still tried
    if failed:
        raise KickError("; ".join(map(str, failed)), [x for exc in failed for x in exc.logins])
    return done


def remember(path: str, logins: Iterable[str], config: str = DEFAULT_CONFIG) -> None:
    """Add ``logins`` to the pending file ``path`` (``authdb.kicks_path``), durably, before
    the change that makes their sessions stale: a crash between the change and the kick
    leaves them to the next round. Nothing where Dovecot is not set up (no session can be
    open). A login that could not be one line of the file raises AuthDBError."""
    wanted = [validate_name(login) for login in logins]
    if os.path.exists(config):
        add_kicks(path, wanted)


def end_sessions(logins: Iterable[str], config: str, pending: str) -> Kicked:
    """Kick ``logins`` and every login still pending from an earlier round, then take out
    of the pending file the lines read for those confirmed (all but ``KickError``'s): what
    another writer recorded meanwhile, a login already there included, stays for the next
    round. Where Dovecot is not set up, nothing can be open: every line read is confirmed.
    The file is not locked during the kicks (up to ``TIMEOUT`` each), only while it is read
    and while it is rewritten."""
    logins = list(logins)  # (checked by remember, which refuses one that is no login)
    try:
        remember(pending, logins, config)
        recorded = read_kicks(pending) if os.path.exists(config) else []
    except OSError:  # a file that cannot be written or read: ``logins`` are still kicked now
        recorded = []
    wanted = list(dict.fromkeys([*logins, *recorded]))
    try:
        done = kick(wanted, config) if wanted else Kicked(configured=os.path.exists(config))
    except KickError as exc:
        with contextlib.suppress(OSError):  # the error names them all the same
            _keep(pending, [login for login in recorded if login not in exc.logins], exc.logins)
        raise
    with contextlib.suppress(OSError):  # they are gone; a stale line only kicks again
        _keep(pending, recorded if done.configured else read_kicks(pending), [])
    return done


def _keep(pending: str, confirmed: list[str], failed: list[str]) -> None:
    """After a round: the lines read for the confirmed logins out of the pending file (with
    no file, no lock file is made), the failed ones in where they are not (recorded again
    if recording failed before)."""
    if os.path.exists(pending):
        drop_kicks(pending, confirmed)
    add_kicks(pending, failed, again=False)


def is_mask(login: str) -> bool:
    """Whether doveadm kick would read ``login`` as something else than one user's name: a
    wildcard, or what Dovecot's ``net_parse_range`` takes for an address or a network. That
    parser reads IPv4 with ``inet_aton``, which also takes ``127.1``, ``0x7f.1``, ``017.0.0.1``
    and a bare number (``4711``, ``0/0``: every client), not only ``10.0.0.1`` and
    ``10.0.0.0/8``; IPv6 with ``inet_pton``, brackets allowed."""
    if "*" in login or "?" in login:
        return True
    address = login.split("/", 1)[0]
    try:
        socket.inet_aton(address)
    except OSError:
        pass
    else:
        return True
    if ":" in address:
        try:
            socket.inet_pton(socket.AF_INET6, address.strip("[]"))
        except OSError:
            return False
        return True
    return False


def _kick_one(doveadm: str, config: str, login: str, done: Kicked) -> bool:
    """One ``doveadm kick``; False when it found no Dovecot running."""
    try:
        proc = subprocess.run(
            [doveadm, "-c", config, "kick", "--", login],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KickError(f"doveadm kick {login}: {exc}", [login]) from exc
    if proc.returncode == 0 and ENDED in proc.stdout:
        done.ended.append(login)
        return True
    if proc.returncode == EX_NOTFOUND:
        done.had_none.append(login)
        return True
    if proc.returncode == EX_TEMPFAIL and _NOT_RUNNING.search(proc.stderr):
        done.running = False
        return False
    answer = " ".join((proc.stderr + proc.stdout).split()) or "no output"
    raise KickError(f"doveadm kick {login} exited {proc.returncode}: {answer}", [login])
