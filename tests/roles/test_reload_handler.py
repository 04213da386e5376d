"""The listeners' reload handler, run for real by ansible-playbook (local connection).

A play notifies ``pyqmail reload listeners`` with the role pyqmail's own handlers imported;
a real ``supervise`` runs the linked ``qmail-smtpd`` service. With a good configuration the
handler's ``pyqmail-smtpd --check`` passes and ``svc -h`` follows; with a broken one the run
fails with the daemon's own message and nothing is signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parents[1]
CHECK_TASK = (
    "Validate the daemon and its configuration before signalling it (pyqmail-smtpd --check)"
)
REFUSE_TASK = "Refuse to signal the listeners with a configuration they cannot load"
RELOAD_TASK = "Reload the SMTP listeners (svc -h)"


@pytest.fixture
def host(pki: PKI) -> Iterator[QmailRoot]:
    """A qmail root, its rules cdb, and a supervised (sleeping) qmail-smtpd service."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-handler-"))
    base.chmod(0o755)
    root = QmailRoot(base / "qmail", pki)
    (root.path / "control").mkdir(parents=True)
    root.control("me", "mx.test\n")
    root.control("rcpthosts", "mx.test\n")
    root.servercert()
    root.queue.create()
    root.rules(":allow\n")
    if IS_ROOT:
        for path in [root.path, *root.path.rglob("*")]:
            root._own(path)
    service = base / "supervise" / "qmail-smtpd"
    service.mkdir(parents=True)
    (service / "run").write_text("#!/bin/sh\nexec sleep 600\n")
    (service / "run").chmod(0o755)
    (base / "service").mkdir()
    (base / "service" / "qmail-smtpd").symlink_to(service)
    supervise = subprocess.Popen(["supervise", str(service)])
    try:
        for _ in range(100):
            if (service / "supervise" / "ok").exists():
                break
            time.sleep(0.05)
        yield root
    finally:
        subprocess.run(["svc", "-dx", str(service)], check=False)
        try:
            supervise.wait(timeout=10)
        except subprocess.TimeoutExpired:
            supervise.kill()
            supervise.wait()
        shutil.rmtree(base, ignore_errors=True)


def run_play(root: QmailRoot) -> dict[str, list[dict[str, Any]]]:
    """Notify ``pyqmail reload listeners``; task name -> its results on localhost."""
    base = root.path.parent
    playbook = base / "play.yml"
    playbook.write_text(
        f"""---
- name: Reload the listeners through the role's handlers
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {REPO}/roles/pyqmail/defaults/main.yml
    - {REPO}/roles/pyqmail/vars/main.yml
  tasks:
    - name: Pretend a control file changed
      ansible.builtin.command: "true"
      changed_when: true
      notify: pyqmail reload listeners
  handlers:
    - name: The role pyqmail's handlers
      ansible.builtin.import_tasks: {REPO}/roles/pyqmail/handlers/main.yml
"""
    )
    extra = {
        "pyqmail__root": str(root.path),
        "pyqmail__service_dir": str(base / "service"),
        "pyqmail__venv": str(VENV),
        "pyqmail__rules_path": str(root.path / "etc" / "smtp"),
        "pyqmail__smtpd_user": DROP_USER if IS_ROOT else os.environ.get("USER", "root"),
        "ansible_python_interpreter": sys.executable,
    }
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "PYTHONWARNINGS": "ignore",
        }
    )
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            "localhost,",
            "-e",
            json.dumps(extra),
            str(playbook),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    out = json.loads(proc.stdout)
    ran: dict[str, list[dict[str, Any]]] = {}
    for play in out["plays"]:
        for task in play["tasks"]:
            ran.setdefault(task["task"]["name"], []).append(task["hosts"]["localhost"])
    return ran


def test_good_configuration_is_checked_then_signalled(host: QmailRoot) -> None:
    ran = run_play(host)
    check = ran[CHECK_TASK][0]
    assert not check.get("failed"), check
    (result,) = check["results"]
    assert result["rc"] == 0, result
    assert "--mode" in result["cmd"] and "smtp" in result["cmd"]
    assert str(host.path / "etc" / "smtp.cdb") in result["cmd"]
    assert result["stdout"].startswith("pyqmail-smtpd: configuration of")
    assert ran[REFUSE_TASK][0].get("skipped")
    assert ran[RELOAD_TASK][0].get("changed") and not ran[RELOAD_TASK][0].get("failed")


def test_broken_configuration_fails_with_the_daemons_message_and_signals_nothing(
    host: QmailRoot,
) -> None:
    host.control("databytes", "ten\n")
    ran = run_play(host)
    refuse = ran[REFUSE_TASK][0]
    assert refuse.get("failed"), refuse
    assert refuse["msg"].startswith("not reloaded, the running daemons keep their old state: ")
    assert (
        f"pyqmail-smtpd: fatal: {host.path}/control/databytes:1: not a non-negative integer: 'ten'"
        in refuse["msg"]
    )
    assert RELOAD_TASK not in ran
