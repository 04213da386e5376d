"""How many ``pyqmail-checkpassword`` processes check a login at once: N slots, one flock each.

Why: Dovecot 2.3 forks one checker per login straight from its auth process
(``db-checkpassword.c``: no auth-worker, so no ``process_limit`` applies, and no limit of its
own), and by default lets about 200 logins wait for it at once (``process_limit`` 100 for
each of imap-login and pop3-login). Each checker is a Python process plus a 16 MiB scrypt
(35 MB and 0.23 s measured): a login flood could take 7 GB and every core.

So a checker first takes one of N slots, the lock files ``<root>/auth/login-slot.<i>``
(``pyqmail.authdir``: the directory the password verifiers share) held with ``flock``: the
kernel frees a slot when its holder exits or dies (nothing to clean up after a crash), and
the descriptor is close-on-exec, so the reply program a successful checker becomes does not
hold it. The slot is taken before anything heavy is imported: a waiting checker is about
6 MB of private memory, a checking one 35 MB.

N: ``--concurrency`` (the role's ``pyqmail_dovecot__checkpassword_concurrency``), by default
twice the CPUs this process may run on, at most ``MAX_SLOTS`` (256). A waiting checker holds a
descriptor on every slot file, so N must stay well under the descriptors a process may open
(often 1024: ``ulimit -n``), or every login fails with EMFILE; 256 checkers at once is also
already about 9 GB of scrypt, beyond any sensible setting. A checker that gets no slot within
``WAIT`` seconds exits 111, the checkpassword temporary failure: Dovecot answers the client
"temporary authentication failure" and the client tries again later. A flood then costs N
checking processes, plus waiting ones (at most Dovecot's login limit, each for ``WAIT``
seconds).
"""

from __future__ import annotations

import fcntl
import os
import time

from pyqmail import authdir

WAIT = 5.0  # seconds a checker waits for a slot before its 111
POLL = 0.05  # seconds between looks at the slots
MAX_SLOTS = 256  # each waiting checker opens them all: well under a 1024 fd limit
SLOT_NAME = "login-slot."


class BusyError(Exception):
    """No slot came free in time; the message says how many there are."""


def default_slots() -> int:
    """Twice the CPUs this process may run on (its affinity, not the machine's count), at most
    ``MAX_SLOTS``."""
    return min(2 * len(os.sched_getaffinity(0)), MAX_SLOTS)


def parse_slots(text: str) -> int:
    """``--concurrency``'s value; ValueError naming it when it is not 1 to MAX_SLOTS."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_SLOTS:
        raise ValueError(f"--concurrency {text}: expected a whole number from 1 to {MAX_SLOTS}")
    return int(text)


def _open_all(root: str, slots: int) -> list[int]:
    """A descriptor for each slot file, first the one this pid prefers (spread the load)."""
    where = authdir.make_dir(root)
    fds: list[int] = []
    try:
        for n in range(slots):
            index = (os.getpid() + n) % slots
            path = os.path.join(where, f"{SLOT_NAME}{index}")
            fds.append(authdir.open_file(path, os.O_RDONLY))  # flock needs no write access
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def take(root: str, slots: int, wait: float | None = None) -> int:
    """Hold a free slot: returns its descriptor (kept open until this process exits or
    executes another program). BusyError after ``wait`` (default ``WAIT``) seconds without one;
    OSError when the slot files cannot be opened or made."""
    fds = _open_all(root, slots)
    deadline = time.monotonic() + (WAIT if wait is None else wait)
    while True:
        for fd in fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            for other in fds:
                if other != fd:
                    os.close(other)
            return fd
        if time.monotonic() >= deadline:
            for fd in fds:
                os.close(fd)
            raise BusyError(
                f"busy: all {slots} password check slots taken for"
                f" {WAIT if wait is None else wait:g} s (--concurrency)"
            )
        time.sleep(POLL)
