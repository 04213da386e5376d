"""Dovecot's restarts (its run script, its log service's log/run) are noted before the change
and done by the next run when a run ended before its handlers.

The role pyqmail_dovecot's own tasks that write the run scripts and their notes (taken by name
from tasks/dovecot.yml) and its handlers, under our own svscan, with a stand-in Dovecot (a real
one needs its configuration, users and ports): its run script names pyqmail__dovecot_config,
and the role's own log/run names the log directory (pyqmail__log_dir), so a test changes either
by a variable. A task of the test's, after the role's, fails a run before its handlers (no
force_handlers), as a Ctrl-C or a lost connection would end it. Only paths of this test are
touched.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import ROLES, ansible_playbook, changed_tasks, results_by_task
from tests.roles.test_conftests import role_tasks
from tests.roles.test_scanner_log_restart import pid, writes_into
from tests.svscan import own_svscan

pytestmark = pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools")

ROLE = ROLES / "pyqmail_dovecot"
RESTART = "Restart Dovecot whose run script changed (svc -t, then check it stays up)"
RESTART_LOG = "Restart Dovecot's log service whose run script changed (svc -t)"
TASKS = (
    "Create Dovecot's log directory, written by the log user",
    "Create the supervise directories",
    "Point log/main at Dovecot's log directory",
    "Look for Dovecot's service link (a changed run script restarts only a linked service)",
    "Find whether this run changes Dovecot's run scripts",
    "Note Dovecot's restart before its run script changes",
    "Note the restart of Dovecot's log service before its run script changes",
    "Write the run scripts",
    "Link Dovecot into the service directory and wait until it is up",
)


@pytest.fixture
def host() -> Iterator[Path]:
    """svscan on <base>/service; the stand-in Dovecot's run script as the template where the
    play finds it, the role's log run script."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-dovecot-notes-"))
    base.chmod(0o755)
    (base / "service").mkdir()
    (base / "qmail" / "supervise").mkdir(parents=True)
    templates = base / "templates" / "var" / "qmail" / "supervise" / "dovecot"
    (templates / "log").mkdir(parents=True)
    (templates / "run.j2").write_text(
        "#!/bin/sh\n# a stand-in dovecot for {{ pyqmail__dovecot_config }}\nexec 2>&1\n"
        "exec sleep 100000\n"
    )
    (templates / "log" / "run.j2").symlink_to(
        ROLE / "templates" / "var" / "qmail" / "supervise" / "dovecot" / "log" / "run.j2"
    )
    try:
        with own_svscan(
            base / "service", base / "qmail" / "supervise", base / "svscan.log", settle=15
        ):
            yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: Path, config: str, log_dir: str, *args: str) -> tuple[int, dict[str, Any]]:
    """The role's tasks for the stand-in (its run script naming <base>/<config>, logging into
    <base>/<log_dir>/dovecot), then the test's task that fails while <base>/broken is there;
    the role's handlers. ``args``: more options (--check)."""
    play = [
        {
            "name": "Dovecot's run scripts",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars_files": [
                str(path)
                for role in ("pyqmail", "pyqmail_dovecot")
                for part in ("defaults", "vars")
                if (path := ROLES / role / part / "main.yml").is_file()
            ],
            "tasks": [
                *role_tasks("pyqmail_dovecot", "dovecot.yml", *TASKS),
                {
                    "name": "End the run before its handlers",
                    "ansible.builtin.fail": {"msg": "ended here"},
                    "when": "broken",
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
        "pyqmail__dovecot_config": str(base / config),
        "pyqmail__check_fresh": False,
        "pyqmail__preflight_done": True,  # restart_note's include runs the role's dependency
        "broken": (base / "broken").exists(),
    }
    proc = ansible_playbook(base / "play.yml", extra, *args, cwd=base, timeout=400)
    return proc.returncode, json.loads(proc.stdout)


def test_restarts_a_run_ended_before_its_handlers_are_done_by_the_next(host: Path) -> None:
    service = host / "service" / "dovecot"
    supervise = host / "qmail" / "supervise" / "dovecot"
    rc, out = run(host, "a.conf", "logA")
    assert rc == 0, json.dumps(out)[-3000:]
    dovecot, logger = pid(service), pid(service / "log")
    assert writes_into(logger) == str(host / "logA" / "dovecot")

    # --check reports both restarts and signals nothing
    rc, out = run(host, "b.conf", "logB", "--check")
    assert rc == 0, json.dumps(out)[-3000:]
    changed = changed_tasks(out)
    assert RESTART in changed and RESTART_LOG in changed, changed
    assert (pid(service), pid(service / "log")) == (dovecot, logger)

    (host / "broken").touch()
    rc, out = run(host, "b.conf", "logB")
    assert rc != 0
    ran = results_by_task(out)
    assert ran["Write the run scripts"][0]["changed"]
    assert RESTART not in ran and RESTART_LOG not in ran
    for note in (supervise / "restart-pending", supervise / "log" / "restart-pending"):
        assert oct(note.stat().st_mode & 0o777) == "0o600", note
    assert (pid(service), pid(service / "log")) == (dovecot, logger)

    (host / "broken").unlink()
    rc, out = run(host, "b.conf", "logB")
    assert rc == 0, json.dumps(out)[-3000:]
    changed = changed_tasks(out)
    assert RESTART in changed and RESTART_LOG in changed, changed
    assert pid(service) != dovecot
    assert writes_into(pid(service / "log")) == str(host / "logB" / "dovecot")
    assert list(supervise.glob("**/restart-pending")) == []

    rc, out = run(host, "b.conf", "logB")
    assert rc == 0
    assert changed_tasks(out) == []


def test_a_log_only_change_restarts_the_log_service_alone(host: Path) -> None:
    service = host / "service" / "dovecot"
    rc, out = run(host, "a.conf", "logA")
    assert rc == 0, json.dumps(out)[-3000:]
    dovecot, logger = pid(service), pid(service / "log")
    rc, out = run(host, "a.conf", "logB")
    assert rc == 0, json.dumps(out)[-3000:]
    changed = changed_tasks(out)
    assert RESTART_LOG in changed and RESTART not in changed, changed
    assert pid(service) == dovecot
    assert pid(service / "log") != logger
