"""The role pyqmail_rules run for real by ansible-playbook (local connection), alone, as
playbooks/config.yml runs it, into a rules path in a temporary directory.

A listener whose entry leaves pyqmail__listener_env keeps loading <rules_path>-<listener>.cdb
until pyqmail_services rewrites its run script, restarts it and removes the file; until then
the config play keeps that file up to date with the current rules and no environment of its own,
so that the reload it notifies brings the listener this run's rules (a new deny, a relay client
removed) and drops the environment, instead of leaving it on the rules of the run before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyqmail.rules import Rules
from tests.roles.playbook import changed_tasks, run_role_tasks

OWN = "Write and compile the rules of listeners with their own environment (or that had one)"
CLIENTS = ("127.0.0.1", "192.0.2.1", "198.51.100.7")


def run_rules(base: Path, listener_env: dict[str, Any], **more: Any) -> dict[str, Any]:
    """The role's tasks and handlers (no listener linked: the reload has nothing to signal)."""
    (base / "service").mkdir(exist_ok=True)
    return run_role_tasks(
        ("pyqmail_rules",),
        base,
        {
            "pyqmail__rules_path": str(base / "etc" / "smtp"),
            "pyqmail__listener_env": listener_env,
            "pyqmail__service_dir": str(base / "service"),
            "pyqmail__check_fresh": False,
            **more,
        },
    )


def decisions(cdb: Path) -> dict[str, tuple[bool, dict[str, str]]]:
    rules = Rules.load(cdb)
    return {ip: (d.allow, d.env) for ip in CLIENTS for d in [rules.lookup(ip)]}


def test_the_rules_of_a_listener_that_lost_its_environment_follow_the_current_rules(
    tmp_path: Path,
) -> None:
    own = tmp_path / "etc" / "smtp-submission.cdb"
    run_rules(tmp_path, {"submission": {"FORCETLS": "0"}})
    assert decisions(own) == {
        "127.0.0.1": (True, {"FORCETLS": "0", "RELAYCLIENT": ""}),
        "192.0.2.1": (True, {"FORCETLS": "0"}),
        "198.51.100.7": (True, {"FORCETLS": "0"}),
    }

    # The entry leaves pyqmail__listener_env; in the same run 192.0.2.1 is denied and
    # 127.0.0.1 is no relay client any more.
    out = run_rules(
        tmp_path, {}, pyqmail_rules__deny=["192.0.2.1"], pyqmail_rules__relay_clients=[]
    )
    assert own.is_file()  # the running listener's command line still names it
    assert decisions(own) == {
        "127.0.0.1": (True, {}),
        "192.0.2.1": (False, {}),
        "198.51.100.7": (True, {}),
    }
    assert decisions(own) == decisions(tmp_path / "etc" / "smtp.cdb")
    assert "FORCETLS" not in (tmp_path / "etc" / "smtp-submission").read_text()
    assert OWN in changed_tasks(out)  # which notifies the listeners' reload

    again = run_rules(
        tmp_path, {}, pyqmail_rules__deny=["192.0.2.1"], pyqmail_rules__relay_clients=[]
    )
    assert changed_tasks(again) == []
    assert not (tmp_path / "etc" / "smtp-smtp.cdb").exists()  # none made for other listeners
