"""pyqmail_tcprules: in-process (set_module_args) and through ansible-playbook (run_module)."""

from __future__ import annotations

import importlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pyqmail.rules import Decision, Rules, compile_rules, make_rule
from tests.modules.utils import (
    REPO,
    AnsibleExitJson,
    AnsibleFailJson,
    run_module,
    set_module_args,
    skip_where_system_python_has_pyqmail,
)

RULES: list[dict[str, Any]] = [
    {"address": "127.", "action": "allow", "env": {"RELAYCLIENT": "", "DATABYTES": 1000}},
    {"address": "10.1-2.", "action": "deny"},
    {"address": "=.example.com", "action": "allow", "env": {"SMTPAUTH": "1"}},
    {"address": "", "action": "allow", "env": {"SMTPAUTH": "0"}},
]
EXPECTED_RULES = [
    make_rule("127.", "allow", {"RELAYCLIENT": "", "DATABYTES": "1000"}),
    make_rule("10.1-2.", "deny"),
    make_rule("=.example.com", "allow", {"SMTPAUTH": "1"}),
    make_rule("", "allow", {"SMTPAUTH": "0"}),
]


@pytest.fixture(scope="module")
def module() -> ModuleType:
    """library/pyqmail_tcprules.py, importing module_utils/ by the collection's names."""
    return importlib.import_module("pyqmail_tcprules")


def call(
    module: ModuleType, args: dict[str, Any], *, check: bool = False, diff: bool = True
) -> dict[str, Any]:
    """Run main() in-process; return the exit_json or fail_json arguments."""
    args = {**args, "_ansible_check_mode": check, "_ansible_diff": diff}
    with set_module_args(args), pytest.raises((AnsibleExitJson, AnsibleFailJson)) as info:
        module.main()
    result: dict[str, Any] = info.value.result  # type: ignore[union-attr]
    return result


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_check_mode_on_a_fresh_path_writes_nothing(module: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "smtp"
    result = call(module, {"path": str(path), "rules": RULES}, check=True)
    assert result["changed"] is True
    assert result["source_changed"] is True
    assert result["cdb_changed"] is True
    assert (result["rules"], result["keys"]) == (4, 5)
    assert snapshot(tmp_path) == {}
    (source_diff,) = result["diff"]
    assert source_diff["before"] == ""
    assert source_diff["before_header"] == "(absent)"
    assert '127.:allow,RELAYCLIENT="",DATABYTES="1000"\n' in source_diff["after"]


def test_real_run_then_idempotent(module: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "smtp"
    args = {"path": str(path), "rules": RULES}
    result = call(module, args)
    assert result["changed"] is True
    assert result["cdb"] == str(path) + ".cdb"
    source = path.read_text()
    assert source.startswith("# Managed by Ansible (pyqmail_tcprules)")
    assert source.endswith(
        '127.:allow,RELAYCLIENT="",DATABYTES="1000"\n10.1-2.:deny\n'
        '=.example.com:allow,SMTPAUTH="1"\n:allow,SMTPAUTH="0"\n'
    )
    assert (tmp_path / "smtp.cdb").read_bytes() == compile_rules(EXPECTED_RULES)
    rules = Rules.load(tmp_path / "smtp.cdb")
    assert rules.lookup("127.0.0.1") == Decision(
        True, {"RELAYCLIENT": "", "DATABYTES": "1000"}, "127."
    )
    assert rules.lookup("10.2.3.4").allow is False
    assert rules.lookup("8.8.8.8", "mx.example.com").env == {"SMTPAUTH": "1"}
    before = snapshot(tmp_path)
    for check in (True, False):
        again = call(module, args, check=check)
        assert again["changed"] is False, again
        assert again["diff"] == []
    assert snapshot(tmp_path) == before  # no temp files left behind either


def test_damaged_cdb_is_rewritten_alone(module: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "smtp"
    args = {"path": str(path), "rules": RULES}
    call(module, args)
    cdb = tmp_path / "smtp.cdb"
    good = cdb.read_bytes()
    cdb.write_bytes(good[:100])
    checked = call(module, args, check=True)
    assert (checked["changed"], checked["source_changed"], checked["cdb_changed"]) == (
        True,
        False,
        True,
    )
    assert cdb.read_bytes() == good[:100]
    result = call(module, args)
    assert (result["changed"], result["source_changed"], result["cdb_changed"]) == (
        True,
        False,
        True,
    )
    assert cdb.read_bytes() == good


def test_hand_edit_of_source_is_reverted_with_diff(module: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "smtp"
    args = {"path": str(path), "rules": RULES}
    call(module, args)
    original = path.read_text()
    path.write_text(original + "6.6.6.6:deny\n")
    result = call(module, args)
    assert (result["changed"], result["source_changed"], result["cdb_changed"]) == (
        True,
        True,
        False,
    )
    (source_diff,) = result["diff"]
    assert source_diff["before"].endswith("6.6.6.6:deny\n")
    assert source_diff["after"] == original
    assert path.read_text() == original


def test_changed_rules_with_backup(module: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "smtp"
    call(module, {"path": str(path), "rules": RULES})
    old_source, old_cdb = path.read_bytes(), (tmp_path / "smtp.cdb").read_bytes()
    new_rules = [*RULES[:-1], {"address": "", "action": "deny"}]
    result = call(module, {"path": str(path), "rules": new_rules, "backup": True})
    assert result["changed"] is True
    assert Path(result["backup_file"]).read_bytes() == old_source
    assert Path(result["cdb_backup_file"]).read_bytes() == old_cdb
    assert Rules.load(tmp_path / "smtp.cdb").lookup("8.8.8.8") == Decision(False, {}, "")
    assert path.read_text().endswith("\n:deny\n")


def test_mode_only_change_reports_changed(module: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "smtp"
    cdb = tmp_path / "smtp.cdb"
    call(module, {"path": str(path), "rules": RULES, "mode": "0644"})
    args = {"path": str(path), "rules": RULES, "mode": "0600"}
    checked = call(module, args, check=True)
    assert (checked["changed"], checked["source_changed"], checked["cdb_changed"]) == (
        True,
        False,
        False,
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    result = call(module, args)
    assert result["changed"] is True
    for name in ("smtp", "smtp.cdb"):
        assert {
            "before": {"mode": "0644"},
            "after": {"mode": "0600"},
            "before_header": f"{tmp_path / name} (attributes)",
            "after_header": f"{tmp_path / name} (attributes)",
        } in result["diff"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cdb.stat().st_mode) == 0o600
    assert call(module, args)["changed"] is False


def test_separate_cdb_path_and_empty_rules(module: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    path, cdb = tmp_path / "src" / "rules", tmp_path / "out" / "compiled.cdb"
    result = call(module, {"path": str(path), "cdb": str(cdb), "rules": []})
    assert result["changed"] is True
    assert (result["rules"], result["keys"]) == (0, 0)
    assert all(line.startswith("#") for line in path.read_text().splitlines())
    assert str(cdb) in path.read_text()
    assert Rules.load(cdb).lookup("1.2.3.4") == Decision(True, {}, None)


BAD = [
    (
        [RULES[0], {"address": "10.1.2", "action": "allow"}],
        "rules[1] ('10.1.2:allow'): bad address '10.1.2'",
    ),
    ([{"address": 10.0, "action": "allow"}], "rules[0]: address 10.0 is not a string"),
    (
        [{"address": "127.", "action": "allow", "env": {"RELAYCLIENT": None}}],
        "rules[0] (address '127.'): env RELAYCLIENT is null",
    ),
    (
        [{"address": "127.", "action": "allow", "env": {"SMTPAUTH": True}}],
        "env SMTPAUTH is True",
    ),
    (
        [{"address": "127.", "action": "allow", "env": {"BAD-NAME": "1"}}],
        "bad variable name 'BAD-NAME'",
    ),
    (
        [{"address": "127.", "action": "allow", "env": {"X": 'a"b'}}],
        "double quote",
    ),
    (
        [{"address": "127.", "action": "allow"}, {"address": "127.", "action": "deny"}],
        "rules[1] ('127.:deny'): address 127. is already used by rules[0]",
    ),
    ([{"address": "127.", "action": "permit"}], "action"),
    ([{"address": "127."}], "action"),
]


@pytest.mark.parametrize(("rules", "words"), BAD)
def test_bad_rules_fail_and_write_nothing(
    module: ModuleType, tmp_path: Path, rules: list[dict[str, Any]], words: str
) -> None:
    result = call(module, {"path": str(tmp_path / "smtp"), "rules": rules})
    assert result.get("failed") is True, result
    assert words in result["msg"]
    assert snapshot(tmp_path) == {}


def test_missing_directory_fails_clearly(module: ModuleType, tmp_path: Path) -> None:
    result = call(module, {"path": str(tmp_path / "nope" / "smtp"), "rules": RULES})
    assert result["failed"] is True
    assert f"create {tmp_path / 'nope'} first" in result["msg"]
    assert not (tmp_path / "nope").exists()


def test_check_mode_with_missing_directory_reports_would_create(
    module: ModuleType, tmp_path: Path
) -> None:
    """--check on a fresh host: the directory task before it was only simulated."""
    path = tmp_path / "nope" / "smtp"
    result = call(module, {"path": str(path), "rules": RULES, "mode": "0644"}, check=True)
    assert "failed" not in result, result
    assert (result["changed"], result["source_changed"], result["cdb_changed"]) == (
        True,
        True,
        True,
    )
    assert result["would_create_directory"] is True
    assert result["diff"][0]["before_header"] == "(absent)"
    assert '127.:allow,RELAYCLIENT="",DATABYTES="1000"' in result["diff"][0]["after"]
    assert not (tmp_path / "nope").exists()
    # a directory that exists is not reported
    path.parent.mkdir()
    result = call(module, {"path": str(path), "rules": RULES}, check=True)
    assert result["would_create_directory"] is False


# Through ansible-playbook: the payload builder must follow the module_utils symlinks.


def test_through_ansible_playbook(tmp_path: Path) -> None:
    path = tmp_path / "smtp"
    args = {"path": str(path), "rules": RULES, "mode": "0644"}

    result = run_module("pyqmail_tcprules", args, check=True, diff=True)
    assert result["changed"] is True, result
    assert snapshot(tmp_path) == {}

    result = run_module("pyqmail_tcprules", args, diff=True)
    assert result["changed"] is True, result
    assert (tmp_path / "smtp.cdb").read_bytes() == compile_rules(EXPECTED_RULES)
    assert "10.1-2.:deny\n" in result["diff"][0]["after"]

    for check in (True, False):
        result = run_module("pyqmail_tcprules", args, check=check, diff=True)
        assert result["changed"] is False, result

    before = snapshot(tmp_path)
    bad = {**args, "rules": [*RULES, {"address": "1.2.3.4.5", "action": "deny"}]}
    result = run_module("pyqmail_tcprules", bad)
    assert result.get("failed") is True, result
    assert "rules[4] ('1.2.3.4.5:deny'): bad address" in result["msg"]
    assert snapshot(tmp_path) == before


def test_runs_where_pyqmail_is_not_installed(tmp_path: Path) -> None:
    """With /usr/bin/python3 (no pyqmail package), rules.py must fall back to
    the collection's module_utils pyqmail_cdb, which Ansible ships only if it saw that import."""
    skip_where_system_python_has_pyqmail()
    path = tmp_path / "smtp"
    result = run_module("pyqmail_tcprules", {"path": str(path), "rules": RULES}, system_python=True)
    assert result["changed"] is True, result
    assert (tmp_path / "smtp.cdb").read_bytes() == compile_rules(EXPECTED_RULES)


def test_ansible_doc_renders() -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-doc")),
            "pyqmail.mail.pyqmail_tcprules",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" not in proc.stderr
    for words in ("tcprules source file", "address", "RELAYCLIENT", "check_mode", "EXAMPLES"):
        assert words in proc.stdout
