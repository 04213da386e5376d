"""The checkout runs its playbooks with Mitogen's strategy (ansible.cfg, strategy_plugins/):
one interpreter per host for the whole run, which is what makes a run that changes nothing
take about 13 s instead of 49 s (bench/README.md, "Provisioning time")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.roles.playbook import REPO, ansible_env

PLAY = """---
- name: Who runs the modules
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: First
      ansible.builtin.command: sh -c 'echo $PPID'
      changed_when: false
    - name: Second
      ansible.builtin.command: sh -c 'echo $PPID'
      changed_when: false
"""


def module_parents(tmp_path: Path, **env: str) -> list[str]:
    """The process that ran each task's module (the shell's parent), task by task."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAY)
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            "localhost,",
            "-e",
            json.dumps({"ansible_python_interpreter": sys.executable}),
            str(playbook),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**ansible_env(), **env},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    return [task["hosts"]["localhost"]["stdout"] for task in out["plays"][0]["tasks"]]


def test_the_checkout_runs_modules_in_one_interpreter_per_host(tmp_path: Path) -> None:
    first, second = module_parents(tmp_path)
    assert first == second, "ansible.cfg's strategy is not Mitogen's: a process per task"


def test_the_linear_strategy_is_one_variable_away(tmp_path: Path) -> None:
    """ANSIBLE_STRATEGY=linear (as the README says) runs the same tasks without Mitogen."""
    first, second = module_parents(tmp_path, ANSIBLE_STRATEGY="linear")
    assert first != second
