"""The checkout runs its playbooks with Mitogen's strategy (ansible.cfg, strategy_plugins/):
one interpreter per host for the whole run: a run of site.yml that changes nothing takes about
13 s with it and 39 s with Ansible's linear strategy (bench/README.md, "Provisioning time")."""

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


def module_parents(tmp_path: Path, **env: str) -> tuple[list[str], str]:
    """The process that ran each task's module (the shell's parent), task by task, and what
    ansible-playbook wrote to stderr (its warnings)."""
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
        env={k: v for k, v in ansible_env().items() if k != "ANSIBLE_STRATEGY"} | env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    parents = [task["hosts"]["localhost"]["stdout"] for task in out["plays"][0]["tasks"]]
    return parents, proc.stderr


def test_the_checkout_runs_modules_in_one_interpreter_per_host(tmp_path: Path) -> None:
    (first, second), stderr = module_parents(tmp_path)
    assert first == second, "ansible.cfg's strategy is not Mitogen's: a process per task"
    assert "Mitogen is not installed" not in stderr


def test_the_linear_strategy_is_one_variable_away(tmp_path: Path) -> None:
    """ANSIBLE_STRATEGY=linear (as the README says) runs the same tasks without Mitogen."""
    (first, second), stderr = module_parents(tmp_path, ANSIBLE_STRATEGY="linear")
    assert first != second
    assert "Mitogen is not installed" not in stderr


def test_without_mitogen_the_checkout_still_runs_and_says_why(tmp_path: Path) -> None:
    """An ansible-playbook that cannot import Mitogen (Debian's, another venv) runs the
    linear strategy with a warning instead of failing on strategy_plugins/."""
    hide = tmp_path / "hide"
    (hide / "ansible_mitogen").mkdir(parents=True)
    (hide / "ansible_mitogen" / "__init__.py").write_text(
        "raise ImportError('hidden by the test')\n"
    )
    (first, second), stderr = module_parents(tmp_path, PYTHONPATH=str(hide))
    assert first != second
    assert "Mitogen is not installed for this ansible-playbook (hidden by the test)" in (
        " ".join(stderr.split())
    )
