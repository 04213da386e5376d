"""pyqmail__reload_routes is the one table of which daemon reloads for which control file.

Every control file a role writes or removes is in it, and every such task notifies exactly the
handlers the table gives (through filter_plugins' pyqmail_reload_handlers). The table itself
is compared with the daemons' own control-file readers elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
_SPEC = importlib.util.spec_from_file_location(
    "pyqmail_filters", REPO / "filter_plugins/pyqmail.py"
)
assert _SPEC is not None and _SPEC.loader is not None
filters: Any = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(filters)

VARS = yaml.safe_load((ROLES / "pyqmail_control" / "vars" / "main.yml").read_text())
ROUTES: dict[str, list[str]] = yaml.safe_load(
    (ROLES / "pyqmail" / "vars" / "main.yml").read_text()
)["pyqmail__reload_routes"]


def tasks(role: str) -> list[dict[str, Any]]:
    """The tasks of a role's main.yml, blocks flattened."""
    out: list[dict[str, Any]] = []
    for task in yaml.safe_load((ROLES / role / "tasks" / "main.yml").read_text()):
        out.extend(task.get("block", [task]))
    return out


def target(task: dict[str, Any]) -> str:
    """The dest/path a task writes or removes, '' when it has none."""
    for value in task.values():
        if isinstance(value, dict) and ("dest" in value or "path" in value):
            if value.get("state") == "directory":
                return ""
            return str(value.get("dest", value.get("path", "")))
    return ""


def control_files(task: dict[str, Any]) -> list[str] | None:
    """Names of the control files a task writes/removes; None when its names are inventory data
    (the extra files), [] when it touches no control file."""
    files_args = task.get("pyqmail.mail.pyqmail_control_files")
    if files_args is not None:  # a set of files in one call (values: the extra files)
        return None if "values" in files_args else [f["name"] for f in files_args["files"]]
    path = target(task)
    loop = task.get("loop", [])
    if "/control/tlshosts/" in path or (path == "{{ item }}" and "tlshosts" in str(loop)):
        return ["tlshosts"]
    if "/control/" not in path:
        return []
    name = path.split("/control/", 1)[1]
    if "{{" not in name:
        return [name]
    if name == "{{ item }}":
        return list(loop)
    if name == "{{ item.name }}":
        return [entry["name"] for entry in loop]
    if name == "{{ item.key }}":
        return None
    raise AssertionError(f"{task['name']}: cannot tell which control file {path!r} is")


def notified(task: dict[str, Any]) -> list[str]:
    value = task.get("notify", [])
    return [value] if isinstance(value, str) else list(value)


CONTROL_TASKS = [
    task for task in tasks("pyqmail_control") if control_files(task) or control_files(task) is None
]


def test_every_managed_file_has_a_route() -> None:
    missing = [name for name in VARS["pyqmail_control__managed"] if name not in ROUTES]
    assert missing == [], f"add these to pyqmail__reload_routes: {missing}"
    for name, daemons in ROUTES.items():
        assert set(daemons) <= {"smtpd", "send"}, name
        assert len(set(daemons)) == len(daemons), name


@pytest.mark.parametrize("task", CONTROL_TASKS, ids=[t["name"] for t in CONTROL_TASKS])
def test_control_task_notifies_what_the_table_says(task: dict[str, Any]) -> None:
    names = control_files(task)
    if names is None:  # extra files: routed by the one routing task
        assert "notify" not in task, f"{task['name']}: the routing task notifies for it"
        assert task.get("register"), f"{task['name']}: register it for the routing task"
        return
    for name in names:
        assert name in ROUTES, f"{task['name']}: {name} is not in pyqmail__reload_routes"
    want = filters.reload_handlers(names, ROUTES)
    for name in names:  # one task, one route: a loop notifies for all its items at once
        assert filters.reload_handlers([name], ROUTES) == want, (task["name"], name)
    assert sorted(notified(task)) == sorted(want), task["name"]


def test_extra_files_are_routed_through_the_table() -> None:
    routing = [t for t in tasks("pyqmail_control") if "pyqmail_reload_handlers" in str(t)]
    assert len(routing) == 1
    task = routing[0]
    assert "pyqmail_reload_handlers(pyqmail__reload_routes)" in task["notify"]
    registered = {t["register"] for t in CONTROL_TASKS if control_files(t) is None}
    for name in registered:
        assert name in str(task["vars"]), f"the routing task ignores {name}"
    assert len(registered) == 1  # written and removed in one pyqmail_control_files call


# The control files Dovecot reads too (ssl_cert, ssl_key): they reload it beside the listeners.
DOVECOT_READS = {"servercert.pem"}


@pytest.mark.parametrize("role", ["pyqmail_certificates", "pyqmail_mailboxes"])
def test_other_roles_control_files_notify_what_the_table_says(role: str) -> None:
    for task in tasks(role):
        path = target(task)
        match = re.search(r"/control/([a-z][a-z0-9.-]*)$", path)
        if match is None:
            continue
        want = filters.reload_handlers([match.group(1)], ROUTES)
        if match.group(1) in DOVECOT_READS:  # Dovecot is no daemon of the table's
            want = [*want, "pyqmail reload dovecot"]
        assert sorted(notified(task)) == sorted(want), f"{role}: {task['name']}"


def run_extra_tasks(root: Path, extra: dict[str, Any]) -> str:
    """The role's own extra-file tasks in a play on ``root`` with handlers that only print."""
    extra_tasks = [t for t in tasks("pyqmail_control") if "extra" in t["name"]]
    assert len(extra_tasks) == 2  # write/remove in one call, then the routing task
    handlers = [
        {"name": f"stub {h}", "ansible.builtin.debug": {"msg": f"HANDLER {h}"}, "listen": h}
        for h in ("pyqmail reload listeners", "pyqmail reload send")
    ]
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "connection": "local",
            "vars": {
                "pyqmail__root": str(root),
                "pyqmail_control__extra": extra,
                "pyqmail__reload_routes": ROUTES,
            },
            "tasks": extra_tasks,
            "handlers": handlers,
        }
    ]
    playbook = root / "play.yml"
    playbook.write_text(json.dumps(play))
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
         "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_extra_files_reload_exactly_their_readers(tmp_path: Path) -> None:
    """Through Ansible: each change notifies the table's daemons; no change, no reload."""
    (tmp_path / "control").mkdir()
    out = run_extra_tasks(tmp_path, {"queuelifetime": 600})
    assert "HANDLER pyqmail reload send" in out
    assert "HANDLER pyqmail reload listeners" not in out
    assert (tmp_path / "control" / "queuelifetime").read_text() == "600\n"
    out = run_extra_tasks(tmp_path, {"queuelifetime": 600, "maxconn": 40})
    assert "HANDLER pyqmail reload listeners" in out
    assert "HANDLER pyqmail reload send" not in out, "queuelifetime did not change"
    out = run_extra_tasks(tmp_path, {"queuelifetime": None, "maxconn": 40})
    assert "HANDLER pyqmail reload send" in out
    assert "HANDLER pyqmail reload listeners" not in out
    assert not (tmp_path / "control" / "queuelifetime").exists()
    out = run_extra_tasks(tmp_path, {"maxconn": 40, "newknob": "x"})
    assert "HANDLER pyqmail reload send" in out and "HANDLER pyqmail reload listeners" in out
    out = run_extra_tasks(tmp_path, {"maxconn": 40, "newknob": "x"})
    assert "HANDLER" not in out
