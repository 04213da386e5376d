"""pyqmail_directories: a set of directories in one call (issue 20, provisioning speed).

In-process (set_module_args), and once through ansible-playbook for check and diff mode.
"""

from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.modules.utils import fail_in_process, run_in_process, run_module

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
