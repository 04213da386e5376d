"""A restart a change needs is noted on the host before the change, and removed by the restart's
handler only after the restart (README, "A restart that did not happen"): the role pyqmail's
``tasks/restart_note.yml`` (entry point restart_note), which pyqmail_users (a daemon user's
groups: pyqmail__restart_marker, every daemon), pyqmail_dkim (pyqmail-send's manager joins the
keys' group: pyqmail__send_restart_marker, pyqmail-send alone) and pyqmail_scanners (a
scanner's configuration or run script: its supervise directory's restart-pending; its log
service's run script: log/restart-pending) include, as pyqmail_install does before a new wheel
(tests/roles/test_install_wheel.py runs that one).

How each role wires it is read from its YAML: a check-mode look at the change first, the note
from it, then the change itself, notifying the handler that removes the note after the restart.
(Those roles' changes are this machine's accounts, or a scanner: tests/roles/
test_scanner_restart_note.py runs the scanners' for real.) The shared tasks and the role
pyqmail's handlers run for real by ansible-playbook, with this checkout's pyqmail-send --check
and a real supervise running a stand-in qmail-send, in a temporary tree: a run that ends before
its handlers and a run whose check refuses leave the note, the next run restarts pyqmail-send
although nothing changes any more, and the run after that changes nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, listeners_root
from tests.roles.playbook import ROLES, ansible_playbook, changed_tasks, results_by_task
from tests.roles.test_conftests import VENV

INCLUDE = {
    "name": "pyqmail.mail.pyqmail",
    "tasks_from": "restart_note",
    "handlers_from": "restart_note",
}


def task_file(role: str, name: str = "main.yml") -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = yaml.safe_load((ROLES / role / "tasks" / name).read_text())
    return tasks


def handler_file(role: str) -> list[dict[str, Any]]:
    handlers: list[dict[str, Any]] = yaml.safe_load(
        (ROLES / role / "handlers" / "main.yml").read_text()
    )
    return handlers


def module(task: dict[str, Any]) -> str:
    return next(key for key in task if "." in key)


def listens(handler: dict[str, Any]) -> set[str]:
    value = handler.get("listen", [])
    return {value} if isinstance(value, str) else set(value)


# (role, task file, the check-mode looks, the changes, the note, the handler)
WIRING = [
    (
        "pyqmail_users",
        "main.yml",
        ["Find whether the service users change (their daemons then restart)"],
        ["Create the service users"],
        "{{ pyqmail__restart_marker }}",
        "pyqmail restart daemons",
    ),
    (
        "pyqmail_dkim",
        "main.yml",
        ["Find whether pyqmail-send's manager joins that group (pyqmail-send then restarts)"],
        ["Put pyqmail-send's manager in that group (it gets its groups when it starts)"],
        "{{ pyqmail__send_restart_marker }}",
        "pyqmail restart send",
    ),
    (
        "pyqmail_scanners",
        "supervise.yml",
        [
            "Find the configuration files this run changes: {{ pyqmail_scanners__service }}",
            "Find whether this run changes the run script: {{ pyqmail_scanners__service }}",
        ],
        [
            "Write the configuration of {{ pyqmail_scanners__service }}",
            "Write the run script of {{ pyqmail_scanners__service }}",
        ],
        "{{ pyqmail__root }}/supervise/{{ pyqmail_scanners__service }}/restart-pending",
        "pyqmail_scanners restart {{ pyqmail_scanners__service }}",
    ),
    (
        "pyqmail_scanners",
        "supervise.yml",
        [
            "Find whether this run changes the log service's run script: "
            "{{ pyqmail_scanners__service }}"
        ],
        ["Write the log service's run script of {{ pyqmail_scanners__service }}"],
        "{{ pyqmail__root }}/supervise/{{ pyqmail_scanners__service }}/log/restart-pending",
        "pyqmail_scanners restart {{ pyqmail_scanners__service }} log",
    ),
]


@pytest.mark.parametrize(
    "wiring", WIRING, ids=[w[0] + ("-log" if "/log/" in w[4] else "") for w in WIRING]
)
def test_the_note_is_written_before_the_change_from_a_look_at_that_very_change(
    wiring: tuple[str, str, list[str], list[str], str, str],
) -> None:
    role, tasks_file, looks, changes, note, handler = wiring
    tasks = task_file(role, tasks_file)
    names = [task.get("name") for task in tasks]
    [include] = [
        t
        for t in tasks
        if t.get("ansible.builtin.include_role") == INCLUDE
        and t["vars"]["pyqmail__restart_note"] == note
    ]
    at = tasks.index(include)
    assert all(names.index(look) < at for look in looks), names
    assert all(names.index(change) > at for change in changes), names
    assert include["vars"]["pyqmail__restart_note_handler"] == handler
    due = include["vars"]["pyqmail__restart_note_due"]
    for look, change in zip(looks, changes, strict=True):
        seen, done = tasks[names.index(look)], tasks[names.index(change)]
        assert seen["check_mode"] is True and "check_mode" not in done
        assert seen["register"] in due, (seen["register"], due)
        # the same module, arguments, loop and condition: the look sees what the change does
        assert module(seen) == module(done)
        assert seen[module(seen)] == done[module(done)]
        for key in ("loop", "when"):
            assert seen.get(key) == done.get(key), key
        assert done["notify"] == handler


@pytest.mark.parametrize(
    ("role", "note", "topic"),
    [
        ("pyqmail", "{{ pyqmail__restart_marker }}", "pyqmail restart daemons"),
        ("pyqmail", "{{ pyqmail__send_restart_marker }}", "pyqmail restart send"),
        ("pyqmail", "{{ pyqmail__send_restart_marker }}", "pyqmail restart daemons"),
        (
            "pyqmail_scanners",
            "{{ pyqmail__root }}/supervise/{{ pyqmail_scanners__rspamd_service }}/restart-pending",
            "pyqmail_scanners restart rspamd",
        ),
        (
            "pyqmail_scanners",
            "{{ pyqmail__root }}/supervise/{{ pyqmail_scanners__clamd_service }}/restart-pending",
            "pyqmail_scanners restart clamd",
        ),
        (
            "pyqmail_scanners",
            "{{ pyqmail__root }}/supervise/{{ pyqmail_scanners__rspamd_service }}"
            "/log/restart-pending",
            "pyqmail_scanners restart rspamd log",
        ),
        (
            "pyqmail_scanners",
            "{{ pyqmail__root }}/supervise/{{ pyqmail_scanners__clamd_service }}"
            "/log/restart-pending",
            "pyqmail_scanners restart clamd log",
        ),
    ],
)
def test_the_restart_handler_removes_the_note_after_the_restart(
    role: str, note: str, topic: str
) -> None:
    handlers = [h for h in handler_file(role) if topic in listens(h)]
    [forget] = [h for h in handlers if h.get("ansible.builtin.file", {}).get("path") == note]
    assert forget["ansible.builtin.file"]["state"] == "absent"
    restarts = [
        h
        for h in handlers
        if h.get("pyqmail.mail.pyqmail_service", {}).get("state") == "restarted"
        or "svc -t" in h["name"]
    ]
    assert restarts, handlers
    assert all(handlers.index(r) < handlers.index(forget) for r in restarts)


def test_the_shared_tasks_are_the_role_pyqmails_entry_point() -> None:
    specs = yaml.safe_load((ROLES / "pyqmail" / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["restart_note"]["options"]
    assert sorted(options) == [
        "pyqmail__restart_note",
        "pyqmail__restart_note_due",
        "pyqmail__restart_note_handler",
    ]
    assert all(option["required"] for option in options.values())
    assert yaml.safe_load((ROLES / "pyqmail" / "handlers" / "restart_note.yml").read_text()) == []


# --- the shared tasks and the role pyqmail's handlers, for real ------------------------------

RESTART_SEND = "Restart pyqmail-send alone (svc -t, then check it stays up)"
REFUSE_SEND = "Refuse to signal pyqmail-send with a configuration it cannot load"


def svstat_pid(service: Path) -> int:
    done = subprocess.run(["svstat", str(service)], capture_output=True, text=True, check=False)
    words = done.stdout.split()
    return int(words[3].rstrip(")")) if len(words) > 3 and words[1] == "up" else 0


@pytest.fixture
def host(pki: PKI) -> Iterator[QmailRoot]:
    """A qmail root pyqmail-send loads, a real supervise running a stand-in qmail-send (linked
    into <root>/service), and a directory for the notes."""
    if shutil.which("supervise") is None or not IS_ROOT:
        pytest.skip("needs daemontools and root (pyqmail-send --check drops to its user)")
    base = Path(tempfile.mkdtemp(prefix="pyqmail-notes-"))
    base.chmod(0o755)
    root = listeners_root(base / "qmail", pki)
    (base / "notes").mkdir()
    service = root.path / "supervise" / "qmail-send"
    service.mkdir(parents=True)
    (service / "run").write_text("#!/bin/sh\nexec sleep 600\n")
    (service / "run").chmod(0o755)
    (root.path / "service").mkdir()
    (root.path / "service" / "qmail-send").symlink_to(service)
    proc = subprocess.Popen(["supervise", str(service)])
    for _ in range(100):
        if svstat_pid(service):
            break
        time.sleep(0.05)
    try:
        yield root
    finally:
        subprocess.run(["svc", "-dx", str(service)], check=False)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def run(
    root: QmailRoot,
    *args: str,
    due: bool = False,
    handler: str = "pyqmail restart send",
    note: str = "{{ pyqmail__send_restart_marker }}",
    fail_after: bool = False,
    **more: Any,
) -> tuple[int, dict[str, Any]]:
    """The shared tasks as a role includes them (include_role, the entry point's checks), then
    a task that fails if asked (no force_handlers: the run ends before its handlers), with the
    role pyqmail's handlers."""
    base = root.path.parent
    tasks: list[dict[str, Any]] = [
        {
            "name": "Note the restart before the change",
            "ansible.builtin.include_role": INCLUDE,
            "vars": {
                "pyqmail__restart_note": note,
                "pyqmail__restart_note_due": due,
                "pyqmail__restart_note_handler": handler,
            },
        }
    ]
    if fail_after:
        tasks.append({"name": "The run ends here", "ansible.builtin.fail": {"msg": "interrupted"}})
    play = {
        "name": "A restart noted",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars_files": [str(ROLES / "pyqmail" / part / "main.yml") for part in ("defaults", "vars")],
        "tasks": tasks,
        "handlers": [
            {"ansible.builtin.import_tasks": str(ROLES / "pyqmail" / "handlers" / "main.yml")}
        ],
    }
    (base / "play.yml").write_text(json.dumps([play]))
    extra = {
        "pyqmail__root": str(root.path),
        "pyqmail__service_dir": str(root.path / "service"),
        "pyqmail__rules_path": str(root.path / "etc" / "smtp"),
        "pyqmail__venv": str(VENV),  # its pyqmail-send: this checkout's
        "pyqmail__restart_marker": str(base / "notes" / "pyqmail-restart-pending"),
        "pyqmail__send_restart_marker": str(base / "notes" / "pyqmail-send-restart-pending"),
        "pyqmail__send_user": DROP_USER,
        "pyqmail__check_fresh": False,
        "pyqmail__preflight_done": True,
        **more,
    }
    proc = ansible_playbook(base / "play.yml", extra, *args, cwd=base)
    return proc.returncode, json.loads(proc.stdout)


def test_a_restart_that_did_not_happen_runs_on_the_next_run(host: QmailRoot) -> None:
    note = host.path.parent / "notes" / "pyqmail-send-restart-pending"
    send = host.path / "service" / "qmail-send"
    started = svstat_pid(send)
    assert started

    # The change comes, the run ends before its handlers: the note stays.
    rc, out = run(host, due=True, fail_after=True)
    assert rc != 0
    assert RESTART_SEND not in results_by_task(out)
    assert note.is_file()
    assert oct(note.stat().st_mode & 0o777) == "0o600"
    assert svstat_pid(send) == started

    # Nothing changes now; the note restarts, but the check refuses: the note stays.
    host.control("concurrencyremote", "many\n")
    rc, out = run(host)
    assert rc != 0
    ran = results_by_task(out)
    assert "concurrencyremote" in ran[REFUSE_SEND][0]["msg"], ran[REFUSE_SEND]
    assert RESTART_SEND not in ran
    assert note.is_file()
    assert svstat_pid(send) == started

    # The configuration fixed: pyqmail-send restarts, then the note goes.
    host.remove_control("concurrencyremote")
    rc, out = run(host)
    assert rc == 0, json.dumps(out)[-3000:]
    assert RESTART_SEND in changed_tasks(out)
    assert svstat_pid(send) not in (0, started)
    assert not note.exists()
    rc, out = run(host)
    assert rc == 0
    assert changed_tasks(out) == []


def test_no_note_without_its_directory_nor_in_check_mode(host: QmailRoot) -> None:
    """A note whose directory is missing (the daemons' virtualenv before the first install):
    nothing runs from there, nothing is noted or restarted. Check mode writes nothing."""
    send = host.path / "service" / "qmail-send"
    started = svstat_pid(send)
    missing = host.path.parent / "no-venv" / "pyqmail-send-restart-pending"
    rc, out = run(host, due=True, pyqmail__send_restart_marker=str(missing))
    assert rc == 0, json.dumps(out)[-3000:]
    assert changed_tasks(out) == []
    assert not missing.parent.exists()
    note = host.path.parent / "notes" / "pyqmail-send-restart-pending"
    rc, out = run(host, "--check", due=True)
    assert rc == 0, json.dumps(out)[-3000:]
    assert not note.exists()
    assert svstat_pid(send) == started


def test_a_note_whose_directory_is_a_link_is_written(host: QmailRoot) -> None:
    """The note's directory a symbolic link to a directory (a virtualenv kept elsewhere): the
    note is written there all the same (a stat without follow saw no directory and skipped it,
    leaving the restart unprotected)."""
    real = host.path.parent / "real-notes"
    real.mkdir()
    linked = host.path.parent / "linked-notes"
    linked.symlink_to(real)
    rc, out = run(
        host,
        due=True,
        fail_after=True,
        pyqmail__send_restart_marker=str(linked / "pyqmail-send-restart-pending"),
    )
    assert rc != 0
    assert RESTART_SEND not in results_by_task(out)
    assert (real / "pyqmail-send-restart-pending").is_file()


def test_a_restart_of_the_daemons_removes_both_notes(host: QmailRoot) -> None:
    """pyqmail-send restarts with the daemons too: that restart removes its note as well."""
    notes = host.path.parent / "notes"
    for name in ("pyqmail-restart-pending", "pyqmail-send-restart-pending"):
        (notes / name).touch(mode=0o600)
    started = svstat_pid(host.path / "service" / "qmail-send")
    rc, out = run(host, handler="pyqmail restart daemons", note="{{ pyqmail__restart_marker }}")
    assert rc == 0, json.dumps(out)[-3000:]
    assert "Restart the daemons (svc -t)" in changed_tasks(out)
    assert list(notes.iterdir()) == []
    time.sleep(0.5)
    assert svstat_pid(host.path / "service" / "qmail-send") not in (0, started)
