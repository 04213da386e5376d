"""How the role tests run ansible-playbook: this checkout's ansible.cfg, JSON output, quiet.

``run_role_tasks`` writes and runs the one play the role tests need: the tasks of some roles on
localhost as a role run has them (the role pyqmail's defaults and vars, each role's defaults,
vars and handlers, then the role pyqmail's handlers; each role's templates and files where the
play's lookups find them), with a test's own tasks before or after them. ``ansible_playbook``
is the command line alone, for a test that writes a play of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
JSON_CALLBACK = "ansible.builtin.json"


def ansible_env(callback: str = JSON_CALLBACK) -> dict[str, str]:
    """The test process's environment plus the settings every role test's playbook needs;
    ``callback`` prints the run (JSON unless a test reads what an operator would see)."""
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": callback,
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "PYTHONWARNINGS": "ignore",
    }


def ansible_playbook(
    playbook: Path,
    extra: dict[str, Any],
    *args: str,
    cwd: Path,
    callback: str = JSON_CALLBACK,
    timeout: int = 300,
    wrapper: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``playbook`` on localhost with this interpreter; ``extra`` are the extra vars,
    ``args`` more options (``--check``, ``-vvv``); ``wrapper`` runs the command (``unshare``
    into a mount namespace of the test's). The exit status is the caller's to judge."""
    extra = {"ansible_python_interpreter": sys.executable, **extra}
    return subprocess.run(
        [
            *(wrapper or []),
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i",
            "localhost,",
            "-e",
            json.dumps(extra),
            *args,
            str(playbook),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ansible_env(callback),
        timeout=timeout,
        check=False,
    )


def link_tree(source: Path, target: Path) -> None:
    """Each file under ``source`` linked at the same place under ``target``, so the trees of
    several roles (templates/var/qmail/control of two roles) merge into the play's one."""
    for path in sorted(source.rglob("*")):
        link = target / path.relative_to(source)
        if path.is_file() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)


def role_play(
    roles: tuple[str, ...],
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    gather_subset: list[str] | None,
) -> list[dict[str, Any]]:
    """The one play (as data: JSON is YAML) that runs ``roles``' tasks as their roles would."""
    vars_files = [
        ROLES / "pyqmail" / "defaults" / "main.yml",
        ROLES / "pyqmail" / "vars" / "main.yml",
    ]
    vars_files += [
        ROLES / role / part / "main.yml" for role in roles for part in ("defaults", "vars")
    ]
    handlers = [ROLES / role / "handlers" / "main.yml" for role in (*roles, "pyqmail")]
    play: dict[str, Any] = {
        "name": "Role tasks under test",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": gather_subset is not None,
        "vars_files": [str(path) for path in vars_files if path.is_file()],
        "tasks": [
            *before,
            *(
                {
                    "name": f"The role {role}'s tasks",
                    "ansible.builtin.include_tasks": str(ROLES / role / "tasks" / "main.yml"),
                }
                for role in roles
            ),
            *after,
        ],
        "handlers": [
            {
                "name": f"The handlers of {path.parent.parent.name}",
                "ansible.builtin.import_tasks": str(path),
            }
            for path in handlers
            if path.is_file()
        ],
    }
    if gather_subset is not None:
        play["gather_subset"] = gather_subset
    return [play]


def run_role_tasks(
    roles: tuple[str, ...],
    base: Path,
    extra: dict[str, Any],
    *args: str,
    must_pass: bool = True,
    before: list[dict[str, Any]] | None = None,
    after: list[dict[str, Any]] | None = None,
    gather_subset: list[str] | None = None,
    timeout: int = 300,
) -> dict[str, Any]:
    """Run the tasks of ``roles`` on localhost from ``base`` (the play is written there); ``extra``
    are the extra vars, ``args`` more ansible-playbook options (``--check``, ``--diff``).

    ``before`` and ``after`` are tasks of the test's own around the roles' (``roles`` may be
    empty: a task that notifies the role pyqmail's handlers); ``gather_subset`` gathers those
    facts (none by default). Returns the JSON callback's output; a failed run fails the test
    unless ``must_pass`` is false (a test of what a role refuses reads the failed task).
    """
    base.mkdir(parents=True, exist_ok=True)
    playbook = base / "play.yml"
    playbook.write_text(json.dumps(role_play(roles, before or [], after or [], gather_subset)))
    for role in roles:  # where the included tasks' template and file lookups find them
        for part in ("templates", "files"):
            link_tree(ROLES / role / part, base / part)
    proc = ansible_playbook(playbook, extra, *args, cwd=base, timeout=timeout)
    assert proc.returncode == 0 or not must_pass, proc.stdout[-4000:] + proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def results_by_task(
    out: dict[str, Any], host: str = "localhost"
) -> dict[str, list[dict[str, Any]]]:
    """Task name -> its results on ``host``, in the order they ran (a task may run twice)."""
    ran: dict[str, list[dict[str, Any]]] = {}
    for play in out["plays"]:
        for task in play["tasks"]:
            if host in task["hosts"]:
                ran.setdefault(task["task"]["name"], []).append(task["hosts"][host])
    return ran


def task_result(out: dict[str, Any], name: str, host: str = "localhost") -> dict[str, Any]:
    """The result of the task called ``name`` on ``host`` (the first, if it ran twice)."""
    results = results_by_task(out, host).get(name)
    if not results:
        raise AssertionError(f"no task {name!r} ran on {host}")
    return results[0]


def changed_tasks(out: dict[str, Any]) -> list[str]:
    """The names of the tasks that reported a change (or would have, in check mode)."""
    return [
        task["task"]["name"]
        for play in out["plays"]
        for task in play["tasks"]
        if any(result.get("changed") for result in task["hosts"].values())
    ]
