"""pyqmail.authlock: the login lock SMTP AUTH and IMAP/POP3 share, its file, who may use it.

The rule itself (count, lock, bound, clear) is exercised through pyqmail-smtpd's side in
test_authguard.py and through pyqmail-checkpassword in test_checkpassword_limits.py; here:
the directory and file modes, two verifiers of different users sharing one count while a
third user is shut out, and the size bound when every failure comes from a new process.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pyqmail import authdir, authlock
from pyqmail.authlock import AccountLocks, Rule, StateError
from tests.conftest import IMPOSSIBLE_HERE
from tests.runas import IS_ROOT, Ident, run_as, spare_ids

RULE = Rule(fails=3, secs=600)
ROLES = Path(__file__).resolve().parents[2] / "roles"

_RECORD = """
import pathlib
from pyqmail.authlock import AccountLocks, Rule, StateError
os.umask(0o077)  # whatever the caller's umask: the files stay the group's
locks = AccountLocks(pathlib.Path(sys.argv[4]))
try:
    locks.record(sys.argv[5], ok=False, now=1000.0, rule=Rule(3, 600))
    print(json.dumps(["ok", locks.locked(sys.argv[5], 1000.0, Rule(3, 600))]))
except StateError as exc:
    print(json.dumps(["StateError", str(exc)]))
"""


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A qmail root every user may traverse (pytest's tmp_path is under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="pyqmail-authlock-"))
    path.chmod(0o755)
    (path / "control").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _owner(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.mark.skipif(not IS_ROOT, reason=f"{IMPOSSIBLE_HERE} acting as other users needs root")
def test_two_verifiers_of_the_group_share_one_count_and_nobody_else_gets_in(
    open_root: Path,
) -> None:
    """pyqmail-smtpd (its own uid, the auth group as a supplementary group) and Dovecot's
    auth process (another uid, the same group as extra_groups) count failures of one name
    together; a user outside the group cannot open the file, and says which one."""
    smtpd, dovecot, stranger, group = spare_ids(4)
    hashes = open_root / "control" / "smtpusers"
    hashes.write_text("")
    os.chown(hashes, 0, group)
    authdir.make_dir(open_root)  # as the role does: root, the hashes' group, 2770
    where = open_root / "auth"
    assert _owner(where) == (group, 0o2770)
    preload = "import sqlite3, pyqmail.authlock"
    first = run_as(
        Ident(smtpd, smtpd, (group,)), _RECORD, str(open_root), "admin@mx.test", preload=preload
    )
    second = run_as(
        Ident(dovecot, dovecot, (dovecot, group)),
        _RECORD,
        str(open_root),
        "admin@mx.test",
        preload=preload,
    )
    assert first == ["ok", False] and second == ["ok", False]
    shut_out = run_as(
        Ident(stranger, stranger, (stranger,)),
        _RECORD,
        str(open_root),
        "admin@mx.test",
        preload=preload,
    )
    assert shut_out[0] == "StateError"
    assert f"{where / 'accounts.sqlite'}: cannot open the login locks" in shut_out[1]
    assert f"{where} must be group gid {group} (that of control/smtpusers)" in shut_out[1]
    locks = AccountLocks(open_root)
    try:
        locks.record("admin@mx.test", ok=False, now=1001.0, rule=RULE)  # the third failure
        assert locks.locked("admin@mx.test", 1002.0, RULE), "the two counts were not one"
        for name in ("accounts.sqlite", "accounts.sqlite-wal", "accounts.sqlite-shm"):
            assert _owner(where / name) == (group, 0o660), name
        assert sorted(p.name for p in where.iterdir()) == [
            "accounts.sqlite",
            "accounts.sqlite-shm",
            "accounts.sqlite-wal",
        ]
    finally:
        locks.close()


def test_the_file_is_made_for_the_group_whatever_the_umask(tmp_path: Path) -> None:
    (tmp_path / "control").mkdir()
    old = os.umask(0o077)
    try:
        AccountLocks(tmp_path).record("a", ok=False, now=1.0, rule=RULE)
    finally:
        os.umask(old)
    assert _owner(tmp_path / "auth") == (os.getegid(), 0o2770)
    assert stat.S_IMODE(os.stat(tmp_path / "auth" / "accounts.sqlite").st_mode) == 0o660


def test_a_flood_of_new_names_from_short_processes_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyqmail-checkpassword lives for one login: the prune cannot wait for one process's
    200th failure, so the failures are counted in the file."""
    monkeypatch.setattr(authlock, "MAX_ROWS", 30)
    monkeypatch.setattr(authlock, "PRUNE_EVERY", 10)
    locked = AccountLocks(tmp_path)
    for i in range(RULE.fails):
        locked.record("admin@mx.test", ok=False, now=1000.0 + i, rule=RULE)
    locked.close()
    for i in range(200):  # each its own connection, as each login is its own process
        locks = AccountLocks(tmp_path)
        locks.record(f"guess{i}@mx.test", ok=False, now=1010.0 + i / 10, rule=RULE)
        locks.close()
    check = AccountLocks(tmp_path)
    assert check.rows() <= 30 + 10
    assert check.locked("admin@mx.test", 1040.0, RULE), "the flood evicted the lock"


def test_broken_file_is_set_aside_and_unusable_place_named(tmp_path: Path) -> None:
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "accounts.sqlite").write_bytes(b"not a database" * 200)
    assert not AccountLocks(tmp_path).locked("a", 1.0, RULE)
    assert list((tmp_path / "auth").glob("accounts.sqlite.broken-*"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match=r"file/auth/accounts.sqlite: cannot open the login"):
        AccountLocks(blocker).connect()


def test_the_role_makes_the_directory_as_the_verifiers_do() -> None:
    """pyqmail_install creates <root>/auth as root (root, the auth group, 2770, the mode
    ``authdir.make_dir`` gives it), before the wheel: a new wheel restarts pyqmail-smtpd at
    the end of the daemon play and Dovecot runs the new checker at once, and neither may
    create it in root's <root> (with the directory made by the later config play, AUTH got
    454 and IMAP/POP3 logins 111 in between, or until that play ran)."""
    tasks = yaml.safe_load((ROLES / "pyqmail_install" / "tasks" / "main.yml").read_text())
    names = [t.get("name", "") for t in tasks]
    (where,) = [i for i, name in enumerate(names) if "(login locks, pyqmail.authlock)" in name]
    assert where < names.index(
        "Install the daemon wheel (shipped with the collection, or built here)"
    )
    args = tasks[where]["ansible.builtin.file"]
    assert args["path"] == "{{ pyqmail__root }}/" + authdir.AUTH_DIR
    assert (args["owner"], args["group"], args["state"]) == (
        "root",
        "{{ pyqmail__auth_group }}",
        "directory",
    )
    assert int(args["mode"], 8) == authdir.DIR_MODE
