"""pyqmail-checkpassword under attack: the login lock it shares with SMTP AUTH, and the bound on
password checks at once.

The checker runs as a process exactly as Dovecot's auth runs it (request on descriptor 3,
Dovecot's own ``checkpassword-reply`` on success), through a probe that marks in a file when
each password check (``AuthDB.verify``: the scrypt) starts and ends, and can make it slow. The
SMTP side is pyqmail-smtpd's own ``AuthGuard`` on the same root.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyqmail import authdb
from pyqmail.smtpd import authguard
from pyqmail.smtpd.authguard import Settings
from pyqmail.tools import loginslots

REPLY = "/usr/lib/dovecot/checkpassword-reply"
LOGIN = "alice@mx.test"
FAILS = 3  # control/authlockfails here

# The checker's main() with AuthDB.verify wrapped: "start"/"end" lines with the time (one
# clock for every process) around each check, which sleeps HOLD seconds first; CPU pins the
# checker to one CPU (its default slot count is then 2); WAIT replaces the slot wait;
# PROBE_NOFILE in the environment sets the soft limit of open files (ulimit -n).
PROBE = """
import os, sys, time
log, hold, cpu, wait = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
if os.environ.get("PROBE_NOFILE"):
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(os.environ["PROBE_NOFILE"]), hard))
os.dup2(int(sys.argv[5]), 3)
os.dup2(int(sys.argv[6]), 4)
if cpu:
    os.sched_setaffinity(0, {int(cpu)})
if wait:
    from pyqmail.tools import loginslots
    loginslots.WAIT = float(wait)
from pyqmail import authdb
real = authdb.AuthDB.verify
def mark(what):
    with open(log, "a") as f:
        f.write(f"{what} {os.getpid()} {time.monotonic()}\\n")
def verify(self, name, password):
    mark("start")
    try:
        time.sleep(hold)
        return real(self, name, password)
    finally:
        mark("end")
authdb.AuthDB.verify = verify
from pyqmail.tools.checkpassword import main
sys.exit(main(sys.argv[7:]))
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for sub in ("control", "users"):
        (tmp_path / sub).mkdir()
    users = authdb.AuthDB([authdb.User(LOGIN, authdb.hash_password("secret"))])
    (tmp_path / "control" / "smtpusers").write_text(users.dump())
    (tmp_path / "control" / "authlockfails").write_text(f"{FAILS}\n")
    (tmp_path / "users" / "mailboxes").write_text("alice:/var/vmail/alice\n")
    (tmp_path / "users" / "logins").write_text(f"{LOGIN}:alice\n")
    return tmp_path


class Checker:
    """One pyqmail-checkpassword process through the probe."""

    def __init__(self, root: Path, request: bytes, *opts: str, hold: float = 0.0, **kw: str):
        self.log = root / "checks.log"
        req_r, req_w = os.pipe()
        rep_r, self._rep_w = os.pipe()
        os.write(req_w, request)
        os.close(req_w)
        argv = [sys.executable, "-c", PROBE, str(self.log), str(hold), kw.get("cpu", "")]
        argv += [kw.get("wait", ""), str(req_r), str(self._rep_w), "--root", str(root), *opts]
        argv += ["--mail-user", "pyqmails", "--mail-group", "pyqmail", REPLY]
        self.proc = subprocess.Popen(
            argv,
            pass_fds=(req_r, self._rep_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # ORIG_UID: Dovecot sets it; checkpassword-reply refuses to answer without it.
            env={
                **os.environ,
                "ORIG_UID": str(os.getuid()),
                "TCPREMOTEIP": "192.0.2.7",
                "PROBE_NOFILE": kw.get("nofile", ""),
            },
        )
        os.close(req_r)
        self._rep_r = rep_r

    def wait(self) -> tuple[int, str, str]:
        """(exit status, what the reply program wrote, stderr)."""
        _, err = self.proc.communicate(timeout=60)
        os.close(self._rep_w)
        with os.fdopen(self._rep_r, "rb") as f:
            reply = f.read().decode()
        return self.proc.returncode, reply, err.decode()


def check(root: Path, password: str, login: str = LOGIN) -> tuple[int, str, str]:
    return Checker(root, f"{login}\0{password}\0\0".encode()).wait()


def checks_started(root: Path) -> int:
    log = root / "checks.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(line.startswith("start ") for line in lines)


def smtp_auth(root: Path, password_ok: bool, ip: str, login: str = LOGIN) -> authguard.Outcome:
    """One SMTP AUTH through pyqmail-smtpd's guard (its own worker), from ``ip``."""
    guard = authguard.AuthGuard(root, Settings(lock_fails=FAILS, lock_secs=600))
    try:
        return asyncio.run(guard.attempt(ip, login, lambda: password_ok))
    finally:
        guard.shutdown()


@pytest.mark.parametrize("login", [LOGIN, "nobody@mx.test"])
def test_a_login_smtp_auth_locked_is_refused_before_its_password_is_checked(
    root: Path, login: str
) -> None:
    """Known and unknown names alike: one scrypt each while not locked (timing tells
    nothing), none once locked (the lock tells nothing either: unknown names lock too)."""
    assert check(root, "secret", login)[0] == (0 if login == LOGIN else 1)
    assert checks_started(root) == 1
    # a botnet on 465/587, one guess per address (an unknown name's IMAP failure counted)
    for i in range(FAILS if login == LOGIN else FAILS - 1):
        assert smtp_auth(root, False, f"198.51.100.{i}", login).reason == "password"
    status, reply, err = check(root, "secret", login)  # the right password (for alice)
    # 111, a temporary failure: no password was tested, so not Dovecot's "Login failed"
    # line that fail2ban counts, and the client retries instead of asking for a password
    assert (status, reply) == (111, ""), err
    assert checks_started(root) == 1, "a locked login had its password checked"
    assert f"login {login!r} from 192.0.2.7 is locked" in err
    assert "secret" not in err


def test_imap_failures_lock_the_login_for_smtp_auth(root: Path) -> None:
    for _ in range(FAILS):
        assert check(root, "wrong")[0] == 1
    outcome = smtp_auth(root, True, "203.0.113.9")  # the right password, a fresh client
    assert (outcome.ok, outcome.reason) == (False, "locked")
    assert check(root, "secret")[0] == 111, "IMAP itself lets a locked login in"
    assert check(root, "wrong")[0] == 111, "a locked login had a password checked"


def test_failures_over_both_count_together_and_a_right_password_clears_them(root: Path) -> None:
    assert check(root, "wrong")[0] == 1
    assert smtp_auth(root, False, "198.51.100.1").reason == "password"
    assert check(root, "secret")[0] == 0  # clears the two
    assert check(root, "wrong")[0] == 1
    assert smtp_auth(root, False, "198.51.100.2").reason == "password"
    assert smtp_auth(root, True, "198.51.100.3").ok, "a cleared count still locked"
    assert check(root, "wrong")[0] == 1
    assert smtp_auth(root, False, "198.51.100.4").reason == "password"
    assert check(root, "wrong")[0] == 1  # the third in a row, over both: locked
    assert smtp_auth(root, True, "198.51.100.5").reason == "locked"


def _peak(root: Path) -> int:
    """The most password checks that ever ran at once, from the probes' marks."""
    events = []
    for line in (root / "checks.log").read_text().splitlines():
        what, _pid, when = line.split()
        events.append((float(when), 1 if what == "start" else -1))
    running = peak = 0
    for _, step in sorted(events):
        running += step
        peak = max(peak, running)
    return peak


def test_checkers_beyond_twice_the_cpus_wait_for_a_slot(root: Path) -> None:
    """Pinned to one CPU a checker allows itself two slots by default: of four started
    together, two check at once and the other two wait their turn (and get in)."""
    cpu = str(min(os.sched_getaffinity(0)))
    request = f"{LOGIN}\0secret\0\0".encode()
    checkers = [Checker(root, request, hold=1.0, cpu=cpu) for _ in range(4)]
    results = [c.wait() for c in checkers]
    assert [r[0] for r in results] == [0, 0, 0, 0], [r[2] for r in results]
    assert checks_started(root) == 4
    assert _peak(root) == 2


def test_a_checker_without_a_slot_in_time_is_a_temporary_failure(root: Path) -> None:
    request = f"{LOGIN}\0secret\0\0".encode()
    holder = Checker(root, request, "--concurrency", "1", hold=3.0)
    deadline = time.monotonic() + 20
    while checks_started(root) == 0:  # the one slot is taken
        assert time.monotonic() < deadline, holder.proc.stderr
        time.sleep(0.05)
    late = [Checker(root, request, "--concurrency", "1", wait="0.5") for _ in range(2)]
    for status, reply, err in (c.wait() for c in late):
        assert (status, reply) == (111, "")
        assert "busy: all 1 password check slots taken for 0.5 s" in err
    assert holder.wait()[0] == 0
    assert checks_started(root) == 1


@pytest.mark.parametrize("value", ["0", "many", "257", "1024"])
def test_a_bad_concurrency_is_a_usage_error(root: Path, value: str) -> None:
    status, _, err = Checker(root, b"x\0y\0\0", "--concurrency", value).wait()
    assert status == 2
    assert f"--concurrency {value}: expected a whole number from 1 to 256" in err


def test_the_most_slots_allowed_fit_the_usual_open_file_limit(root: Path) -> None:
    """A checker opens every slot file while it looks for a free one: with the most slots
    ``--concurrency`` takes and ``ulimit -n 1024`` (the usual soft limit) a login still works
    (at 1024 slots every login failed with EMFILE)."""
    request = f"{LOGIN}\0secret\0\0".encode()
    most = str(loginslots.MAX_SLOTS)
    status, reply, err = Checker(root, request, "--concurrency", most, nofile="1024").wait()
    assert (status, err) == (0, "")
    assert "userdb_home=/var/vmail/alice" in reply, reply


def test_the_default_slots_stay_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(600)))
    assert loginslots.default_slots() == 256
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert loginslots.default_slots() == 4
