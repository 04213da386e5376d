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
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import changed_tasks, results_by_task
from tests.roles.scanner_host import (
    SUPERVISE_TEMPLATES,
    answers,
    run_script,
    run_supervise,
    stand_in_host,
)
from tests.scanners import free_port

pytestmark = pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools")

RESTART = "Restart rspamd (svc -t)"
RESTART_LOG = "Restart rspamd's log service (svc -t)"
WRITE_LOG_RUN = "Write the log service's run script of rspamd"


@pytest.fixture
def host() -> Iterator[Path]:
    """The stand-in rspamd listening where its run script's argument says (the role's
    ``pyqmail_scanners__rspamd_listen``); its conftest template breaks the run while
    <base>/broken is there (a task fails between the changes and the handlers)."""
    with stand_in_host("pyqmail-scanner-log-", "sys.argv[1]") as base:
        templates = base / SUPERVISE_TEMPLATES / "rspamd"
        (templates / "run.j2").write_text(run_script(base, "{{ pyqmail_scanners__rspamd_listen }}"))
        (templates / "conftest.j2").write_text(
            "#!/bin/sh\n{{ undefined_while_broken if broken else '' }}\nexit 0\n"
        )
        yield base


def run(base: Path, listen: str, log_dir: str, *args: str) -> tuple[int, dict[str, Any]]:
    """The role's supervise.yml for the stand-in, logging into <base>/<log_dir>/rspamd, with
    the role's handlers; no force_handlers. ``args``: more options (--check)."""
    return run_supervise(
        base,
        listen,
        [],
        *args,
        pyqmail__log_dir=str(base / log_dir),
        broken=(base / "broken").exists(),
    )


def pid(service: Path) -> int:
    """The pid svstat reports for a service that is up."""
    done = subprocess.run(["svstat", str(service)], capture_output=True, text=True, check=True)
    words = done.stdout.split()
    assert words[1] == "up", done.stdout
    return int(words[3].rstrip(")"))


def writes_into(log_pid: int) -> str:
    """The directory a multilog writes into (its last argument)."""
    return Path(f"/proc/{log_pid}/cmdline").read_bytes().split(b"\0")[-2].decode()


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
