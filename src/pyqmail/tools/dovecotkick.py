"""Ending the open IMAP/POP3 sessions of logins whose password changed or which were removed.

Dovecot checks a password once, at login (pyqmail's configuration caches nothing): a client
logged in before the admin replaced a stolen password, or removed the mailbox, goes on
reading mail over its open connection for as long as it keeps it (IDLE: days). ``doveadm
kick`` ends them; this module runs it and reads its answer, for ``pyqmail-users`` and for the
``pyqmail_mailboxes`` role (which calls ``pyqmail-users kick``).

``doveadm kick`` exits 0 when it ended sessions, 67 (``EX_NOUSER``) when the login had none,
and 75 with "net_connect_unix(.../anvil) failed" when no Dovecot listens on that
configuration's anvil socket: then no session is open either. Anything else is an error, said
with doveadm's own words: a session the admin meant to end may still be open.

A login with ``*`` or ``?`` is not passed on: doveadm reads them as wildcards (it would end
other users' sessions), and Dovecot's ``auth_username_chars`` never lets such a login in, so
it has no session.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

DEFAULT_CONFIG = "/etc/dovecot/pyqmail.conf"  # roles/pyqmail: pyqmail__dovecot_config
EX_NOUSER = 67
EX_TEMPFAIL = 75
_NOT_RUNNING = re.compile(r"net_connect_unix\(.*/anvil\) failed: (No such file|Connection refused)")
TIMEOUT = 30.0


class KickError(Exception):
    """doveadm could not say that a login's sessions are gone."""


@dataclass
class Kicked:
    """What one round of kicks did: the logins whose sessions ended, the ones that had
    none, the ones left out (wildcards), whether Dovecot is set up here (its configuration
    file exists) and whether it was running."""

    ended: list[str] = field(default_factory=list)
    had_none: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    configured: bool = True
    running: bool = True

    def lines(self) -> list[str]:
        """One line per login, for the command's output (the role reads "ended"); nothing
        where Dovecot is not set up (a host without IMAP/POP3)."""
        if not self.configured:
            return []
        out = [f"ended the IMAP/POP3 sessions of {login}" for login in self.ended]
        out += [f"no IMAP/POP3 session of {login}" for login in self.had_none]
        out += [f"left out {login}: '*' and '?' are doveadm wildcards" for login in self.skipped]
        if not self.running:
            out.append("Dovecot is not running: no IMAP/POP3 session is open")
        return out


def kick(logins: Iterable[str], config: str = DEFAULT_CONFIG) -> Kicked:
    """End the sessions of each of ``logins`` on the Dovecot of ``config``.

    No configuration file there: Dovecot was never set up, nothing to end. Raises
    ``KickError`` naming the login and doveadm's answer on anything unexpected.
    """
    done = Kicked()
    wanted = list(dict.fromkeys(logins))  # in order, once each
    done.skipped = [login for login in wanted if "*" in login or "?" in login]
    if not os.path.exists(config):
        done.configured = done.running = False
        return done
    doveadm = shutil.which("doveadm")
    if doveadm is None:
        raise KickError(f"{config} exists but doveadm is not on PATH: cannot end sessions")
    for login in wanted:
        if login in done.skipped:
            continue
        if not _kick_one(doveadm, config, login, done):
            break  # Dovecot is not running: nobody has a session
    return done


def _kick_one(doveadm: str, config: str, login: str, done: Kicked) -> bool:
    """One ``doveadm kick``; False when it found no Dovecot running."""
    try:
        proc = subprocess.run(
            [doveadm, "-c", config, "kick", login],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KickError(f"doveadm kick {login}: {exc}") from exc
    if proc.returncode == 0:
        done.ended.append(login)
        return True
    if proc.returncode == EX_NOUSER:
        done.had_none.append(login)
        return True
    if proc.returncode == EX_TEMPFAIL and _NOT_RUNNING.search(proc.stderr):
        done.running = False
        return False
    answer = (proc.stderr or proc.stdout).strip() or "no output"
    raise KickError(f"doveadm kick {login} exited {proc.returncode}: {answer}")
