"""The role provisions the session knobs with the daemon's own defaults, and a greeting the
daemon does not double (issue 14: ``220 localhost ESMTP ESMTP``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pyqmail.smtpd.knobs import SessionKnobs

ROLE = Path(__file__).resolve().parents[2] / "roles" / "pyqmail_control"
KNOBS = {
    "authheader": "auth_header",
    "maxjunk": "max_junk",
    "greetdelay": "greet_delay",
    "timeoutstress": "timeout_stress",
    "stresspercent": "stress_percent",
    "authmsgsperhour": "auth_msgs_per_hour",
    "authrcptsperhour": "auth_rcpts_per_hour",
}


def load(relpath: str) -> Any:
    return yaml.safe_load((ROLE / relpath).read_text())


def test_default_greeting_leaves_esmtp_to_the_daemon() -> None:
    greeting = load("defaults/main.yml")["pyqmail_control__smtpgreeting"]
    assert "ESMTP" not in greeting.upper(), greeting
    spec = load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert spec["pyqmail_control__smtpgreeting"]["default"] == greeting


@pytest.mark.parametrize(("control", "field"), KNOBS.items())
def test_role_defaults_are_the_daemon_defaults(control: str, field: str) -> None:
    var = f"pyqmail_control__{control}"
    defaults = load("defaults/main.yml")
    spec = load("meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert defaults[var] == getattr(SessionKnobs(), field)
    assert spec[var]["default"] == defaults[var]
    assert control in load("vars/main.yml")["pyqmail_control__managed"]


def test_role_writes_every_knob() -> None:
    tasks = load("tasks/main.yml")
    task = next(t for t in tasks if "session limits" in t["name"])
    written = [entry["name"] for entry in task["pyqmail.mail.pyqmail_control_files"]["files"]]
    assert [name for name in written if name in KNOBS] == list(KNOBS)
    assert task["notify"] == "pyqmail reload listeners"
