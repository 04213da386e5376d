"""``pyqmail-restart-stale``: restart the supervised services that still run code a package
upgrade deleted (a security update of Dovecot, rspamd, ClamAV, libssl3, python3.11, libc, ...).

Why: daemontools runs every daemon of the mail server (pyqmail-smtpd, pyqmail-send, Dovecot,
rspamd, clamd), and the Debian packages' own services are masked or disabled so that they do
not fight the supervised ones. So an upgrade's postinst restarts nothing that runs: without
this, the supervised daemons keep the old, vulnerable code mapped until someone restarts them.
The role pyqmail_install's apt hook (``/etc/apt/apt.conf.d/85pyqmail-restart-stale``) runs
this after every dpkg run, as Debian's needrestart does from ``99needrestart``.

What: every directory svscan supervises in the service directory (dot names skipped, as
svscan does), and its ``log/`` (multilog maps libc too), as ``svstat`` reports it; for each one
up, its pid and every process forked from it are looked at with needrestart's rules
(``pyqmail.procmaps``), and ``svc -t`` restarts the service when one of them runs or maps a
deleted executable file that a new one has replaced (a file removed and not replaced, as by
``apt purge``, is reported instead: the restart would start nothing new, or fail over and
over). A service with none is never touched; one that is down or not
supervised is left alone (it will start from the new files). svstat is asked again just before
``svc -t``: a service whose pid changed meanwhile has restarted already.

Before ``svc -t``, a service directory's ``conftest`` (beside ``run``) is run, as root, in that
directory, within ``CONFTEST_TIMEOUT``: it exits 0 when the program installed now accepts the
configuration the service runs with (the roles write one for each of their services:
``pyqmail-smtpd --check`` and ``pyqmail-send --check``, which their reload handlers run too,
``doveconf -n``, the handler's as well, ``rspamadm configtest``, and ``clamd --version``, which
parses the configuration first). Any other exit and the service is not restarted, but reported
with the check's exit status and first line of output, on stderr and to syslog: a restart into
a program that refuses the running configuration would leave supervise restarting it,
failing, every second. What stays is the old program, not always a working service: a
daemon that starts the upgraded files for new processes (Dovecot's master starts
``imap-login`` and ``imap`` for each login; 2.4's stop at the version mismatch) serves its
open sessions only. ``--dry-run`` runs the checks too. A directory
without a ``conftest`` (a log service, one a role wrote none for, another package's) is
restarted as before. Why that name: no supervision suite has one for this (runit's
``./check``, which ``sv`` runs, answers whether a service that runs is ready, a different
question); ``conftest`` is the "configtest" of ``apachectl``, ``rspamadm`` and the init
scripts, in a name as short as ``run`` and ``finish``.

Output: one line per service restarted (``--dry-run``: that would be), naming the process and
the file, e.g.::

    restarted /etc/service/dovecot: pid 812 (imap-login) maps /usr/lib/libssl.so.3, deleted

Exit status: 0 when every service was looked at (and those that needed it restarted); 1 when
some could not be (a process's maps unreadable: not root, or root without ``CAP_SYS_PTRACE`` as
in a Docker or Podman container by default; a paused service; its conftest failed; svc
failed), the others still handled; 2 when nothing was done: no service directory, no
``svstat`` or ``svc``, svstat's output not understood.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pyqmail.procmaps import Stale, StaleError, children_map, process_tree, stale_code
from pyqmail.svstat import DAEMONTOOLS_DIRS, Status, SvstatError, parse_svstat

PROG = "pyqmail-restart-stale"
SERVICE_DIR = "/etc/service"  # pyqmail__service_dir's default (Debian's daemontools-run)
EXIT_OK, EXIT_SOME_FAILED, EXIT_NOTHING_DONE = 0, 1, 2
CONFTEST = "conftest"  # beside run: exits 0 when the installed program takes the configuration
CONFTEST_TIMEOUT = 60  # seconds: rspamadm configtest loads every Lua module, a few seconds
KILLED_WAIT = 5.0  # seconds for the pipes of a killed conftest to close
# A line of a failed check that names its error: doveconf's "Fatal:", clamd's "ERROR:",
# pyqmail's "fatal:", rspamadm's "failed to load config", a Python exception's last line.
_ERROR = re.compile(r"(?i:\b(error|fatal|failed|critical)\b)|\w+Error\b")


class RestartError(Exception):
    """Nothing could be done; the message says why."""


@dataclass(frozen=True)
class Finding:
    """A service up with a pid, and the first of its processes that runs deleted code."""

    status: Status
    stale: Stale


def program(name: str) -> str:
    """The path of daemontools' ``name``: $PATH, then ``DAEMONTOOLS_DIRS`` (apt's hooks run with
    a short $PATH, and djb's own install puts it in /command)."""
    search = os.pathsep.join(p for p in (os.environ.get("PATH", ""), *DAEMONTOOLS_DIRS) if p)
    found = shutil.which(name, path=search)
    if found is None:
        dirs = ", ".join(DAEMONTOOLS_DIRS)
        raise RestartError(f"{name} not found in $PATH or {dirs} (daemontools)")
    return found


def service_dirs(service_dir: str) -> list[str]:
    """The directories svscan supervises for ``service_dir``: each service and its log/."""
    try:
        names = sorted(os.listdir(service_dir))
    except OSError as exc:
        raise RestartError(
            f"cannot list the service directory {service_dir}: {exc.strerror}"
        ) from exc
    dirs: list[str] = []
    for name in names:
        path = os.path.join(service_dir, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        dirs.append(path)
        if os.path.isdir(os.path.join(path, "log")):
            dirs.append(os.path.join(path, "log"))
    return dirs


def svstat(svstat_program: str, dirs: Sequence[str]) -> list[Status]:
    """svstat of ``dirs``, parsed (``pyqmail.svstat``); RestartError when it is not understood."""
    if not dirs:
        return []
    proc = subprocess.run(
        [svstat_program, *dirs],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        check=False,
    )
    try:
        return parse_svstat(proc.stdout, dirs)
    except SvstatError as exc:
        said = f" ({proc.stderr.strip()})" if proc.stderr.strip() else ""
        raise RestartError(f"{svstat_program}: {exc}{said}") from exc


def find_stale(statuses: Sequence[Status]) -> tuple[list[Finding], list[str]]:
    """The services up whose processes run deleted code, and the problems of those that could
    not be looked at (a paused one counts: it keeps its old code)."""
    found: list[Finding] = []
    problems: list[str] = []
    children = children_map()  # one pass over /proc for every service's tree
    for status in statuses:
        if not status.up or status.pid is None:
            continue
        try:
            stale = stale_code(process_tree(status.pid, children))
        except StaleError as exc:
            problems.append(
                f"{status.path}: {exc}; not restarted (reading other processes' maps needs"
                " root with CAP_SYS_PTRACE, which a container may not grant)"
            )
            continue
        if stale is None:
            continue
        if not os.path.exists(stale.path):
            problems.append(
                f"{status.path}: {stale}; not restarted: nothing new is at {stale.path} (removed,"
                " not upgraded: a restart would not start a new version; unlink the service if"
                " its package is gone)"
            )
            continue
        if status.paused:
            problems.append(f"{status.path}: {stale}; not restarted: paused (svc -c, then again)")
            continue
        found.append(Finding(status, stale))
    return found, problems


def _reason(lines: list[str]) -> str:
    """The line of a failed check's output that goes on the report (stderr's lines, stdout's
    when it has none; the count of the others follows it, to see by running ./conftest): the
    first that names an error, else the first. A checker may warn before its error (rspamadm
    about a deprecated option), and the warning alone would send the admin the wrong way."""
    return next((line for line in lines if _ERROR.search(line)), lines[0])


def conftest(path: str, timeout: float = CONFTEST_TIMEOUT) -> str | None:
    """Why the service at ``path`` must not be restarted, as its ``./conftest`` says; None when
    it passed, or there is none. Its own process group, so that at ``timeout`` the check and
    whatever it started are killed, never more."""
    if not os.path.lexists(os.path.join(path, CONFTEST)):
        return None
    try:
        proc = subprocess.Popen(
            [f"./{CONFTEST}"],
            cwd=path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        return f"cannot run ./{CONFTEST}: {exc.strerror}"
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:  # a child that left the group (setsid) may still hold the pipes: not for long
            proc.communicate(timeout=KILLED_WAIT)
        except subprocess.TimeoutExpired:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            proc.wait()
        return f"./{CONFTEST} still running after {timeout:g} s, killed"
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in err.splitlines() if line.strip()] or [
        line.strip() for line in out.splitlines() if line.strip()
    ]
    status = (
        f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    )
    said = f": {_reason(lines)[:300]}" if lines else ""
    more = (
        f" (+{len(lines) - 1} more line{'s' if len(lines) > 2 else ''})" if len(lines) > 1 else ""
    )
    return f"./{CONFTEST} failed ({status}){said}{more}"


def checked(findings: Sequence[Finding]) -> tuple[list[Finding], list[str]]:
    """The findings whose conftest passed (or that have none), and one problem per other."""
    passed: list[Finding] = []
    problems: list[str] = []
    for finding in findings:
        refused = conftest(finding.status.path)
        if refused is None:
            passed.append(finding)
        else:
            problems.append(
                f"{finding.status.path}: {finding.stale}; not restarted: {refused}; it keeps"
                " running the old code"
            )
    return passed, problems


def restart(svc: str, svstat_program: str, findings: Sequence[Finding]) -> list[str]:
    """``svc -t`` each service still up with the pid it was found with; prints a line for each,
    returns the problems."""
    problems: list[str] = []
    now = {s.path: s for s in svstat(svstat_program, [f.status.path for f in findings])}
    for finding in findings:
        path = finding.status.path
        current = now[path]
        if not current.up or current.pid != finding.status.pid:
            continue  # restarted (or stopped) meanwhile: its new process has the new files
        proc = subprocess.run(
            [svc, "-t", path],
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
        # svc warns on stderr and may still exit 0 ("unable to control ...").
        if proc.returncode != 0 or proc.stderr.strip():
            said = proc.stderr.strip() or f"exit {proc.returncode}"
            problems.append(f"{path}: {finding.stale}; svc -t failed: {said}")
            continue
        sys.stdout.write(f"restarted {path}: {finding.stale}\n")
    return problems


def run(service_dir: str, *, dry_run: bool) -> int:
    """Look at every service of ``service_dir``, restart (or list) those that need it."""
    svstat_program = program("svstat")
    svc = program("svc")
    if not os.path.isdir(service_dir):
        raise RestartError(f"no service directory {service_dir} (--service-dir)")
    findings, problems = find_stale(svstat(svstat_program, service_dirs(service_dir)))
    findings, refused = checked(findings)
    problems += refused
    if dry_run:
        for finding in findings:
            sys.stdout.write(f"would restart {finding.status.path}: {finding.stale}\n")
    elif findings:
        problems += restart(svc, svstat_program, findings)
    for problem in problems:
        sys.stderr.write(f"{PROG}: {problem}\n")
    _to_syslog(problems)
    return EXIT_SOME_FAILED if problems else EXIT_OK


def _to_syslog(problems: list[str]) -> None:
    """Each problem to syslog too (daemon.warning): run by apt's hook during an unattended
    upgrade, stderr reaches only dpkg's log, and a service left on its old code (a refused
    conftest, unreadable maps) must be seen where the admin's monitoring looks. Without a
    syslog daemon (a container) the lines go nowhere, as logger's would."""
    if not problems:
        return
    import syslog  # noqa: PLC0415 - only when there is something to say

    syslog.openlog(PROG, 0, syslog.LOG_DAEMON)
    for problem in problems:
        syslog.syslog(syslog.LOG_WARNING, problem)
    syslog.closelog()


def main(argv: Sequence[str] | None = None) -> int:
    import argparse  # noqa: PLC0415 - CLI only

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Restart (svc -t) the supervised services whose processes still run or "
        "map an executable file a package upgrade deleted, unless the service's ./conftest "
        "says the program installed now refuses its configuration.",
    )
    parser.add_argument(
        "--service-dir",
        default=SERVICE_DIR,
        help=f"the directory svscan scans (pyqmail__service_dir; default {SERVICE_DIR})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list what would be restarted (the conftests run), restart nothing",
    )
    args = parser.parse_args(argv)
    try:
        return run(args.service_dir, dry_run=args.dry_run)
    except RestartError as exc:
        sys.stderr.write(f"{PROG}: {exc}; nothing restarted\n")
    return EXIT_NOTHING_DONE


if __name__ == "__main__":
    sys.exit(main())
