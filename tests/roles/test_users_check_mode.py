"""The role pyqmail_users under ``--check`` on an installed host whose daemon users exist but
a group they should be in does not yet (pyqmail__group or pyqmail__auth_group changed).

Check mode makes no group, and the user module then fails "Group ... does not exist" for a user
that exists, check mode or not: the role leaves those users to the real run and reports them
(changed, the daemons' restart notified) instead. The roles after it (pyqmail_install,
pyqmail_control) give directories these groups, and the file modules fail "chgrp failed:
failed to look up group" the same way: those tasks are skipped for a group check mode did not
make (pyqmail__groups_unmade). Run by ansible-playbook in check mode only, with this machine's
own system users standing in for the daemons' (nothing is changed) and groups that do not
exist, over a scratch qmail root whose directories exist; pyqmail__check_fresh false, as on an
installed host, and the groups looked up first as the role pyqmail's tasks/host.yml does.
"""

from __future__ import annotations

import grp
import pwd
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import results_by_task, run_role_tasks
from tests.roles.test_conftests import role_tasks

# Existing users (Debian's base system ones) for the daemons': the user module then compares
# and fails on a missing group, where it would report a missing user as "created" without
# looking at its groups.
SMTPD, SEND, REMOTE, MAILBOX, LOG = "daemon", "sync", "sys", "bin", "nobody"
GROUP = "pyqmail-users-test-absent"
AUTH_GROUP = "pyqmail-users-test-auth-absent"
PLAN = "Find whether the service users change (their daemons then restart)"
CREATE = "Create the service users"
REPORT = (
    "Report the service users that join groups check mode did not make (the daemons then restart)"
)
AUTH_DIR = "Create the directory the password verifiers share (login locks, pyqmail.authlock)"
QUEUE_DIRS = (
    "Create the queue directory",
    "Create the queue subdirectories (pyqmail.queue.store layout)",
)


def check_run(base: Path, **more: object) -> dict[str, list[dict[str, Any]]]:
    """pyqmail_users, then the tasks of pyqmail_install and pyqmail_control that give a
    directory a daemon group, over <base>/qmail (its directories there), in check mode."""
    for directory in ("auth", "queue/tmp", "queue/new", "queue/mess", "queue/state"):
        (base / "qmail" / directory).mkdir(parents=True, exist_ok=True)
    for directory in ("bad", "lock"):
        (base / "qmail" / "queue" / directory).mkdir(exist_ok=True)
    out = run_role_tasks(
        ("pyqmail_users",),
        base,
        {
            "pyqmail__root": str(base / "qmail"),
            "pyqmail__service_dir": str(base / "service"),
            "pyqmail__log_dir": str(base / "log"),
            "pyqmail__venv": str(base / "venv"),  # where pyqmail__restart_marker is looked for
            "pyqmail__check_fresh": False,
            "pyqmail__preflight_done": True,  # restart_note's include runs the role's dependency
            "pyqmail__smtpd_user": SMTPD,
            "pyqmail__send_user": SEND,
            "pyqmail__remote_user": REMOTE,
            "pyqmail__mailbox_user": MAILBOX,
            "pyqmail__log_user": LOG,
            "pyqmail__group": GROUP,
            "pyqmail__auth_group": AUTH_GROUP,
            **more,
        },
        "--check",
        must_pass=False,
        before=[{"name": "Look up the groups", "ansible.builtin.getent": {"database": "group"}}],
        after=[
            *role_tasks("pyqmail_install", "main.yml", AUTH_DIR),
            *role_tasks("pyqmail_control", "main.yml", *QUEUE_DIRS),
        ],
    )
    return results_by_task(out)


@pytest.fixture(autouse=True)
def accounts() -> None:
    for user in (SMTPD, SEND, REMOTE, MAILBOX, LOG):
        pwd.getpwnam(user)  # KeyError: not a Debian-like base system
    for group in (GROUP, AUTH_GROUP):
        with pytest.raises(KeyError):
            grp.getgrnam(group)


def failures(ran: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [
        f"{name}: {result.get('msg') or result}"
        for name, results in ran.items()
        for result in results
        for result in result.get("results", [result])
        if result.get("failed")
    ]


def skipped_users(result: dict[str, Any]) -> list[str]:
    return [item["item"]["name"] for item in result["results"] if item.get("skipped")]


def test_check_mode_where_the_daemon_group_is_new(tmp_path: Path) -> None:
    """pyqmail__group, the primary group of the listener's and pyqmail-send's users, is new:
    those two are reported, the other daemon users (their own groups, which exist) are still
    compared."""
    ran = check_run(tmp_path, pyqmail__auth_group="daemon")
    assert failures(ran) == []
    assert ran["Create the daemon group"][0]["changed"]
    for name in (PLAN, CREATE):
        assert skipped_users(ran[name][0]) == [SMTPD, SEND], name
    report = ran[REPORT][0]
    assert report.get("changed"), report
    assert report["msg"] == (
        f"{SMTPD} ({GROUP}), {SEND} ({GROUP}) get their groups once the run makes them"
        " (they do not exist yet), and the daemons restart"
    )
    for name in QUEUE_DIRS:
        assert ran[name][0].get("skipped"), (name, ran[name])
    assert not ran[AUTH_DIR][0].get("skipped"), ran[AUTH_DIR]  # its group exists
    with pytest.raises(KeyError):
        grp.getgrnam(GROUP)


def test_check_mode_where_the_auth_group_is_new(tmp_path: Path) -> None:
    """pyqmail__auth_group, which only the listener's user joins, is new."""
    ran = check_run(tmp_path, pyqmail__group="daemon")
    assert failures(ran) == []
    for name in (PLAN, CREATE):
        assert skipped_users(ran[name][0]) == [SMTPD], name
    report = ran[REPORT][0]
    assert report.get("changed"), report
    assert f"{SMTPD} ({AUTH_GROUP}) get their groups once the run makes them" in report["msg"]
    assert ran[AUTH_DIR][0].get("skipped"), ran[AUTH_DIR]
    for name in QUEUE_DIRS:
        assert not ran[name][0].get("skipped"), (name, ran[name])
    with pytest.raises(KeyError):
        grp.getgrnam(AUTH_GROUP)


def test_check_mode_with_every_group_there_reports_nothing_more(tmp_path: Path) -> None:
    """Groups that exist: every user compared as before, no report."""
    ran = check_run(tmp_path, pyqmail__group="daemon", pyqmail__auth_group="daemon")
    assert failures(ran) == []
    for name in (PLAN, CREATE):
        assert skipped_users(ran[name][0]) == [], name
    assert ran[REPORT][0].get("skipped"), ran[REPORT]
    for name in (AUTH_DIR, *QUEUE_DIRS):
        assert not ran[name][0].get("skipped"), (name, ran[name])
