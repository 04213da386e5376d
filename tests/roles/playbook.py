"""How the role tests run ansible-playbook: this checkout's ansible.cfg, JSON output, quiet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def ansible_env() -> dict[str, str]:
    """The test process's environment plus the settings every role test's playbook needs."""
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "PYTHONWARNINGS": "ignore",
    }


def run_role_tasks(
    roles: tuple[str, ...], base: Path, extra: dict[str, Any], *args: str, must_pass: bool = True
) -> dict[str, Any]:
    """Run the tasks of ``roles`` (with their defaults and the role pyqmail's handlers) on
    localhost in ``base``; ``extra`` are the extra vars, ``args`` more ansible-playbook options
    (``--check``, ``--diff``). Returns the JSON callback's output; a failed run fails the test
    unless ``must_pass`` is false (a test of what a role refuses reads the failed task).
    """
    base.mkdir(parents=True, exist_ok=True)
    tasks = "\n".join(
        f"    - name: The role {role}'s tasks\n"
        f"      ansible.builtin.include_tasks: {REPO}/roles/{role}/tasks/main.yml"
        for role in roles
    )
    defaults = "\n".join(f"    - {REPO}/roles/{role}/defaults/main.yml" for role in roles)
    (base / "play.yml").write_text(
        f"""---
- name: Role tasks under test
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {REPO}/roles/pyqmail/defaults/main.yml
    - {REPO}/roles/pyqmail/vars/main.yml
{defaults}
  tasks:
{tasks}
  handlers:
    - name: The role pyqmail's handlers
      ansible.builtin.import_tasks: {REPO}/roles/pyqmail/handlers/main.yml
"""
    )
    for role in roles:  # where included tasks find each role's templates
        for sub in (REPO / "roles" / role / "templates" / "var" / "qmail").iterdir():
            target = base / "templates" / "var" / "qmail" / sub.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(sub)
    extra = {"ansible_python_interpreter": sys.executable, **extra}
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            "localhost,",
            "-e",
            json.dumps(extra),
            *args,
            str(base / "play.yml"),
        ],
        cwd=base,
        capture_output=True,
        text=True,
        env=ansible_env(),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 or not must_pass, proc.stdout[-4000:] + proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def task_result(out: dict[str, Any], name: str, host: str = "localhost") -> dict[str, Any]:
    """The result of the task called ``name`` on ``host`` (the first, if it ran twice)."""
    for play in out["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"] == name and host in task["hosts"]:
                result: dict[str, Any] = task["hosts"][host]
                return result
    raise AssertionError(f"no task {name!r} ran on {host}")


def changed_tasks(out: dict[str, Any]) -> list[str]:
    """The names of the tasks that reported a change (or would have, in check mode)."""
    return [
        task["task"]["name"]
        for play in out["plays"]
        for task in play["tasks"]
        if any(result.get("changed") for result in task["hosts"].values())
    ]
