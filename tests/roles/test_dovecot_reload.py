"""Which changes reload Dovecot: its configuration and servercert.pem only.

The role pyqmail's handlers run for real (ansible-playbook, local connection) after a task
that notifies one name, a real ``supervise`` running a stand-in ``dovecot`` service linked into
a scratch service directory: ``pyqmail reload listeners`` (databytes, rules, an AUTH user, a
scanner's control file) leaves it alone, ``pyqmail reload dovecot`` HUPs it. The certificate
tasks that write servercert.pem notify both.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles.playbook import ROLES
from tests.roles.test_conftests import handlers_run

DOVECOT_HANDLERS = (
    "Look for the supervised Dovecot",
    "Reload Dovecot (svc -h, then check it stays up)",
)


@pytest.fixture
def dovecot(tmp_path: Path) -> Any:
    """supervise running a stand-in dovecot that counts its HUPs in <tmp>/hups."""
    service = tmp_path / "supervise" / "dovecot"
    service.mkdir(parents=True)
    (service / "run").write_text(
        f"#!/bin/sh\ntrap 'echo hup >> {tmp_path}/hups' HUP\nwhile :; do sleep 1 & wait $!; done\n"
    )
    (service / "run").chmod(0o755)
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "dovecot").symlink_to(service)
    proc = subprocess.Popen(["supervise", str(service)], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while (
            "up"
            not in subprocess.run(
                ["svstat", str(service)], capture_output=True, text=True, check=False
            ).stdout.split(":")[-1][:4]
        ):
            assert time.monotonic() < deadline, "the stand-in dovecot did not come up"
            time.sleep(0.2)
        time.sleep(1.2)  # up long enough for pyqmail_service's wait
        yield tmp_path
    finally:
        subprocess.run(["svc", "-dx", str(service)], check=False)
        proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("supervise") is None, reason="needs daemontools")
def test_only_dovecots_own_changes_reload_it(dovecot: Path) -> None:
    extra = {
        "pyqmail__service_dir": str(dovecot / "service"),
        "pyqmail__root": str(dovecot),
        "pyqmail__dovecot_conftest": ["true"],
    }
    ran = handlers_run(dovecot / "listeners", "pyqmail reload listeners", extra)
    assert not [name for name in DOVECOT_HANDLERS if name in ran], sorted(ran)
    assert not (dovecot / "hups").exists()
    ran = handlers_run(dovecot / "dovecot", "pyqmail reload dovecot", extra)
    assert ran[DOVECOT_HANDLERS[1]].get("changed"), ran[DOVECOT_HANDLERS[1]]
    deadline = time.monotonic() + 5
    while not (dovecot / "hups").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (dovecot / "hups").read_text() == "hup\n"


def test_the_tasks_that_write_servercert_pem_reload_dovecot_too() -> None:
    tasks = yaml.safe_load((ROLES / "pyqmail_certificates" / "tasks" / "main.yml").read_text())
    flat = [t for task in tasks for t in task.get("block", [task])]
    server = [task for task in flat if "server certificate" in task["name"] and "notify" in task]
    assert len(server) == 3, [task["name"] for task in server]
    for task in server:
        assert set(task["notify"]) == {"pyqmail reload listeners", "pyqmail reload dovecot"}, task
