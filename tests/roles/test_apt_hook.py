"""The role pyqmail_install's apt hook (restart the daemons an upgrade left on deleted code):
written by default, read by apt as one DPkg::Post-Invoke command, that command never fails,
idempotent, and removed when pyqmail_install__restart_after_upgrade is false.

Run through ansible-playbook on this machine with the hook's path moved into a temporary
directory (never this machine's /etc/apt), the role's own defaults and vars loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import REPO, ROLES, ansible_playbook, link_tree

ROLE = ROLES / "pyqmail_install"


def run(tmp: Path, *args: str, **extra: Any) -> dict[str, Any]:
    """One run of the role's apt hook tasks; the play's JSON result."""
    link_tree(ROLE / "templates", tmp / "templates")
    play = [{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars_files": [str(ROLES / "pyqmail" / "defaults" / "main.yml"),
                       str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
        "tasks": [{"ansible.builtin.import_tasks": str(ROLE / "tasks" / "apthook.yml")}],
    }]  # fmt: skip
    (tmp / "play.yml").write_text(json.dumps(play))
    variables = {
        "pyqmail_install__apt_hook": str(tmp / "apt.conf.d" / "85pyqmail-restart-stale"),
        "pyqmail__venv": str(tmp / "venv"),
        "pyqmail__service_dir": str(tmp / "service"),
        **extra,
    }
    proc = ansible_playbook(tmp / "play.yml", variables, *args, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def changed(result: dict[str, Any]) -> int:
    return int(result["stats"]["localhost"]["changed"])


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A venv whose pyqmail-restart-stale is this checkout's, an apt.conf.d to write into."""
    (tmp_path / "apt.conf.d").mkdir()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    tool = tmp_path / "venv" / "bin" / "pyqmail-restart-stale"
    pythonpath = os.environ.get("PYTHONPATH", "")
    tool.write_text(
        f"#!/bin/sh\nPYTHONPATH={REPO / 'src'}:{pythonpath} "
        f'exec {sys.executable} -m pyqmail.tools.restartstale "$@"\n'
    )
    tool.chmod(0o755)
    return tmp_path


def post_invoke(hook: Path, tool: Path) -> list[str]:
    """Our DPkg::Post-Invoke commands as apt itself reads them from ``hook`` (this machine's
    own apt.conf.d is read too: other packages' hooks, and this machine's own pyqmail hook
    after `make run`, are left out: only commands of ``hook``'s own tool count)."""
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        pytest.skip("no apt-config")
    out = subprocess.run(
        [apt_config, "-c", str(hook), "dump", "DPkg::Post-Invoke"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [
        line.split(" ", 1)[1].removesuffix(";").strip('"')
        for line in out.splitlines()
        if line.startswith("DPkg::Post-Invoke:: ") and str(tool) in line
    ]


def test_hook_written_read_by_apt_never_failing_and_removed(host: Path) -> None:
    hook = host / "apt.conf.d" / "85pyqmail-restart-stale"
    tool = host / "venv" / "bin" / "pyqmail-restart-stale"

    assert changed(run(host)) == 1  # on by default
    assert oct(hook.stat().st_mode & 0o7777) == "0o644"
    commands = post_invoke(hook, tool)
    assert commands == [f"test -x {tool} && {tool} --service-dir {host}/service || true"]
    assert changed(run(host)) == 0  # idempotent
    assert changed(run(host, "--check")) == 0

    # The service directory does not exist: the tool says so and exits 2, apt goes on.
    proc = subprocess.run(["sh", "-c", commands[0]], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert f"no service directory {host}/service" in proc.stderr
    # The venv is gone (the role never ran to its end): nothing runs, apt goes on.
    tool.unlink()
    proc = subprocess.run(["sh", "-c", commands[0]], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")

    assert changed(run(host, "--check", pyqmail_install__restart_after_upgrade=False)) == 1
    assert hook.exists()
    assert changed(run(host, pyqmail_install__restart_after_upgrade=False)) == 1
    assert not hook.exists()
    assert changed(run(host, pyqmail_install__restart_after_upgrade=False)) == 0
