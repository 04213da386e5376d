"""The role writes every blocklist and greylisting file with the daemon's own defaults
(``pyqmail.control.table``), and what it writes for its defaults loads cleanly."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyqmail.checks.screen import load as load_screen
from pyqmail.control import table

ROLE = Path(__file__).resolve().parents[2] / "roles" / "pyqmail_control"
NUMBERS = {
    "dnsblthreshold": table.DNSBLTHRESHOLD,
    "dnsbltimeout": table.DNSBLTIMEOUT,
    "greylistdelay": table.GREYLISTDELAY,
    "greylistlifetime": table.GREYLISTLIFETIME,
}
FILES = ["dnsbl", "dnswl", *NUMBERS, "dnsbltempfail"]


def load(relpath: str) -> Any:
    return yaml.safe_load((ROLE / relpath).read_text())


@pytest.mark.parametrize(("name", "entry"), NUMBERS.items())
def test_numbers_default_as_the_daemon(name: str, entry: table.Number) -> None:
    assert load("defaults/main.yml")[f"pyqmail_control__{name}"] == entry.value


def test_lists_default_to_none_and_tempfail_off() -> None:
    defaults = load("defaults/main.yml")
    assert [defaults[f"pyqmail_control__{n}"] for n in ("dnsbl", "dnswl")] == [[], []]
    assert defaults["pyqmail_control__dnsbltempfail"] is False
    assert table.DNSBLTEMPFAIL.value == 0


MODULE = "pyqmail.mail.pyqmail_control_files"


def checks_task() -> Any:
    """The one task that writes every inbound check's control file (one module call)."""
    return next(
        t
        for t in load("tasks/main.yml")
        if MODULE in t and {f["name"] for f in t[MODULE]["files"]} >= set(FILES)
    )


def test_the_role_writes_and_routes_every_file() -> None:
    task = checks_task()
    assert task["notify"] == "pyqmail reload listeners"
    assert set(FILES) <= set(load("vars/main.yml")["pyqmail_control__managed"])


def test_what_the_role_writes_for_its_defaults_loads(tmp_path: Path) -> None:
    """The list files hold only their comment line: no lists, no greylisting."""
    for name in ("dnsbl", "dnswl"):
        (tmp_path / name).write_text(f"# pyqmail_control__{name}\n")
    for name, entry in NUMBERS.items():
        (tmp_path / name).write_text(f"{entry.value}\n")
    (tmp_path / "dnsbltempfail").write_text("0\n")
    settings = load_screen(tmp_path)
    assert not settings.dnsbl.active
    assert not settings.greylist.active


def test_ansible_writes_files_the_daemon_reads_back(tmp_path: Path) -> None:
    """The role's own task, run by ansible-playbook into a scratch root (owner: this user)."""
    task = checks_task()
    # the checks' files only: the others render role templates, which need the role around them
    args = {**task[MODULE], "files": [f for f in task[MODULE]["files"] if f["name"] in FILES]}
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    task = {"name": task["name"], MODULE: {**args, "owner": user, "group": group}}
    (tmp_path / "control").mkdir()
    variables = {
        **load("defaults/main.yml"),
        "pyqmail__root": str(tmp_path),
        "pyqmail_control__dnsbl": ["bl.example=2", "zen.example"],
        "pyqmail_control__dnswl": ["wl.example"],
        "pyqmail_control__dnsbltempfail": True,
        "pyqmail_control__greylistdelay": 300,
    }
    play = [{"hosts": "localhost", "gather_facts": False, "connection": "local", "tasks": [task]}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
         "-e", f"@{tmp_path / 'vars.json'}", "-e", f"ansible_python_interpreter={sys.executable}",
         str(tmp_path / "play.yml")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROLE.parents[1] / "ansible.cfg")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    settings = load_screen(tmp_path / "control")
    lists = [(e.zone, e.filter, e.weight) for e in settings.dnsbl.lists]
    assert lists == [("bl.example", None, 2), ("zen.example", None, 1)]
    assert [e.zone for e in settings.dnsbl.allow] == ["wl.example"]
    assert settings.dnsbl.tempfail
    assert (settings.greylist.delay, settings.greylist.lifetime) == (300, 2_592_000)
