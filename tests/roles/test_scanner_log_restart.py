"""A scanner's changed log/run restarts its log service, and --check reports the scanners'
restarts without doing them.

The role's supervise.yml and its handlers under our own svscan, with a stand-in rspamd (a
real one takes seconds to start): its run script names the address it listens on, and the
role's own log/run names the log directory (pyqmail__log_dir), so a test changes either by a
variable. multilog reads its directory only when it starts: a changed log/run restarts the
log service (noted before the change in its directory, log/restart-pending, as the scanner's
restart is in the scanner's), never the scanner itself; without the restart the old multilog
kept writing into the old directory while log/main pointed at the new, empty one. Check mode
reports the restarts a change needs and signals nothing (the same pids). Only paths of this
test are touched.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import ROLES, ansible_playbook, changed_tasks, results_by_task
from tests.scanners import free_port
from tests.svscan import own_svscan

pytestmark = pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools")

ROLE = ROLES / "pyqmail_scanners"
RESTART = "Restart rspamd (svc -t)"
RESTART_LOG = "Restart rspamd's log service (svc -t)"
WRITE_LOG_RUN = "Write the log service's run script of rspamd"

# Listens where its first argument says.
STAND_IN = """\
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, int(port)))
server.listen()
while True:
    server.accept()[0].close()
"""


@pytest.fixture
def host() -> Iterator[Path]:
    """svscan on <base>/service; the stand-in rspamd's run script and conftest as templates
    where the play finds them (the conftest template breaks the run while <base>/broken is
    there: a task fails between the changes and the handlers), the role's log run script."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-scanner-log-"))
    base.chmod(0o755)
    (base / "service").mkdir()
    (base / "qmail" / "supervise").mkdir(parents=True)
    (base / "standin.py").write_text(STAND_IN)
    templates = base / "templates" / "var" / "qmail" / "supervise"
    (templates / "rspamd").mkdir(parents=True)
    (templates / "rspamd" / "run.j2").write_text(
        "#!/bin/sh\nexec 2>&1\n"
        f"exec {sys.executable} {base / 'standin.py'} {{{{ pyqmail_scanners__rspamd_listen }}}}\n"
    )
    (templates / "rspamd" / "conftest.j2").write_text(
        "#!/bin/sh\n{{ undefined_while_broken if broken else '' }}\nexit 0\n"
    )
    (templates / "any" / "log").mkdir(parents=True)
    (templates / "any" / "log" / "run.j2").symlink_to(
        ROLE / "templates" / "var" / "qmail" / "supervise" / "any" / "log" / "run.j2"
    )
    try:
        with own_svscan(
            base / "service", base / "qmail" / "supervise", base / "svscan.log", settle=15
        ):
            yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: Path, listen: str, log_dir: str, *args: str) -> tuple[int, dict[str, Any]]:
    """The role's supervise.yml for the stand-in, logging into <base>/<log_dir>/rspamd, with
    the role's handlers; no force_handlers. ``args``: more options (--check)."""
    play = [
        {
            "name": "A scanner under supervise",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars_files": [
                str(path)
                for role in ("pyqmail", "pyqmail_scanners")
                for part in ("defaults", "vars")
                if (path := ROLES / role / part / "main.yml").is_file()
            ],
            "tasks": [
                {
                    "name": "The role's supervise.yml",
                    "ansible.builtin.include_tasks": str(ROLE / "tasks" / "supervise.yml"),
                    "vars": {
                        "pyqmail_scanners__service": "{{ pyqmail_scanners__rspamd_service }}",
                        "pyqmail_scanners__listen": "{{ pyqmail_scanners__rspamd_listen }}",
                        "pyqmail_scanners__config": [],
                    },
                },
            ],
            "handlers": [
                {
                    "name": "The role's handlers",
                    "ansible.builtin.import_tasks": str(ROLE / "handlers" / "main.yml"),
                }
            ],
        }
    ]
    (base / "play.yml").write_text(json.dumps(play))
    extra = {
        "pyqmail__root": str(base / "qmail"),
        "pyqmail__service_dir": str(base / "service"),
        "pyqmail__log_dir": str(base / log_dir),
        "pyqmail__log_user": "nobody",
        "pyqmail__check_fresh": False,
        "pyqmail__preflight_done": True,
        "pyqmail_scanners__rspamd_enabled": True,
        "pyqmail_scanners__rspamd_listen": listen,
        "broken": (base / "broken").exists(),
    }
    proc = ansible_playbook(base / "play.yml", extra, *args, cwd=base, timeout=400)
    return proc.returncode, json.loads(proc.stdout)


def pid(service: Path) -> int:
    """The pid svstat reports for a service that is up."""
    done = subprocess.run(["svstat", str(service)], capture_output=True, text=True, check=True)
    words = done.stdout.split()
    assert words[1] == "up", done.stdout
    return int(words[3].rstrip(")"))


def writes_into(log_pid: int) -> str:
    """The directory a multilog writes into (its last argument)."""
    return Path(f"/proc/{log_pid}/cmdline").read_bytes().split(b"\0")[-2].decode()


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_a_changed_log_run_restarts_the_log_service_alone(host: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    service = host / "service" / "rspamd"
    rc, out = run(host, listen, "logA")
    assert rc == 0, json.dumps(out)[-3000:]
    scanner, logger = pid(service), pid(service / "log")
    assert writes_into(logger) == str(host / "logA" / "rspamd")

    rc, out = run(host, listen, "logB")
    assert rc == 0, json.dumps(out)[-3000:]
    changed = changed_tasks(out)
    assert RESTART_LOG in changed and RESTART not in changed, changed
    assert pid(service) == scanner  # a log-only change leaves the scanner alone
    new_logger = pid(service / "log")
    assert new_logger != logger
    assert writes_into(new_logger) == str(host / "logB" / "rspamd")
    assert (host / "logB" / "rspamd" / "current").is_file()
    assert not (host / "qmail" / "supervise" / "rspamd" / "log" / "restart-pending").exists()

    rc, out = run(host, listen, "logB")
    assert rc == 0
    assert changed_tasks(out) == []


def test_a_lost_log_restart_runs_on_the_next_run(host: Path) -> None:
    """The run ends before the handlers: log/restart-pending stays, and the next run, whose
    log/run no longer changes, restarts the log service."""
    listen = f"127.0.0.1:{free_port()}"
    service = host / "service" / "rspamd"
    note = host / "qmail" / "supervise" / "rspamd" / "log" / "restart-pending"
    rc, out = run(host, listen, "logA")
    assert rc == 0, json.dumps(out)[-3000:]
    logger = pid(service / "log")

    (host / "broken").touch()  # the conftest's template fails after log/run is written
    rc, out = run(host, listen, "logB")
    assert rc != 0
    assert note.is_file()
    ran = results_by_task(out)
    assert ran[WRITE_LOG_RUN][0]["changed"]
    assert RESTART_LOG not in ran
    assert oct(note.stat().st_mode & 0o777) == "0o600"
    assert not (host / "qmail" / "supervise" / "rspamd" / "restart-pending").exists()
    assert pid(service / "log") == logger

    (host / "broken").unlink()
    rc, out = run(host, listen, "logB")
    assert rc == 0, json.dumps(out)[-3000:]
    assert RESTART_LOG in changed_tasks(out)
    assert writes_into(pid(service / "log")) == str(host / "logB" / "rspamd")
    assert not note.exists()


def test_check_mode_reports_the_restarts_and_signals_nothing(host: Path) -> None:
    old = free_port()
    service = host / "service" / "rspamd"
    rc, out = run(host, f"127.0.0.1:{old}", "logA")
    assert rc == 0, json.dumps(out)[-3000:]
    scanner, logger = pid(service), pid(service / "log")
    log_run = (host / "qmail" / "supervise" / "rspamd" / "log" / "run").read_text()

    rc, out = run(host, f"127.0.0.1:{free_port()}", "logB", "--check")
    assert rc == 0, json.dumps(out)[-3000:]
    changed = changed_tasks(out)
    assert RESTART in changed and RESTART_LOG in changed, changed
    assert pid(service) == scanner and pid(service / "log") == logger
    assert answers(old)
    assert (host / "qmail" / "supervise" / "rspamd" / "log" / "run").read_text() == log_run
    assert not (host / "logB").exists()
