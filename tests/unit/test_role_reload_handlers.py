"""Every control file the roles write reloads exactly the daemons that read it.

Which daemon reads which file is the daemons' own table (``pyqmail.control.table``, the
one both readers are built on), not a scan of their sources. The role routes a change
through ``pyqmail__reload_routes`` (``roles/pyqmail/vars/main.yml``,
``{<control file>: [smtpd|send, ...]}``); its tasks notify ``pyqmail reload listeners``
(every pyqmail-smtpd) and/or ``pyqmail reload send``. ``clientcert.pem`` and the
``tlshosts/`` pins are read by pyqmail-send per attempt; the role reloads it for them too
(harmless). The handlers themselves are exercised for real by ``make run`` and the molecule
scenarios; ``pyqmail-smtpd --check`` and ``pyqmail-send --check`` (which they run) by
tests/e2e/test_smtpd_check.py and tests/e2e/test_send_check.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pyqmail.control import table

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
LISTENERS = "pyqmail reload listeners"
SEND = "pyqmail reload send"
HANDLER = {table.SMTPD: LISTENERS, table.SEND: SEND}

VARS = yaml.safe_load((ROLES / "pyqmail" / "vars" / "main.yml").read_text())
ROUTES: dict[str, list[str]] = VARS["pyqmail__reload_routes"]
SMTPD_FILES = {name for name, entry in table.TABLE.items() if table.SMTPD in entry.readers}
SEND_FILES = {name for name, entry in table.TABLE.items() if table.SEND in entry.readers}


def test_the_table_names_the_files_we_expect() -> None:
    """Guard the table: both sides still read their well-known files."""
    assert {"rcpthosts", "databytes", "servercert.pem", "smtpusers", "me"} <= SMTPD_FILES
    assert {"smtproutes", "smtproutes-auth", "concurrencyremote", "queuelifetime"} <= SEND_FILES
    assert "smtproutes" not in SMTPD_FILES


def test_routes_cover_every_control_file_of_the_table() -> None:
    assert set(ROUTES) == set(table.TABLE)


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_route_is_the_tables_readers(name: str) -> None:
    routed = ROUTES[name]
    assert len(routed) == len(set(routed)), f"{name}: {routed} names a daemon twice"
    assert set(routed) == table.readers(name), (
        f"{name}: the role reloads {routed}, the daemons' table says {sorted(table.readers(name))}"
    )


def handlers(name: str) -> set[str]:
    """The handlers a change to ``name`` must notify; a name no daemon reads: both."""
    routed = ROUTES.get(name, [table.SMTPD, table.SEND])
    return {HANDLER[daemon] for daemon in routed}


def tasks(role: str) -> list[dict[str, Any]]:
    data = yaml.safe_load((ROLES / role / "tasks" / "main.yml").read_text())
    out: list[dict[str, Any]] = []
    for task in data:
        out.extend(task.get("block", [task]))
    return out


def module_args(task: dict[str, Any]) -> dict[str, Any]:
    for value in task.values():
        if isinstance(value, dict) and ("dest" in value or "path" in value):
            return value
    return {}


def _templated_targets(name: str, loop: Any) -> list[str]:
    """The files a looping task writes: ``{{ item }}``, ``{{ item.name }}``, ``{{ item.file }}``
    or the extra files (``{{ item.key }}``, reloaded by one routing task)."""
    loop_text = str(loop)
    if name == "{{ item }}":
        return list(loop)
    if name == "{{ item.name }}":
        return [entry["name"] for entry in loop]
    if name in ("{{ item.file }}", "{{ item.item.file }}"):
        return ["servercert.pem" if "'server'" in loop_text else "clientcert.pem"]
    if name == "{{ item.key }}":
        return ["extra"]  # no notify: one task routes them through pyqmail_reload_handlers
    raise AssertionError(f"cannot tell which control file {name!r} is")


def control_targets(task: dict[str, Any]) -> list[str]:
    """The control files (or ``extra``) a task writes or removes; [] for others."""
    files_args = task.get("pyqmail.mail.pyqmail_control_files")
    if files_args is not None and not str(files_args.get("path", "")).endswith("/control"):
        return []  # the module writes elsewhere too (users/logins, users/senders)
    if files_args is not None:  # a set of files in one call: the listed names, or the extra ones
        loop = task.get("loop", "")
        names = [entry["name"] for entry in files_args.get("files", [])]
        return [
            target
            for name in names
            for target in (_templated_targets(name, loop) if "{{" in name else [name])
        ] + (["extra"] if "values" in files_args else [])
    args = module_args(task)
    target = str(args.get("dest", args.get("path", "")))
    loop = task.get("loop", "")
    if args.get("state") == "directory" or (
        "/control/" not in target and not (target == "{{ item }}" and "tlshosts" in str(loop))
    ):
        return []
    if "tlshosts" in target or target == "{{ item }}":
        return ["tlshosts"]
    name = target.split("/control/", 1)[1]
    return [name] if "{{" not in name else _templated_targets(name, loop)


# Readers outside the daemons' table: Dovecot serves IMAP/POP3 with servercert.pem (its
# ssl_cert and ssl_key), and reloads on it alone of the control files.
OUTSIDE_READERS = {"servercert.pem": {"pyqmail reload dovecot"}}


def expected(target: str) -> set[str]:
    """Handlers for a file, or for a group of extra files (selected by their route)."""
    if target == "extra":
        return set()  # one routing task notifies (tests/roles/test_control_routes.py)
    return handlers(target) | OUTSIDE_READERS.get(target, set())


CASES = [
    (role, task["name"], targets, task.get("notify", []))
    for role in ("pyqmail_control", "pyqmail_certificates", "pyqmail_mailboxes")
    for task in tasks(role)
    if (targets := control_targets(task))
]


def test_every_control_file_task_is_covered() -> None:
    names = {t for _, _, targets, _ in CASES for t in targets}
    for required in ("me", "smtproutes", "smtproutes-auth", "concurrencyremote", "tlshosts"):
        assert required in names
    assert {"servercert.pem", "clientcert.pem", "smtpusers", "extra"} <= names
    for name in names - {"extra"}:
        assert name in ROUTES, f"the role writes control/{name}, which has no route"


@pytest.mark.parametrize(
    ("role", "task", "targets", "notify"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES]
)
def test_task_notifies_the_daemons_that_read_its_files(
    role: str, task: str, targets: list[str], notify: str | list[str]
) -> None:
    notified = {notify} if isinstance(notify, str) else set(notify)
    want = set().union(*(expected(t) for t in targets))
    assert want or targets == ["extra"], f"{role}: {task}: no daemon reads {targets}?"
    assert notified == want, f"{role}: {task} writes {targets}: notifies {notified}, want {want}"


def _listens(handler: dict[str, Any]) -> set[str]:
    value = handler.get("listen", [])
    return {value} if isinstance(value, str) else set(value)


def _kind(handler: dict[str, Any]) -> str:
    return next(k for k in handler if "." in k)


HANDLERS: list[dict[str, Any]] = yaml.safe_load(
    (ROLES / "pyqmail" / "handlers" / "main.yml").read_text()
)
PYQMAIL_VARS: dict[str, Any] = yaml.safe_load((ROLES / "pyqmail" / "vars" / "main.yml").read_text())


def _check(handler: dict[str, Any]) -> str:
    """The command a validating handler runs, as written: the shared variable it names (the
    one the services' conftest scripts run too, tests/roles/test_conftests.py) looked up."""
    argv = handler["ansible.builtin.command"]["argv"]
    assert isinstance(argv, str), f"{handler['name']}: argv written out, not the shared command"
    name = argv.removeprefix("{{ ").removesuffix(" }}")
    assert name.endswith("_conftest"), argv
    return str(PYQMAIL_VARS[name])


def test_send_handlers_validate_before_signalling() -> None:
    send = [h for h in HANDLERS if SEND in _listens(h)]
    kinds = [_kind(h) for h in send]
    assert kinds == [
        "ansible.builtin.stat",
        "ansible.builtin.command",
        "ansible.builtin.fail",
        "pyqmail.mail.pyqmail_service",
        "pyqmail.mail.pyqmail_loaded",  # the note of what it loaded, after the signal
    ]
    assert "'--check'" in _check(send[1])
    assert send[3]["pyqmail.mail.pyqmail_service"]["state"] == "reloaded"
    assert send[3]["pyqmail.mail.pyqmail_service"]["name"] == "qmail-send"
    note = send[4]["pyqmail.mail.pyqmail_loaded"]
    assert (note["daemons"], note["state"]) == (["send"], "noted")
    # the listeners' reload never signals qmail-send, and send's reload runs before a restart
    order = [h["name"] for h in HANDLERS]
    restart = next(i for i, h in enumerate(HANDLERS) if "svc -t" in h["name"])
    assert order.index(send[3]["name"]) < restart


def test_listener_handlers_run_the_daemons_own_check_before_signalling() -> None:
    """pyqmail-smtpd --check per listener, as the daemon's user, then the fail, then svc -h:
    no inline Python that loads the configuration its own way."""
    listeners = [h for h in HANDLERS if LISTENERS in _listens(h)]
    kinds = [_kind(h) for h in listeners]
    assert kinds[:5] == [
        "ansible.builtin.find",  # the linked listeners
        "ansible.builtin.find",  # the listeners' own rules cdbs there are
        "ansible.builtin.command",
        "ansible.builtin.fail",
        "ansible.builtin.command",
    ]
    argv = _check(listeners[2])
    assert argv.startswith("{{ [pyqmail__venv ~ '/bin/pyqmail-smtpd', '--check', ")
    for option in ("--root", "--mode", "--rules", "--user"):
        assert f"'{option}'" in argv, option
    assert "'-c'" not in argv
    assert "svc" in listeners[4]["ansible.builtin.command"]["argv"]
    restart = next(h for h in HANDLERS if "svc -t" in h["name"])
    assert {LISTENERS, "pyqmail restart daemons"} <= _listens(listeners[1])
    assert {LISTENERS, "pyqmail restart daemons"} <= _listens(listeners[2])
    assert HANDLERS.index(listeners[3]) < HANDLERS.index(restart)


def test_listener_modes_are_the_services_kinds() -> None:
    """The handler's service -> --mode map is the one the run scripts are written from."""
    modes = yaml.safe_load((ROLES / "pyqmail" / "vars" / "main.yml").read_text())
    kinds = yaml.safe_load((ROLES / "pyqmail_services" / "vars" / "main.yml").read_text())
    assert modes["pyqmail__listener_modes"] == {
        kind["service"]: kind["mode"] for kind in kinds["pyqmail_services__kinds"].values()
    }


RESTART_SEND = "pyqmail restart send"


def test_dkim_group_restarts_pyqmail_send_alone() -> None:
    """pyqmail-send's manager reads a new group (the DKIM keys') only at start; the listeners
    never read the keys, so enabling DKIM must not svc -t them (it was "restart daemons")."""
    dkim = yaml.safe_load((ROLES / "pyqmail_dkim" / "tasks" / "main.yml").read_text())
    grouping = next(t for t in dkim if "ansible.builtin.user" in t and not t.get("check_mode"))
    assert grouping["notify"] == RESTART_SEND
    restart = [h for h in HANDLERS if RESTART_SEND in _listens(h)]
    assert [_kind(h) for h in restart] == [
        "ansible.builtin.stat",
        "ansible.builtin.command",
        "ansible.builtin.fail",
        "pyqmail.mail.pyqmail_service",
        "pyqmail.mail.pyqmail_loaded",  # what it loaded, after the restart
        "ansible.builtin.file",  # the note pyqmail__send_restart_marker, after the restart
    ]
    assert "'--check'" in _check(restart[1])
    service = restart[3]["pyqmail.mail.pyqmail_service"]
    assert (service["name"], service["state"]) == ("qmail-send", "restarted")
    assert "smtpd" not in yaml.safe_dump(restart)
    assert all(HANDLERS.index(restart[i]) < HANDLERS.index(restart[3]) for i in range(3))
    assert restart[4]["pyqmail.mail.pyqmail_loaded"]["daemons"] == ["send"]
    assert restart[5]["ansible.builtin.file"] == {
        "path": "{{ pyqmail__send_restart_marker }}",
        "state": "absent",
    }
