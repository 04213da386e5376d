"""Which services pyqmail_services' handlers restart: the due list of handlers/main.yml.

A changed run script restarts its service through the note restart-pending, written by
tasks/main.yml before the new script, and found by the handler. Check mode writes no note, so
there the handler must take the services whose run script would change from the run plan
(``pyqmail_services__run_plan``, the template task run with check_mode: true); else check mode
showed no restart at all. The handler's loop expression is rendered here by Ansible's own
templating (``Templar``) with registered results as Ansible makes them; the handlers running
for real are molecule's (converge, idempotence, check) and ``make run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "pyqmail_services"
LISTEN = "pyqmail_services restart changed services"
ROOT = "/var/qmail"
HANDLERS: list[dict[str, Any]] = yaml.safe_load((ROLE / "handlers" / "main.yml").read_text())
DUE = [
    h
    for h in HANDLERS
    if h.get("listen") == LISTEN and "pyqmail_services__due" in str(h.get("loop", ""))
]


def test_the_check_the_restart_and_the_forget_share_one_due_list() -> None:
    names = [h["name"] for h in DUE]
    assert len(names) == 3 and names[0].startswith("Check each new run script"), names
    assert "Restart the services whose run script changed" in names[1]
    assert names[2].startswith("Forget the restarts done")
    assert all(h["loop"] == DUE[0]["loop"] and h.get("vars") == DUE[0].get("vars") for h in DUE)


def due(*, check_mode: bool, notes: list[str], plan: dict[str, bool] | None) -> list[str]:
    """The handler's loop, rendered: ``notes`` the services with restart-pending (find's
    files), ``plan`` service -> changed of the run plan (None: never registered)."""
    variables: dict[str, Any] = {
        name: trust_as_template(value) for name, value in (DUE[0].get("vars") or {}).items()
    }
    variables["ansible_check_mode"] = check_mode
    variables["pyqmail_services__due"] = {
        "files": [{"path": f"{ROOT}/supervise/{name}/restart-pending"} for name in notes]
    }
    if plan is not None:
        variables["pyqmail_services__run_plan"] = {
            "results": [
                {
                    "changed": changed,
                    "item": {"name": name, "kind": "smtp"},
                    "ansible_loop_var": "item",
                }
                for name, changed in plan.items()
            ]
        }
    templar = Templar(loader=DataLoader(), variables=variables)
    return list(templar.template(trust_as_template(DUE[0]["loop"])))


@pytest.mark.parametrize(
    ("check_mode", "notes", "plan", "expected"),
    [
        # check mode: no note written, the plan's changed scripts restart
        (True, [], {"qmail-smtpd": True, "qmail-send": False}, ["qmail-smtpd"]),
        # with an interrupted run's note: both, each once
        (
            True,
            ["qmail-send"],
            {"qmail-smtpd": True, "qmail-send": True},
            ["qmail-send", "qmail-smtpd"],
        ),
        (True, ["qmail-send"], None, ["qmail-send"]),
        (True, [], {}, []),
        # a real run: the notes alone (tasks/main.yml wrote one for each changed script)
        (False, [], {"qmail-smtpd": True}, []),
        (
            False,
            ["qmail-submission", "qmail-smtpd"],
            {"qmail-smtpd": True},
            ["qmail-smtpd", "qmail-submission"],
        ),
    ],
)
def test_the_services_due(
    check_mode: bool, notes: list[str], plan: dict[str, bool] | None, expected: list[str]
) -> None:
    assert due(check_mode=check_mode, notes=notes, plan=plan) == expected
