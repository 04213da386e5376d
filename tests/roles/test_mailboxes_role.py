"""pyqmail_mailboxes owns control/smtpusers: a login the list no longer declares with a
password (entry deleted, password removed, login renamed) loses its line, so its old password
no longer passes SMTP AUTH; the run after that changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyqmail.authdb import AuthDB
from tests.roles.playbook import changed_tasks, run_role_tasks

PRUNE = (
    "Remove the SMTP AUTH users the list no longer declares (deleted, renamed, without a password)"
)


def play(tmp_path: Path, boxes: list[dict[str, Any]], *args: str) -> dict[str, Any]:
    root = tmp_path / "qmail"
    for sub in ("control", "users"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return run_role_tasks(
        ("pyqmail_mailboxes",),
        tmp_path / "play",
        {
            "pyqmail__root": str(root),
            "pyqmail__service_dir": str(tmp_path / "service"),
            "pyqmail__check_fresh": False,
            "pyqmail__mailbox_user": "root",
            "pyqmail__auth_group": "root",
            "pyqmail_mailboxes__home_base": str(tmp_path / "vmail"),
            "pyqmail_mailboxes__login_domain": "example.org",
            "pyqmail_control__locals": ["example.org"],
            "pyqmail_aliases__aliases": [],
            "pyqmail_aliases__postmaster": "alice@example.org",
            "pyqmail_mailboxes__list": boxes,
        },
        *args,
    )


def users(tmp_path: Path) -> list[str]:
    return [user.name for user in AuthDB.load(str(tmp_path / "qmail" / "control" / "smtpusers"))]


def test_undeclared_logins_leave_smtpusers(tmp_path: Path) -> None:
    alice = {"name": "alice", "password": "alice-pw-1"}
    bob = {"name": "bob", "password": "bob-pw-1"}
    play(tmp_path, [alice, bob])
    assert users(tmp_path) == ["alice@example.org", "bob@example.org"]
    steps: list[tuple[list[dict[str, Any]], list[str]]] = [
        ([{"name": "alice"}, bob], ["bob@example.org"]),  # her password removed
        (
            [alice, {**bob, "login": "robert@example.org"}],
            ["alice@example.org", "robert@example.org"],
        ),
        ([], []),  # every entry deleted
    ]
    for boxes, expected in steps:
        before = (tmp_path / "qmail" / "control" / "smtpusers").read_text()
        out = play(tmp_path, boxes, "--check", "--diff")
        assert (tmp_path / "qmail" / "control" / "smtpusers").read_text() == before
        play(tmp_path, boxes)
        assert users(tmp_path) == expected, boxes
        assert PRUNE in changed_tasks(out)  # check mode told
        assert changed_tasks(play(tmp_path, boxes)) == [], boxes
