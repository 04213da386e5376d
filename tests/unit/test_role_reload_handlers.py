"""Every role task that writes or removes a control file notifies exactly the daemons that
read it: ``pyqmail reload listeners`` (pyqmail-smtpd) and/or ``pyqmail reload send``.

Which daemon reads which file is taken from the daemon's own sources (``config.py`` for
pyqmail-smtpd, ``delivery.py`` Control.load for pyqmail-send), so a control file added to
either side without a matching notify in the roles fails here. ``clientcert.pem`` and the
``tlshosts/`` pins are read by pyqmail-send per attempt (remote.py); the roles reload it for
them too (harmless). The handlers themselves are exercised for real by ``make run`` and the
molecule scenarios.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "pyqmail"
ROLES = REPO / "roles"
LISTENERS = "pyqmail reload listeners"
SEND = "pyqmail reload send"

_READ = re.compile(r'\b(?:c|control) / "([a-z][a-z0-9.-]*)"')


def files_read(source: Path) -> set[str]:
    return set(_READ.findall(source.read_text()))


SMTPD_FILES = files_read(SRC / "control" / "smtpd.py") | files_read(SRC / "smtpd" / "knobs.py")
SEND_FILES = files_read(SRC / "send" / "delivery.py") | {"clientcert.pem", "tlshosts"}


def test_sources_name_the_files_we_expect() -> None:
    """Guard the regex: both sides still read their well-known files."""
    assert {"rcpthosts", "databytes", "servercert.pem", "smtpusers", "me"} <= SMTPD_FILES
    assert {"smtproutes", "smtproutes-auth", "concurrencyremote", "queuelifetime"} <= SEND_FILES
    assert "smtproutes" not in SMTPD_FILES


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


def control_targets(task: dict[str, Any]) -> list[str]:
    """The control files (or ``extra:<group>``) a task writes or removes; [] for others."""
    args = module_args(task)
    target = str(args.get("dest", args.get("path", "")))
    loop = task.get("loop", "")
    loop_text = str(loop)
    if args.get("state") == "directory" or (
        "/control/" not in target and not (target == "{{ item }}" and "tlshosts" in loop_text)
    ):
        return []
    if "tlshosts" in target or target == "{{ item }}":
        return ["tlshosts"]
    name = target.split("/control/", 1)[1]
    if "{{" not in name:
        return [name]
    if name == "{{ item }}":
        return list(loop)
    if name == "{{ item.name }}":
        return [entry["name"] for entry in loop]
    if name in ("{{ item.file }}", "{{ item.item.file }}"):
        return ["servercert.pem" if "'server'" in loop_text else "clientcert.pem"]
    if name == "{{ item.key }}":
        if "selectattr('key', 'in', pyqmail_control__send_only)" in loop_text:
            return ["extra:send"]
        if "selectattr('key', 'in', pyqmail_control__listeners_only)" in loop_text:
            return ["extra:listeners"]
        return ["extra:other"]
    raise AssertionError(f"cannot tell which control file {target!r} is")


def expected(name: str) -> set[str]:
    if name.startswith("extra:"):
        group = name.split(":", 1)[1]
        return {"send": {SEND}, "listeners": {LISTENERS}, "other": {SEND, LISTENERS}}[group]
    readers = set()
    if name in SMTPD_FILES or name == "clientca.pem":
        readers.add(LISTENERS)
    if name in SEND_FILES:
        readers.add(SEND)
    return readers


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
    assert {"servercert.pem", "clientcert.pem", "smtpusers", "extra:send"} <= names


@pytest.mark.parametrize(
    ("role", "task", "targets", "notify"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES]
)
def test_task_notifies_the_daemons_that_read_its_files(
    role: str, task: str, targets: list[str], notify: str | list[str]
) -> None:
    notified = {notify} if isinstance(notify, str) else set(notify)
    want = set().union(*(expected(t) for t in targets))
    assert want, f"{role}: {task}: no daemon reads {targets}?"
    assert notified == want, f"{role}: {task} writes {targets}: notifies {notified}, want {want}"


def test_extra_file_groups_match_the_sources() -> None:
    data = yaml.safe_load((ROLES / "pyqmail_control" / "vars" / "main.yml").read_text())
    for name in data["pyqmail_control__send_only"]:
        assert name in SEND_FILES and name not in SMTPD_FILES, name
    for name in data["pyqmail_control__listeners_only"]:
        assert name in SMTPD_FILES and name not in SEND_FILES, name


def test_send_handlers_validate_before_signalling() -> None:
    handlers = yaml.safe_load((ROLES / "pyqmail" / "handlers" / "main.yml").read_text())

    def listens(h: dict[str, Any]) -> set[str]:
        value = h.get("listen", [])
        return {value} if isinstance(value, str) else set(value)

    send = [h for h in handlers if SEND in listens(h)]
    kinds = [next(k for k in h if "." in k or k == "pyqmail_service") for h in send]
    assert kinds == [
        "ansible.builtin.stat",
        "ansible.builtin.command",
        "ansible.builtin.fail",
        "pyqmail_service",
    ]
    assert "--check" in send[1]["ansible.builtin.command"]["argv"]
    assert send[3]["pyqmail_service"]["state"] == "reloaded"
    assert send[3]["pyqmail_service"]["name"] == "qmail-send"
    # the listeners' reload never signals qmail-send, and send's reload runs before a restart
    order = [h["name"] for h in handlers]
    restart = next(i for i, h in enumerate(handlers) if "svc -t" in h["name"])
    assert order.index(send[3]["name"]) < restart
