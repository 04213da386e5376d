"""pyqmail_control_files: a group of control files in one call (issue 20, provisioning speed).

In-process (set_module_args) for the cases, once through ansible-playbook for check and diff
mode as the role uses them.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.modules.utils import fail_in_process, run_in_process, run_module

files_module: Any = importlib.import_module("pyqmail_control_files")


def run(args: dict[str, Any], *, check: bool = False, diff: bool = False) -> dict[str, Any]:
    """Run the module in-process; the result of exit_json (fail_json raises)."""
    return run_in_process(files_module, args, check=check, diff=diff)


def fail(args: dict[str, Any]) -> str:
    """Run the module in-process expecting a failure; its message."""
    return fail_in_process(files_module, args)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


FILES = [
    {"name": "me", "content": "mx1.example.org\n"},
    {"name": "databytes", "content": "1000\n"},
    {"name": "tlsclients", "state": "absent"},
]


def test_writes_the_set_then_changes_nothing(tmp_path: Path) -> None:
    args = {"path": str(tmp_path), "files": FILES, "mode": "0644"}
    first = run(args)
    assert first["changed"] is True
    assert first["changed_files"] == ["me", "databytes"]
    assert (tmp_path / "me").read_text() == "mx1.example.org\n"
    assert mode_of(tmp_path / "databytes") == 0o644
    second = run(args)
    assert second == {"changed": False, "changed_files": []}


def test_only_the_differing_file_changes_and_absent_removes(tmp_path: Path) -> None:
    run({"path": str(tmp_path), "files": FILES, "mode": "0644"})
    (tmp_path / "tlsclients").write_text("old\n")
    files = [dict(FILES[0]), {"name": "databytes", "content": "2000\n"}, FILES[2]]
    result = run({"path": str(tmp_path), "files": files, "mode": "0644"})
    assert result["changed_files"] == ["databytes", "tlsclients"]
    assert (tmp_path / "databytes").read_text() == "2000\n"
    assert not (tmp_path / "tlsclients").exists()


def test_mode_is_corrected_without_rewriting(tmp_path: Path) -> None:
    run({"path": str(tmp_path), "files": FILES[:1], "mode": "0644"})
    os.chmod(tmp_path / "me", 0o600)
    inode = (tmp_path / "me").stat().st_ino
    result = run({"path": str(tmp_path), "files": FILES[:1], "mode": "0644"}, diff=True)
    assert result["changed_files"] == ["me"]
    assert mode_of(tmp_path / "me") == 0o644
    assert (tmp_path / "me").stat().st_ino == inode
    assert result["diff"] == [
        {
            "before": {"mode": "0600"},
            "after": {"mode": "0644"},
            "before_header": f"{tmp_path}/me (attributes)",
            "after_header": f"{tmp_path}/me (attributes)",
        }
    ]


def test_values_write_one_value_each_and_null_removes(tmp_path: Path) -> None:
    (tmp_path / "bouncefrom").write_text("x\n")
    result = run(
        {"path": str(tmp_path), "values": {"queuelifetime": 600, "bouncefrom": None,
                                            "helohost": "  mx1.example.org \n"}}
    )  # fmt: skip
    assert result["changed_files"] == ["queuelifetime", "bouncefrom", "helohost"]
    assert (tmp_path / "queuelifetime").read_text() == "600\n"
    assert (tmp_path / "helohost").read_text() == "mx1.example.org\n"
    assert not (tmp_path / "bouncefrom").exists()


def test_check_mode_changes_nothing_and_says_what_would(tmp_path: Path) -> None:
    (tmp_path / "tlsclients").write_text("old\n")
    result = run({"path": str(tmp_path), "files": FILES, "mode": "0644"}, check=True, diff=True)
    assert result["changed_files"] == ["me", "databytes", "tlsclients"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tlsclients"]
    assert result["diff"][0] == {
        "before": "",
        "after": "mx1.example.org\n",
        "before_header": "(absent)",
        "after_header": f"{tmp_path}/me",
    }


def test_check_mode_on_a_missing_directory_lists_every_present_file(tmp_path: Path) -> None:
    result = run({"path": str(tmp_path / "control"), "files": FILES}, check=True)
    assert result["changed_files"] == ["me", "databytes"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([{"name": "../x", "content": ""}], "file '../x' (entry 2): a file name inside path"),
        ([{"name": "", "content": ""}], "file '' (entry 2): a file name inside path"),
        ([{"name": ".", "content": ""}], "file '.' (entry 2): a file name inside path"),
        ([{"name": "a", "content": ""}, {"name": "a", "state": "absent"}],
         "file 'a' (entry 3): listed twice"),
        ([{"name": "me2"}], "file 'me2' (entry 2): content is required when state is present"),
    ],
)  # fmt: skip
def test_bad_entries_are_named_and_nothing_is_written(
    tmp_path: Path, files: list[dict[str, Any]], message: str
) -> None:
    """Every entry is checked before the first write: a good entry before a bad one stays
    unwritten."""
    msg = fail({"path": str(tmp_path), "files": [FILES[0], *files]})
    assert msg.startswith(message), msg
    assert list(tmp_path.iterdir()) == []


def test_a_value_named_like_a_file_entry_is_listed_twice(tmp_path: Path) -> None:
    msg = fail({"path": str(tmp_path), "files": FILES[:1], "values": {"me": "x"}})
    assert msg == "file 'me' (entry 2): listed twice; give each file once"


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    msg = fail({"path": str(tmp_path / "control"), "files": FILES})
    assert msg == (
        f"path {tmp_path}/control is not a directory; create it first "
        "(ansible.builtin.file with state: directory)"
    )


def test_a_directory_is_not_removed(tmp_path: Path) -> None:
    (tmp_path / "tlsclients").mkdir()
    msg = fail({"path": str(tmp_path), "files": [FILES[2]]})
    assert msg == f"{tmp_path}/tlsclients is a directory; state absent removes files only"


def test_through_ansible_check_and_diff(tmp_path: Path) -> None:
    args = {"path": str(tmp_path), "files": FILES, "mode": "0644"}
    checked = run_module("pyqmail_control_files", args, check=True, diff=True)
    assert checked["changed"] is True
    assert checked["changed_files"] == ["me", "databytes"]
    assert list(tmp_path.iterdir()) == []
    written = run_module("pyqmail_control_files", args)
    assert written["changed_files"] == ["me", "databytes"]
    again = run_module("pyqmail_control_files", args, check=True)
    assert again["changed"] is False


@pytest.mark.parametrize("name", ["me\n", "a\x00b", "two words", "tab\there", "\x1b[0m", "x/y"])
def test_a_name_with_a_control_character_whitespace_or_slash_is_refused(
    tmp_path: Path, name: str
) -> None:
    """A NUL crashed the module (ValueError: embedded null byte); a trailing newline made a
    file 'me\\n' beside 'me'. Refused before anything is written, in files and in values."""
    for args in ({"files": [FILES[0], {"name": name, "content": "x\n"}]}, {"values": {name: 1}}):
        msg = fail({"path": str(tmp_path), **args})
        entry = 2 if "files" in args else 1
        assert msg.startswith(
            f"file {name!r} (entry {entry}): a file name inside path holds no '/', whitespace "
            "or control character"
        ), msg
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "kind"),
    [(["a.example", "b.example"], "list"), (True, "bool"), (False, "bool"),
     ({"a": 1}, "dict"), (1.5, "float")],
)  # fmt: skip
def test_a_value_that_is_no_string_or_integer_is_refused(
    tmp_path: Path, value: Any, kind: str
) -> None:
    """rcpthosts held "['a.example', 'b.example']" and a flag "True" (Python's repr). Only a
    string or an integer is written; the message names the file and the type, and nothing of
    the set is written."""
    values = {"queuelifetime": 600, "rcpthosts": value}
    msg = fail({"path": str(tmp_path), "values": values})
    assert msg.startswith(
        f"values: 'rcpthosts' is a {kind}: a one-value file takes a string or an integer"
    ), msg
    assert list(tmp_path.iterdir()) == []


def test_secret_contents_are_masked_in_the_returned_invocation(tmp_path: Path) -> None:
    """secret: true hid the content from the diff only: files[].content and values came back
    in invocation.module_args (printed wherever the task had no no_log)."""
    args = {
        "path": str(tmp_path),
        "mode": "0400",
        "secret": True,
        "files": [{"name": "smtproutes-auth", "content": "relay.test:alice:s3cr3t-pw\n"}],
        "values": {"authkey": "v4lue-s3cret", "authnumber": 987654321},
    }
    for check in (True, False):
        result = run_module("pyqmail_control_files", args, check=check, diff=True)
        assert not result.get("failed"), result.get("msg")
        assert result["changed_files"] == ["smtproutes-auth", "authkey", "authnumber"]
        text = json.dumps(result)
        assert "s3cr3t" not in text
        assert "987654321" not in text
    assert (tmp_path / "smtproutes-auth").read_text() == "relay.test:alice:s3cr3t-pw\n"
    assert (tmp_path / "authnumber").read_text() == "987654321\n"
