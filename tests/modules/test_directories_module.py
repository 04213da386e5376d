"""pyqmail_directories: a set of directories in one call (issue 20, provisioning speed).

In-process (set_module_args), and once through ansible-playbook for check and diff mode.
"""

from __future__ import annotations

import importlib
import os
import pwd
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IMPOSSIBLE_HERE
from tests.modules.utils import fail_in_process, run_in_process, run_module
from tests.runas import IS_ROOT, spare_ids

dirs_module: Any = importlib.import_module("pyqmail_directories")


def run(args: dict[str, Any], *, check: bool = False, diff: bool = False) -> dict[str, Any]:
    """Run the module in-process; the result of exit_json (fail_json raises)."""
    return run_in_process(dirs_module, args, check=check, diff=diff)


def fail(args: dict[str, Any]) -> str:
    """Run the module in-process expecting a failure; its message."""
    return fail_in_process(dirs_module, args)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_the_set_with_modes_then_changes_nothing(tmp_path: Path) -> None:
    paths = [str(tmp_path / "q"), {"path": str(tmp_path / "q" / "tmp"), "mode": "03730"}]
    args = {"paths": paths, "mode": "0750"}
    first = run(args)
    assert first["changed_paths"] == [str(tmp_path / "q"), str(tmp_path / "q" / "tmp")]
    assert mode_of(tmp_path / "q") == 0o750
    assert mode_of(tmp_path / "q" / "tmp") == 0o3730
    assert run(args) == {"changed": False, "changed_paths": []}


def test_missing_parents_are_made_with_the_same_attributes(tmp_path: Path) -> None:
    """As ansible.builtin.file state=directory did for a mailbox home elsewhere."""
    result = run({"paths": [str(tmp_path / "srv" / "bob" / "Maildir")], "mode": "0700"})
    assert result["changed_paths"] == [
        str(tmp_path / "srv"),
        str(tmp_path / "srv" / "bob"),
        str(tmp_path / "srv" / "bob" / "Maildir"),
    ]
    assert mode_of(tmp_path / "srv") == 0o700


def test_only_a_wrong_mode_is_corrected(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(mode=0o755)
    (tmp_path / "b").mkdir()
    os.chmod(tmp_path / "b", 0o700)
    result = run({"paths": [str(tmp_path / "a"), str(tmp_path / "b")], "mode": "0700"}, diff=True)
    assert result["changed_paths"] == [str(tmp_path / "a")]
    assert mode_of(tmp_path / "a") == 0o700
    assert result["diff"] == [
        {
            "before": {"path": str(tmp_path / "a"), "mode": "0755"},
            "after": {"path": str(tmp_path / "a"), "mode": "0700"},
            "before_header": str(tmp_path / "a"),
            "after_header": str(tmp_path / "a"),
        }
    ]


def test_check_mode_creates_nothing_and_lists_children_of_new_parents(tmp_path: Path) -> None:
    paths = [str(tmp_path / "m"), str(tmp_path / "m" / "cur")]
    result = run({"paths": paths, "mode": "0700"}, check=True)
    assert result["changed_paths"] == paths
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "paths",
    [
        ["srv/bob/Maildir"],  # parents not listed
        ["srv/bob/Maildir", "srv/bob/Maildir/cur", "srv/alice/Maildir"],  # shared, planned
        ["srv", "srv/a/b/c", "srv/a/b/d"],
    ],
)
def test_check_mode_lists_the_missing_parents_the_real_run_makes(
    tmp_path: Path, paths: list[str]
) -> None:
    """Check mode left out the missing parents a path does not list; the real run makes them
    (with the entry's owner and mode): both now list the same paths, diffs too."""
    args = {"paths": [str(tmp_path / p) for p in paths], "mode": "0700"}
    checked = run(args, check=True, diff=True)
    assert list(tmp_path.iterdir()) == []
    made = run(args, diff=True)
    assert checked["changed_paths"] == made["changed_paths"]
    assert [d["after_header"] for d in checked["diff"]] == made["changed_paths"]
    assert str(tmp_path / "srv") in made["changed_paths"]


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["relative/dir"], "paths entry 2: path 'relative/dir' is not an absolute path"),
        ([{"mode": "0700"}], "paths entry 2: path None is not an absolute path"),
        ([{"path": "/x", "modes": "0700"}], "paths entry 2: unknown keys ['modes']"),
        ([7], "paths entry 2: give a path or a dict with path (and owner, group, mode)"),
    ],
)
def test_bad_entries_are_named_and_nothing_is_made(
    tmp_path: Path, paths: list[Any], message: str
) -> None:
    msg = fail({"paths": [str(tmp_path / "first"), *paths]})
    assert msg.startswith(message), msg
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    msg = fail({"paths": [str(tmp_path / "f")]})
    assert msg == f"{tmp_path}/f exists and is not a directory"


def test_through_ansible_check_then_real(tmp_path: Path) -> None:
    args = {"paths": [str(tmp_path / "d"), str(tmp_path / "d" / "log")], "mode": "0755"}
    checked = run_module("pyqmail_directories", args, check=True, diff=True)
    assert checked["changed"] is True
    assert not (tmp_path / "d").exists()
    made = run_module("pyqmail_directories", args)
    assert made["changed_paths"] == args["paths"]
    again = run_module("pyqmail_directories", args, check=True)
    assert again["changed"] is False


# --- foreign_owner: a directory that belongs to another user is not taken ------------------

needs_root = pytest.mark.skipif(
    not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} giving a directory to another uid needs root"
)


def owned(path: Path, uid: int, mode: int = 0o755) -> Path:
    """``path`` made as a directory of ``uid`` with ``mode``."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


@needs_root
def test_a_home_of_another_user_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    """home_base /home: mailbox alice's home is the login user alice's; it keeps its owner
    and mode, and no other path of the set is made (all are checked first)."""
    vmail, alice = spare_ids(2)
    home = owned(tmp_path / "home" / "alice", alice)
    paths = [str(tmp_path / "home" / "bob"), str(home), str(home / "Maildir")]
    args = {"paths": paths, "owner": str(vmail), "mode": "0700", "foreign_owner": "fail"}
    for check in (True, False):
        msg = fail({**args, "_ansible_check_mode": check})
        assert msg == (
            f"{home} belongs to uid {alice}, not to {vmail} (the owner asked for) or root: "
            f"foreign_owner=fail refuses to give another user's directory to {vmail}; move it "
            f"away, or chown it to {vmail} if it is meant to be this one"
        )
        assert (home.stat().st_uid, mode_of(home)) == (alice, 0o755)
        assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["alice"]


@needs_root
def test_a_user_is_named_by_name_and_an_entry_owner_counts(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    home = owned(tmp_path / "alice", nobody)
    (vmail,) = spare_ids(1)
    entry = {"path": str(home), "owner": str(vmail)}
    msg = fail({"paths": [entry], "owner": "nobody", "foreign_owner": "fail"})
    assert msg.startswith(f"{home} belongs to nobody (uid {nobody}), not to {vmail} "), msg


@needs_root
def test_a_link_to_another_users_directory_is_refused(tmp_path: Path) -> None:
    """A base that links to /home: the link is root's, the directory it names is not."""
    vmail, alice = spare_ids(2)
    target = owned(tmp_path / "home" / "alice", alice)
    (tmp_path / "vmail").mkdir()
    (tmp_path / "vmail" / "alice").symlink_to(target)
    args = {"paths": [str(tmp_path / "vmail" / "alice")], "owner": str(vmail), "mode": "0700"}
    msg = fail({**args, "foreign_owner": "fail"})
    assert msg.startswith(f"{tmp_path}/vmail/alice belongs to uid {alice}, "), msg
    assert (target.stat().st_uid, mode_of(target)) == (alice, 0o755)


@needs_root
def test_homes_of_root_and_of_the_owner_are_still_made_right(tmp_path: Path) -> None:
    """Idempotence: a home an earlier run made (the delivery user's, its mode since changed)
    is re-asserted; root's (a mkdir whose chown never came, or made by the administrator)
    is given to the delivery user."""
    (vmail,) = spare_ids(1)
    ours = owned(tmp_path / "vmail" / "alice", vmail, 0o755)
    roots = owned(tmp_path / "vmail" / "bob", 0, 0o755)
    args = {"paths": [str(ours), str(roots)], "owner": str(vmail), "group": str(vmail)}
    result = run({**args, "mode": "0700", "foreign_owner": "fail"})
    assert result["changed_paths"] == [str(ours), str(roots)]
    for home in (ours, roots):
        assert (home.stat().st_uid, home.stat().st_gid, mode_of(home)) == (vmail, vmail, 0o700)
    again = run({**args, "mode": "0700", "foreign_owner": "fail"})
    assert again == {"changed": False, "changed_paths": []}


@needs_root
def test_without_foreign_owner_fail_any_owner_is_changed_as_before(tmp_path: Path) -> None:
    """The default (change) is ansible.builtin.file's: the roles' own directories (queue,
    logs) may still carry the user of an earlier installation."""
    vmail, old = spare_ids(2)
    log = owned(tmp_path / "log", old)
    assert run({"paths": [str(log)], "owner": str(vmail)})["changed_paths"] == [str(log)]
    assert log.stat().st_uid == vmail


def test_foreign_owner_takes_change_or_fail() -> None:
    msg = fail({"paths": ["/nonexistent"], "foreign_owner": "take"})
    assert "foreign_owner" in msg and "change, fail" in msg, msg
