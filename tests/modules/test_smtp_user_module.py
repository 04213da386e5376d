"""pyqmail_smtp_user: in-process (set_module_args) and through ansible-playbook."""

from __future__ import annotations

import grp
import importlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from pyqmail.authdb import AuthDB, User, atomic_write, change_locked, hash_password
from tests.conftest import IMPOSSIBLE_HERE
from tests.modules.utils import AnsibleExitJson, AnsibleFailJson, run_module, set_module_args

# library/ is on sys.path once tests.modules.utils is imported
pyqmail_smtp_user = importlib.import_module("pyqmail_smtp_user")

# passlib's documented hash of "password" with ln=8: old cost parameters.
OLD_HASH = "$scrypt$ln=8,r=8,p=1$WKs1xljLudd6z9kbY0wpJQ$yCR4iDZYDKv+iEJj6yHY0lv/epnfB6f/w1EbXrsJOuQ"
# As root: owner root, group daemon (exists on Debian; the default "pyqmaila" may not on a
# test machine). Unprivileged: our own ids, the only ones we may give a file.
ROOT = os.geteuid() == 0
UID, GID = (0, 1) if ROOT else (os.geteuid(), os.getegid())
OWNER, GROUP = ("root", "daemon") if ROOT else (str(UID), str(GID))


def run(args: dict[str, Any], *, check: bool = False, diff: bool = False) -> dict[str, Any]:
    args = {"owner": OWNER, "group": GROUP, **args}
    if check:
        args["_ansible_check_mode"] = True
    if diff:
        args["_ansible_diff"] = True
    with set_module_args(args), pytest.raises(AnsibleExitJson) as info:
        pyqmail_smtp_user.main()
    return info.value.result


def fail(args: dict[str, Any]) -> str:
    args = {"owner": OWNER, "group": GROUP, **args}
    with set_module_args(args), pytest.raises(AnsibleFailJson) as info:
        pyqmail_smtp_user.main()
    msg: str = info.value.result["msg"]
    return msg


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "smtpusers"


def test_add_check_mode_then_real_then_idempotent(path: Path) -> None:
    args = {"path": str(path), "name": "alice@example.org", "password": "s3cret pw"}
    r = run(args, check=True, diff=True)
    assert r["changed"] is True
    assert r["password_changed"] is True
    assert not path.exists()
    assert r["diff"]["before"] == ""
    assert r["diff"]["after"].startswith("alice@example.org (new password)\n")
    assert "s3cret" not in json.dumps(r)

    r = run(args, diff=True)
    assert (r["changed"], r["existed"], r["users"]) == (True, False, 1)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (UID, GID)
    content = path.read_text()
    assert content.startswith("alice@example.org:$scrypt$ln=14,r=8,p=1$")
    assert "s3cret" not in content
    assert AuthDB.load(str(path)).verify("alice@example.org", "s3cret pw")
    # no temporary file left; the change lock's empty file stays, as the kick file's does
    assert sorted(p.name for p in path.parent.iterdir()) == ["smtpusers", "smtpusers.lock"]

    inode = path.stat().st_ino
    for check in (True, False):
        r = run(args, check=check, diff=True)
        assert (r["changed"], r["password_changed"], r["existed"]) == (False, False, True)
        assert r["diff"]["before"] == r["diff"]["after"]
    assert path.read_text() == content  # not re-hashed (a new salt would differ)
    assert path.stat().st_ino == inode  # not even rewritten


def test_password_change_cram_and_on_create(path: Path) -> None:
    base = {"path": str(path), "name": "bob"}
    run({**base, "password": "one"})
    first = path.read_text()

    r = run({**base, "password": "two"}, diff=True)
    assert (r["changed"], r["password_changed"]) == (True, True)
    assert r["diff"]["after"].startswith("bob (new password)\n")
    assert AuthDB.load(str(path)).verify("bob", "two")

    # on_create: an existing user's password is never touched
    r = run({**base, "password": "three", "update_password": "on_create"})
    assert (r["changed"], r["password_changed"]) == (False, False)
    assert AuthDB.load(str(path)).verify("bob", "two")

    # on_create + cram_md5 needs the stored password
    msg = fail({**base, "password": "three", "update_password": "on_create", "cram_md5": True})
    assert "set update_password=always" in msg
    r = run({**base, "password": "two", "update_password": "on_create", "cram_md5": True})
    assert (r["changed"], r["password_changed"], r["cram_md5"]) == (True, False, True)
    db = AuthDB.load(str(path))
    assert db.cram_secret("bob") == "two"

    # always + cram: adding the secret keeps the hash; a second run changes nothing
    r = run({**base, "password": "two", "cram_md5": True}, diff=True)
    assert r["changed"] is False
    assert r["diff"]["after"].startswith("bob (cram-md5)\n")
    assert "two" not in json.dumps(r["diff"])
    # turning it off removes the password-equivalent secret, hash unchanged
    hash_before = db.get("bob").hash  # type: ignore[union-attr]
    r = run({**base, "password": "two"})
    assert (r["changed"], r["password_changed"], r["cram_md5"]) == (True, False, False)
    after = AuthDB.load(str(path)).get("bob")
    assert after is not None
    assert (after.hash, after.cram) == (hash_before, None)
    assert ":cram=" not in path.read_text()
    assert path.read_text() != first


def test_keeps_other_lines_and_upgrades_old_hash(path: Path) -> None:
    other = hash_password("x")
    path.write_text(f"# hand-written header\nold:{OLD_HASH}\n\nzed:{other}\n")
    path.chmod(0o640)
    os.chown(path, UID, GID)
    r = run({"path": str(path), "name": "old", "password": "password"})
    assert (r["changed"], r["password_changed"]) == (True, True)
    lines = path.read_text().split("\n")
    assert lines[0] == "# hand-written header"
    assert lines[1].startswith("old:$scrypt$ln=14,r=8,p=1$")
    assert lines[2:] == ["", f"zed:{other}", ""]
    r = run({"path": str(path), "name": "old", "password": "password"})
    assert r["changed"] is False

    r = run({"path": str(path), "name": "old", "state": "absent"}, diff=True)
    assert r["changed"] is True
    assert r["diff"]["before"].startswith("old\nzed\n")
    assert r["diff"]["after"].startswith("zed\n")
    assert path.read_text() == f"# hand-written header\n\nzed:{other}\n"
    assert run({"path": str(path), "name": "old", "state": "absent"})["changed"] is False


def test_absent_on_missing_file_creates_nothing(path: Path) -> None:
    for check in (True, False):
        r = run({"path": str(path), "name": "nobody", "state": "absent"}, check=check)
        assert r["changed"] is False
    assert not path.exists()


def test_keep_removes_every_other_user(path: Path) -> None:
    """The role owns the file: a login taken out of its list loses its line, in check mode
    only in the result and the diff (names only), then for real, then nothing to do."""
    alice, bob = hash_password("a"), hash_password("b")
    content = f"# header\nalice@example.org:{alice}\nbob@example.org:{bob}\n"
    path.write_text(content)
    path.chmod(0o640)
    os.chown(path, UID, GID)
    args = {"path": str(path), "keep": ["bob@example.org"]}
    r = run(args, check=True, diff=True)
    assert (r["changed"], r["removed"]) == (True, ["alice@example.org"])
    assert r["diff"]["before"].startswith("alice@example.org\nbob@example.org\n")
    assert r["diff"]["after"].startswith("bob@example.org\n")
    assert alice not in json.dumps(r)
    assert path.read_text() == content
    r = run(args)
    assert (r["changed"], r["users"]) == (True, 1)
    assert path.read_text() == f"# header\nbob@example.org:{bob}\n"
    assert AuthDB.load(str(path)).verify("alice@example.org", "a") is False
    assert run(args)["changed"] is False
    assert run({"path": str(path), "keep": []})["removed"] == ["bob@example.org"]
    assert path.read_text() == "# header\n"


def test_record_kicks_lists_the_stale_logins_before_the_write(path: Path) -> None:
    """record_kicks: the logins whose open IMAP/POP3 sessions a change makes stale (a hash
    replaced, a user removed) go to PATH.kick, root's alone, a line per change (alice's new
    password, then her removal: twice); a new user, an unchanged password, check mode and
    the option off record nothing."""
    kicks = Path(f"{path}.kick")
    alice = {"path": str(path), "name": "alice@example.org", "password": "a", "record_kicks": True}
    run(alice)
    run({**alice, "name": "bob@example.org"})
    assert not kicks.exists()  # new users: nobody had a session
    assert run(alice)["changed"] is False
    run({**alice, "password": "a2"}, check=True)
    assert not kicks.exists()
    run({**alice, "password": "a2", "record_kicks": False})
    assert not kicks.exists()
    run({**alice, "password": "a3"})
    assert kicks.read_text().splitlines()[1:] == ["alice@example.org"]
    assert stat.S_IMODE(kicks.stat().st_mode) == 0o600
    run({"path": str(path), "keep": ["alice@example.org"], "record_kicks": True})
    run({**alice, "state": "absent"})
    lines = ["alice@example.org", "bob@example.org", "alice@example.org"]
    assert kicks.read_text().splitlines()[1:] == lines
    assert AuthDB.load(str(path)).verify("bob@example.org", "a") is False


def test_keep_on_missing_file_creates_nothing(path: Path) -> None:
    for check in (True, False):
        assert run({"path": str(path), "keep": ["a@example.org"]}, check=check)["changed"] is False
    assert not path.exists()
    assert "mutually exclusive" in fail({"path": str(path), "name": "a", "keep": []})
    assert "one of the following is required: name, keep" in fail({"path": str(path)})


@pytest.mark.skipif(
    not ROOT, reason=f"{IMPOSSIBLE_HERE} changing a file's group to root needs root"
)
def test_owner_group_mode_only_change(path: Path) -> None:
    args = {"path": str(path), "name": "carol", "password": "pw"}
    run(args)
    content = path.read_text()
    r = run({**args, "mode": "0600", "group": "root"}, check=True, diff=True)
    assert r["changed"] is True
    assert "mode 0640" in r["diff"]["before"]
    assert "mode 0600" in r["diff"]["after"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    r = run({**args, "mode": "0600", "group": "root"})
    assert r["changed"] is True
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, 0)
    assert path.read_text() == content
    assert run({**args, "mode": "0600", "group": "root"})["changed"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"name": "a b", "password": "pw"}, "option name: user name 'a b' contains whitespace"),
        ({"name": "a:b", "password": "pw"}, "contains ':'"),
        ({"name": "", "password": "pw"}, "user name is empty"),
        ({"name": "alice", "password": ""}, "option password: password is empty"),
        ({"name": "alice", "password": "a\nb"}, "contains NUL, CR or LF"),
        ({"name": "alice"}, "state is present but all of the following are missing: password"),
        ({"name": "alice", "password": "pw", "group": "nosuchgroup"}, "group 'nosuchgroup' does"),
        ({"name": "alice", "password": "pw", "owner": "nosuchuser"}, "owner 'nosuchuser' does"),
        ({"name": "alice", "password": "pw", "mode": "u+rw"}, "mode must be an octal string"),
        ({"name": "alice", "password": "pw", "state": "gone"}, "value of state must be one of"),
    ],
)
def test_bad_arguments(path: Path, args: dict[str, Any], message: str) -> None:
    assert message in fail({"path": str(path), **args})
    assert not path.exists()


def test_default_group_must_exist(path: Path) -> None:
    with set_module_args({"path": str(path), "name": "a", "password": "pw"}):
        try:
            pyqmail_smtp_user.main()
        except AnsibleFailJson as exc:
            assert "group 'pyqmaila' does not exist" in exc.result["msg"]
        except AnsibleExitJson:  # the host already has the group of the password verifiers
            assert path.stat().st_gid == grp.getgrnam("pyqmaila").gr_gid
        else:
            pytest.fail("pyqmail_smtp_user.main() returned without exit_json or fail_json")


def test_malformed_file_is_refused(path: Path) -> None:
    path.write_text("alice:plaintext\n")
    msg = fail({"path": str(path), "name": "bob", "password": "pw"})
    assert f"{path}:1: user 'alice': hash is not of the form" in msg
    assert path.read_text() == "alice:plaintext\n"


def test_missing_directory(tmp_path: Path) -> None:
    msg = fail({"path": str(tmp_path / "no" / "smtpusers"), "name": "a", "password": "pw"})
    assert "does not exist; create it first" in msg


def test_through_ansible(path: Path) -> None:
    secret = "Very-Secret-0xC0FFEE"
    args = {"path": str(path), "name": "dave", "password": secret, "group": GROUP}
    r = run_module("pyqmail_smtp_user", args, check=True, diff=True)
    assert r["changed"] is True, r
    assert not path.exists()
    r = run_module("pyqmail_smtp_user", args, diff=True)
    assert (r["changed"], r["password_changed"]) == (True, True), r
    assert AuthDB.load(str(path)).verify("dave", secret)
    r = run_module("pyqmail_smtp_user", args, check=True, diff=True)
    assert r["changed"] is False, r
    r = run_module("pyqmail_smtp_user", args)
    assert r["changed"] is False, r
    assert secret not in json.dumps(r)  # no_log: censored in the invocation
    r = run_module("pyqmail_smtp_user", {**args, "group": "nosuchgroup"})
    assert r.get("failed") is True
    assert "group 'nosuchgroup' does not exist" in r["msg"]


def test_no_warning_about_no_log(path: Path) -> None:
    """update_password (a choice whose name holds 'password') lacked no_log: False, so Ansible
    printed "Module did not set no_log for update_password" on every task."""
    args = {"path": str(path), "name": "erin", "password": "pw-erin", "group": GROUP}
    for extra in ({}, {"update_password": "on_create"}):
        r = run_module("pyqmail_smtp_user", {**args, **extra})
        assert not r.get("failed"), r.get("msg")
        assert not [w for w in r.get("warnings", []) if "no_log" in w], r["warnings"]


def test_the_change_waits_for_the_files_change_lock(path: Path) -> None:
    """A review's finding: the module and pyqmail-users read, changed and replaced the file
    with no lock, so a del beside an add was undone. The module now waits for the lock
    pyqmail-users takes (``authdb.change_locked``) and reads the file once it has it."""
    run({"path": str(path), "name": "first", "password": "pw-first-1"})
    outcome: list[dict[str, Any]] = []

    def add_second() -> None:
        outcome.append(run({"path": str(path), "name": "second", "password": "pw-second-1"}))

    with change_locked(str(path)):
        worker = threading.Thread(target=add_second)
        worker.start()
        worker.join(1.0)
        assert worker.is_alive(), "the module wrote while another writer held the lock"
        # the other writer's change, made under the lock: the module must build on it
        db = AuthDB.load(str(path))
        db.set(User(name="third", hash=hash_password("pw-third-1")))
        atomic_write(str(path), db.dump().encode("utf-8"))
    worker.join(30)
    assert outcome and outcome[0]["changed"]
    assert [user.name for user in AuthDB.load(str(path))] == ["first", "third", "second"]
