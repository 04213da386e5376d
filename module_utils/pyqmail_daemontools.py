# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""daemontools without AnsibleModule: plan ``svc`` calls, wait, read logs.

Used by ``library/pyqmail_service.py``; kept free of Ansible so it is unit-tested directly.
Standard library only. What ``svstat`` prints and its parser live in ``pyqmail.svstat``
(``src/pyqmail/svstat.py``, the collection's ``pyqmail_svstat``), shared with the daemon
package's ``pyqmail-restart-stale``; they are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

try:
    from pyqmail.svstat import (
        DAEMONTOOLS_DIRS,
        Status,
        SvstatError,
        parse_svstat,
        parse_svstat_line,
    )
except ImportError:  # pragma: no cover - exercised through ansible-playbook
    # The host's Python may not have the daemon package: the collection's copy (a link to
    # the same file); Ansible's payload builder sees this import and ships it.
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_svstat import (  # type: ignore[import-untyped,import-not-found,no-redef,unused-ignore]
        DAEMONTOOLS_DIRS,
        Status,
        SvstatError,
        parse_svstat,
        parse_svstat_line,
    )

__all__ = [
    "DAEMONTOOLS_DIRS",
    "SVC_OPTIONS",
    "Status",
    "SvstatError",
    "WaitResult",
    "log_tail",
    "parse_svstat",
    "parse_svstat_line",
    "plan_svc",
    "run_script_output",
    "wait_for",
]

# What each svc option does; the module looks options up here, never by attribute name.
SVC_OPTIONS = {
    "-u": "start (and restart if it stops)",
    "-d": "stop (TERM, then CONT)",
    "-t": "send TERM (supervise restarts it)",
    "-h": "send HUP",
    "-c": "send CONT (unpause)",
    "-x": "make supervise exit once the service is down",
}


def plan_svc(state: str, status: Status) -> list[str]:
    """The svc options that take a supervised service from ``status`` to ``state``.

    ``restarted`` and ``reloaded`` act on every call (that is what asking for them means);
    on a service that is down they start it, as ansible.builtin.service does.
    """
    if state == "present":
        return []
    if state == "down":
        return ["-d"] if status.up or status.want == "up" else []
    if state not in ("up", "restarted", "reloaded"):
        raise ValueError(f"unknown service state {state!r}")
    options: list[str] = []
    if not status.up or status.want == "down":
        options.append("-u")
    if status.paused:
        options.append("-c")
    if status.up and state == "restarted":
        options.append("-t")
    if status.up and state == "reloaded":
        options.append("-h")
    return options


@dataclass(frozen=True)
class WaitResult:
    ok: bool
    status: Status
    reason: str
    pids: tuple[int, ...]  # every pid seen up while waiting, in order


def wait_for(
    read: Callable[[], Status],
    goal: str,
    *,
    stable: float = 0.0,
    timeout: float,
    old_pid: int | None = None,
    watched: bool = False,
    interval: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WaitResult:
    """Poll ``read`` until ``goal`` holds or ``timeout`` seconds pass.

    Goals: ``supervised`` (supervise/ok answers: svscan may take 5 s to notice a new
    link), ``unsupervised`` (supervise exited after ``svc -dx``), ``down``, and ``up``: up
    with a pid other than ``old_pid`` (the pid before ``svc -t``) that has surely run for
    ``stable`` seconds (see ``_Uptime``), so a service that keeps crashing never reaches it.
    ``watched`` counts only the time this call has seen the pid up: after ``svc -h`` the
    pid stays, and its uptime before the signal says nothing about surviving it.
    """
    if goal not in ("supervised", "unsupervised", "up", "down"):
        raise ValueError(f"unknown goal {goal!r}")
    deadline = clock() + timeout
    pids: list[int] = []
    uptime = _Uptime(clock, before=not watched)
    while True:
        status = read()
        pid = status.pid if status.up else None
        if pid is not None and pid != old_pid and (not pids or pids[-1] != pid):
            pids.append(pid)
        surely_up = uptime.at_least(status)
        if goal == "unsupervised" and not status.supervised:
            return WaitResult(True, status, "unsupervised", tuple(pids))
        if status.supervised:
            if goal == "supervised":
                return WaitResult(True, status, "supervised", tuple(pids))
            if goal == "down" and not status.up:
                return WaitResult(True, status, "down", tuple(pids))
            if goal == "up" and status.up and status.pid != old_pid and surely_up >= stable:
                return WaitResult(True, status, "up", tuple(pids))
        if clock() >= deadline:
            return WaitResult(
                False,
                status,
                _why(status, goal, stable=stable, timeout=timeout, old_pid=old_pid, pids=pids),
                tuple(pids),
            )
        sleep(interval)


class _Uptime:
    """How long the current pid has surely run, from svstat's count and the caller's clock.

    svstat counts whole seconds (the start's and now's TAI seconds, fractions dropped:
    daemontools' svstat.c), so "2 seconds" may mean a pid that has run 1.01 s. supervise
    restarts a crashing ./run one second after its last start, so a restart loop shows
    pids up for just over 1 s, now and then as "2 seconds": read as it stands, that passes
    ``stable=2`` for a service that never stays up. What is sure: a pid shown at N seconds
    has run more than N - 1, and it has run at least as long again as it has been seen with
    the same pid since. With ``before=False`` only the latter counts.

    svstat's count comes from the wall clock (supervise stores the start's TAI time), so a
    step of the clock (NTP correcting a VM's drift) makes a pid that just started look
    seconds old. A pid that a previous poll did not show started during the wait: only the
    caller's own (monotonic) clock counts for it, as with ``before=False``.
    """

    def __init__(self, clock: Callable[[], float], *, before: bool = True) -> None:
        self.clock = clock
        self.before = before
        self.pid: int | None = None
        self.first_seen = 0.0
        self.shown_then = 0
        self.shown_last = 0
        self.polled = False  # a previous poll was read
        self.appeared = False  # the pid was not shown by the poll before it was first seen

    def at_least(self, status: Status) -> float:
        """Seconds the pid in ``status`` has surely been up; 0 when it is not up."""
        now, polled_before = self.clock(), self.polled
        self.polled = True
        if not status.up or status.pid is None:
            self.pid = None
            return 0.0
        shown = status.seconds or 0
        if status.pid != self.pid or shown < self.shown_last:  # a count going back: a new process
            self.pid, self.first_seen, self.shown_then = status.pid, now, shown
            self.appeared = polled_before
        self.shown_last = shown
        seen_for = now - self.first_seen
        if not self.before or self.appeared:
            return seen_for
        return max(shown - 1, max(self.shown_then - 1, 0) + seen_for)


def _why(
    status: Status,
    goal: str,
    *,
    stable: float,
    timeout: float,
    old_pid: int | None,
    pids: list[int],
) -> str:
    after = f"after {timeout:g} s"
    if goal == "unsupervised":
        return f"{status.path} still supervised ({status.state}) {after} svc -dx"
    if not status.supervised:
        return (
            f"{status.path} is not supervised {after} ({status.error}); "
            "is svscan running on the service directory?"
        )
    if goal == "down":
        return f"{status.path} still up (pid {status.pid}) {after}; does it ignore TERM?"
    if status.up and status.pid == old_pid:
        return (
            f"{status.path} still runs the old pid {old_pid} {after} svc -t; does it ignore TERM?"
        )
    if len(pids) > 1:
        return (
            f"{status.path} keeps restarting: {len(pids)} different pids in {timeout:g} s, "
            f"never up for {stable:g} s"
        )
    if status.up:
        return f"{status.path} up only {status.seconds} s {after}, {stable:g} s required"
    if pids:
        return f"{status.path} still down {after}: it started and stopped again"
    return (
        f"{status.path} still down {after}: it never stayed up "
        "(is ./run executable, does it exit at once?)"
    )


def log_tail(service: str, lines: int = 20) -> list[str]:
    """The last ``lines`` lines multilog wrote for ``service``: ``log/main/current`` first,
    else the most recently written ``log/*/current``. Empty if there is none."""
    log = os.path.join(service, "log")
    candidates = [os.path.join(log, "main", "current")]
    try:
        others = sorted(
            (os.path.join(log, d, "current") for d in os.listdir(log) if d != "main"),
            key=lambda p: os.stat(p).st_mtime if os.path.exists(p) else 0,
            reverse=True,
        )
    except OSError:
        others = []
    for path in candidates + others:
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 65536))
                data = f.read()
        except OSError:
            continue
        text = data.decode("utf-8", errors="replace").splitlines()
        if text:
            return text[-lines:]
    return []


def run_script_output(service: str, timeout: float = 3.0, lines: int = 20) -> list[str]:
    """Run ``./run`` once in ``service`` (as an admin would by hand) and return the last lines
    it printed; used only when a failing service has no log to show. The child runs in its
    own process group, which is killed after ``timeout`` seconds."""
    proc = subprocess.Popen(
        ["./run"],
        cwd=service,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _stderr = proc.communicate()
    return out.decode("utf-8", errors="replace").splitlines()[-lines:]
