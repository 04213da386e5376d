"""The role writes every blocklist and greylisting file with the daemon's own defaults
(``pyqmail.control.table``), and what it writes for its defaults loads cleanly."""

from __future__ import annotations

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
FILES = ["dnsbl", "dnswl", "dnsresolver", *NUMBERS, "dnsbltempfail"]


def load(relpath: str) -> Any:
    return yaml.safe_load((ROLE / relpath).read_text())


@pytest.mark.parametrize(("name", "entry"), NUMBERS.items())
def test_numbers_default_as_the_daemon(name: str, entry: table.Number) -> None:
    assert load("defaults/main.yml")[f"pyqmail_control__{name}"] == entry.value


def test_lists_default_to_none_and_tempfail_off() -> None:
    defaults = load("defaults/main.yml")
    assert [defaults[f"pyqmail_control__{n}"] for n in ("dnsbl", "dnswl", "dnsresolver")] == [
        [],
        [],
        [],
    ]
    assert defaults["pyqmail_control__dnsbltempfail"] is False
    assert table.DNSBLTEMPFAIL.value == 0


def test_the_role_writes_and_routes_every_file() -> None:
    task = next(t for t in load("tasks/main.yml") if t["name"].startswith("Write the blocklist"))
    assert sorted(item["name"] for item in task["loop"]) == sorted(FILES)
    assert task["notify"] == "pyqmail reload listeners"
    assert set(FILES) <= set(load("vars/main.yml")["pyqmail_control__managed"])


def test_what_the_role_writes_for_its_defaults_loads(tmp_path: Path) -> None:
    """The list files hold only their comment line: no lists, no greylisting."""
    for name in ("dnsbl", "dnswl", "dnsresolver"):
        (tmp_path / name).write_text(f"# pyqmail_control__{name}\n")
    for name, entry in NUMBERS.items():
        (tmp_path / name).write_text(f"{entry.value}\n")
    (tmp_path / "dnsbltempfail").write_text("0\n")
    settings = load_screen(tmp_path)
    assert not settings.dnsbl.active
    assert not settings.greylist.active
