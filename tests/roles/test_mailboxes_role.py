"""pyqmail_mailboxes owns control/smtpusers: a login the list no longer declares with a
password (entry deleted, password removed, login renamed) loses its line, so its old password
no longer passes SMTP AUTH; the run after that changes nothing."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from pyqmail.authdb import AuthDB
from tests.conftest import IMPOSSIBLE_HERE
from tests.roles.playbook import changed_tasks, run_role_tasks, task_result
from tests.runas import IS_ROOT, spare_ids

HOMES = "Create the mailbox homes and Maildirs"
WRITE = "Write the logins and the senders map (pyqmail__auth_group only)"
PRUNE = (
    "Remove the SMTP AUTH users the list no longer declares (deleted, renamed, without a password)"
)


def play(
    tmp_path: Path,
    boxes: list[dict[str, Any]],
    *args: str,
    must_pass: bool = True,
    auth_group: str = "root",
    **more: Any,
) -> dict[str, Any]:
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
            "pyqmail__auth_group": auth_group,
            # Not this machine's Dovecot (after `make run`): tests/dovecot has a Dovecot's.
            "pyqmail__dovecot_config": str(tmp_path / "no-dovecot.conf"),
            "pyqmail_mailboxes__home_base": str(tmp_path / "vmail"),
            "pyqmail_mailboxes__login_domain": "example.org",
            "pyqmail_control__locals": ["example.org"],
            "pyqmail_aliases__aliases": [],
            "pyqmail_aliases__postmaster": "alice@example.org",
            "pyqmail_mailboxes__list": boxes,
            **more,
        },
        *args,
        must_pass=must_pass,
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


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} a directory of another uid needs root")
def test_a_home_that_belongs_to_another_user_is_not_taken(tmp_path: Path) -> None:
    """<home_base>/alice exists and is another user's (home_base /home, or a base linked
    there): the run fails naming it, her directory keeps its owner and mode, and no other
    home is made (the module checks the whole set first). The delivery user here is root."""
    (alice,) = spare_ids(1)
    home = tmp_path / "vmail" / "alice"
    home.mkdir(parents=True)
    os.chown(home, alice, alice)
    home.chmod(0o751)
    out = play(tmp_path, [{"name": "bob"}, {"name": "alice"}], must_pass=False)
    result = task_result(out, HOMES)
    assert result.get("failed"), result
    assert result["msg"].startswith(
        f"{home} belongs to uid {alice}, not to root (the owner asked for): foreign_owner=fail "
    ), result["msg"]
    assert (home.stat().st_uid, stat.S_IMODE(home.stat().st_mode)) == (alice, 0o751)
    assert sorted(p.name for p in home.parent.iterdir()) == ["alice"]


def test_homes_made_by_an_earlier_run_are_kept_and_corrected(tmp_path: Path) -> None:
    """The delivery user's own homes pass: a second run changes nothing, and a home whose
    mode was loosened since is set back to 0700."""
    boxes = [{"name": "alice"}]
    play(tmp_path, boxes)
    home = tmp_path / "vmail" / "alice"
    home.chmod(0o755)
    assert changed_tasks(play(tmp_path, boxes)) == [HOMES]
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert changed_tasks(play(tmp_path, boxes)) == []


def test_logins_are_the_password_verifiers_alone(tmp_path: Path) -> None:
    """users/logins says which logins exist: root:<auth group> 0640 like control/smtpusers
    and users/senders, read by pyqmail-checkpassword through Dovecot's extra_groups."""
    play(tmp_path, [{"name": "alice", "password": "alice-pw-1"}], auth_group="nogroup")
    for path in ("users/logins", "users/senders", "control/smtpusers"):
        st = os.stat(tmp_path / "qmail" / path)
        assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)) == (
            0,
            "nogroup",
            0o640,
        ), path


def test_the_senders_map_goes_when_not_enforced_and_comes_back(tmp_path: Path) -> None:
    """pyqmail_mailboxes__senders_enforced false: no users/senders (authenticated users may
    send as anyone); true again: the map is back, and a second run changes nothing."""
    boxes = [{"name": "alice", "password": "alice-pw-1"}]
    senders = tmp_path / "qmail" / "users" / "senders"
    play(tmp_path, boxes)
    assert "alice@example.org" in senders.read_text()
    play(tmp_path, boxes, pyqmail_mailboxes__senders_enforced=False)
    assert not senders.exists()
    logins = (tmp_path / "qmail" / "users" / "logins").read_text().splitlines()
    assert [line for line in logins if not line.startswith("#")] == ["alice@example.org:alice"]
    play(tmp_path, boxes)
    assert "alice@example.org" in senders.read_text()
    assert WRITE not in changed_tasks(play(tmp_path, boxes))
