"""module_utils/pyqmail_files.py: the one file writer of every module in library/.

The secret-exposure tests watch the target directory at every audited operation of the
module run (``sys.addaudithook``: each open, chmod, chown, rename ... the module makes, by
Python or by Ansible) and record any file holding the secret that someone other than its
owner and group could read at that moment. Ansible's ``atomic_move``, which the modules used
before, copies the replaced file's mode onto the new content before the rename: a new key
written over a 0644 file was readable by every local user for that moment.
"""

from __future__ import annotations

import importlib
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.collection import module_utils
from tests.modules.utils import AnsibleExitJson, AnsibleFailJson, set_module_args

files: Any = module_utils("pyqmail_files")
cert_module: Any = importlib.import_module("pyqmail_certificate")
ca_module: Any = importlib.import_module("pyqmail_ca")
smtp_user_module: Any = importlib.import_module("pyqmail_smtp_user")
control_module: Any = importlib.import_module("pyqmail_control_files")


class ExposureWatch:
    """Records (event, file, mode) whenever a file in ``directory`` holding ``marker`` has
    any permission bit for others. Audit hooks cannot be removed: armed only inside a test."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.marker = b""
        self.exposed: list[tuple[str, str, str]] = []
        self.events = 0
        self._busy = False

    def hook(self, event: str, _args: tuple[Any, ...]) -> None:
        """Audit hook: look at the directory (re-entry from our own reads is ignored)."""
        if self.directory is None or self._busy:
            return
        self._busy = True
        try:
            self.events += 1
            self.look(event)
        finally:
            self._busy = False

    def look(self, event: str) -> None:
        """One pass over the directory: every file with the marker must be closed to others."""
        assert self.directory is not None
        for entry in os.scandir(self.directory):
            try:
                mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                if not entry.is_file(follow_symlinks=False) or not mode & 0o007:
                    continue
                with open(entry.path, "rb") as handle:
                    if self.marker in handle.read():
                        self.exposed.append((event, entry.name, f"{mode:04o}"))
            except FileNotFoundError:
                continue


WATCH = ExposureWatch()
sys.addaudithook(WATCH.hook)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[ExposureWatch]:
    """Arm the watch on tmp_path for the test; umask 022 as on a default host."""
    old_umask = os.umask(0o022)
    WATCH.exposed, WATCH.events = [], 0
    try:
        yield WATCH
    finally:
        WATCH.directory = None
        os.umask(old_umask)


def call(module: Any, args: dict[str, Any], *, check: bool = False) -> dict[str, Any]:
    """Run a module in-process with --diff; its result, failed or not."""
    full = {**args, "_ansible_check_mode": check, "_ansible_diff": True}
    with set_module_args(full):
        try:
            module.main()
        except (AnsibleExitJson, AnsibleFailJson) as exc:
            return dict(exc.result)
    raise AssertionError("the module neither exited nor failed")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_key_over_a_world_readable_file_is_never_readable_by_others(
    tmp_path: Path, watch: ExposureWatch
) -> None:
    """The case atomic_move got wrong: an unusable 0644 file is replaced by a new key, 0400."""
    target = tmp_path / "servercert.pem"
    target.write_bytes(b"not a certificate\n")
    target.chmod(0o644)
    watch.marker, watch.directory = b"PRIVATE KEY", tmp_path
    r = call(cert_module, {"path": str(target), "names": ["a.test"], "mode": "0400"})
    watch.directory = None
    assert not r.get("failed"), r.get("msg")
    assert r["changed"] is True
    assert b"PRIVATE KEY" in target.read_bytes()
    assert watch.events > 5, "the audit hook saw nothing: the test proves nothing"
    assert watch.exposed == [], f"the key was readable by others: {watch.exposed}"
    assert mode_of(target) == 0o400
    assert "mode: 0644" in r["diff"]["before"]
    assert "mode: 0400" in r["diff"]["after"]


def test_new_ca_and_certificate_never_readable_by_others(
    tmp_path: Path, watch: ExposureWatch
) -> None:
    """New files: the key files are created 0600 and keep others out from the first byte."""
    ca = tmp_path / "ca"
    ca.mkdir(mode=0o700)
    (ca / "ca.key").write_bytes(b"junk\n")
    (ca / "ca.key").chmod(0o644)
    watch.marker, watch.directory = b"PRIVATE KEY", ca
    r = call(ca_module, {"path": str(ca), "common_name": "x"})
    assert not r.get("failed"), r.get("msg")
    watch.directory = tmp_path
    r = call(cert_module, {"path": str(tmp_path / "s.pem"), "names": ["a.test"]})
    watch.directory = None
    assert not r.get("failed"), r.get("msg")
    assert watch.exposed == [], f"a key was readable by others: {watch.exposed}"
    assert (mode_of(tmp_path / "s.pem"), mode_of(ca / "ca.pem")) == (0o400, 0o644)
    assert mode_of(ca / "ca.key") == 0o600


def test_smtp_user_hashes_never_readable_by_others(tmp_path: Path, watch: ExposureWatch) -> None:
    """The AUTH database (password hashes) is 0640 from its first byte, over a 0644 file too."""
    path = tmp_path / "smtpusers"
    path.write_bytes(b"# hand-made\n")
    path.chmod(0o644)
    gid = os.getegid()
    watch.marker, watch.directory = b"$scrypt$", tmp_path
    args = {"path": str(path), "name": "alice", "password": "pw", "mode": "0640"}
    r = call(smtp_user_module, {**args, "owner": str(os.geteuid()), "group": str(gid)})
    watch.directory = None
    assert not r.get("failed"), r.get("msg")
    assert watch.exposed == [], f"the hashes were readable by others: {watch.exposed}"
    assert mode_of(path) == 0o640


@pytest.mark.parametrize("before", [None, 0o644])
def test_control_files_secret_is_never_looser_than_0600_nor_in_the_diff(
    tmp_path: Path, watch: ExposureWatch, before: int | None
) -> None:
    """The roles write smtproutes-auth and a remote CA's key files with pyqmail_control_files
    and ``secret: true`` (ansible.builtin.copy/template made them 0644 first, then 0400): every
    file holding the secret is 0600 or closer from its creation, over an old 0644 file too,
    and the diff says it changed without the content."""
    if before is not None:
        (tmp_path / "smtproutes-auth").write_text("old\n")
        (tmp_path / "smtproutes-auth").chmod(before)
    created: list[int] = []

    def look(_tmp: str, fd: int) -> None:
        created.append(stat.S_IMODE(os.fstat(fd).st_mode))

    content = "relay.test:alice:s3cr3t-pw\n"
    args = {
        "path": str(tmp_path),
        "mode": "0400",
        "secret": True,
        "files": [{"name": "smtproutes-auth", "content": content}],
    }
    watch.marker, watch.directory = b"s3cr3t-pw", tmp_path
    files.after_create = look
    try:
        r = call(control_module, args)
    finally:
        files.after_create = None
        watch.directory = None
    assert not r.get("failed"), r.get("msg")
    assert r["changed_files"] == ["smtproutes-auth"]
    assert watch.events > 5, "the audit hook saw nothing: the test proves nothing"
    assert watch.exposed == [], f"the secret was readable by others: {watch.exposed}"
    assert created == [0o600], "the temp file was not created closed"
    assert mode_of(tmp_path / "smtproutes-auth") == 0o400
    assert (tmp_path / "smtproutes-auth").read_text() == content
    assert "s3cr3t-pw" not in repr(r["diff"])
    assert call(control_module, args)["changed"] is False


def test_secret_temp_file_is_0600_and_empty_when_created(tmp_path: Path) -> None:
    """The hook sees the temp file at creation: 0600, no byte yet, in the target's directory."""
    seen: list[tuple[str, int, int]] = []

    def look(tmp: str, fd: int) -> None:
        st = os.fstat(fd)
        seen.append((os.path.dirname(tmp), stat.S_IMODE(st.st_mode), st.st_size))

    files.after_create = look
    try:
        files.write_file(str(tmp_path / "k"), b"secret", 0o640, secret=True)
        files.write_file(str(tmp_path / "run"), b"#!/bin/sh\n", 0o755)
    finally:
        files.after_create = None
    assert seen == [(str(tmp_path), 0o600, 0), (str(tmp_path), 0o755, 0)]
    assert (mode_of(tmp_path / "k"), mode_of(tmp_path / "run")) == (0o640, 0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "run"], "a temp file was left"


def test_failed_write_leaves_the_target_and_no_temp_file(tmp_path: Path) -> None:
    """An error after the temp file exists (here: text, not bytes) removes it, keeps the old."""
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        files.write_file(str(target), "new", 0o644)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_read_if_exists(tmp_path: Path) -> None:
    assert files.read_if_exists(str(tmp_path / "missing")) is None
    (tmp_path / "x").write_bytes(b"1")
    assert files.read_if_exists(str(tmp_path / "x")) == b"1"
    with pytest.raises(IsADirectoryError):
        files.read_if_exists(str(tmp_path))


tcprules_module: Any = importlib.import_module("pyqmail_tcprules")


@pytest.mark.parametrize(
    ("mode", "before", "after"),
    [
        ("u=rw,go=r", None, 0o644),  # symbolic, new file
        ("g+w", 0o600, 0o620),  # symbolic, relative to the file it replaces
        ("0640", 0o600, 0o640),
        (None, 0o604, 0o604),  # no mode: the replaced file's
        (None, None, 0o644),  # no mode, new file: 0666 less the umask (022 here)
    ],
)
def test_mode_forms(
    tmp_path: Path, watch: ExposureWatch, mode: str | None, before: int | None, after: int
) -> None:
    """Octal, symbolic and absent modes give a rewritten file what Ansible's own would."""
    path = tmp_path / "smtp"
    if before is not None:
        path.write_text("old\n")
        path.chmod(before)
    args: dict[str, Any] = {"path": str(path), "rules": [{"address": "127.", "action": "allow"}]}
    if mode is not None:
        args["mode"] = mode
    r = call(tcprules_module, args)
    assert not r.get("failed"), r.get("msg")
    assert mode_of(path) == after
    assert path.read_text().endswith("127.:allow\n")


BACKUP_NAME = r"\.\d+\.\d{4}-\d\d-\d\d@\d\d:\d\d:\d\d~"


@pytest.mark.parametrize("kind", ["certificate", "ca"])
def test_backup_of_a_key_is_never_readable_by_others(
    tmp_path: Path, watch: ExposureWatch, kind: str
) -> None:
    """backup: true copied servercert.pem and ca.key with backup_local (shutil.copy2): the
    copy was 0644 and already held the whole key before its 0400 mode was copied over. The
    backup now never has a looser mode than the original at any audited moment, is created
    0600, and ends with the original's owner, group, mode, times and bytes."""
    if kind == "certificate":
        target, module = tmp_path / "servercert.pem", cert_module
        args: dict[str, Any] = {"path": str(target), "names": ["a.test"], "mode": "0400"}
        again = {**args, "names": ["b.test"], "backup": True}
    else:
        target, module = tmp_path / "ca.key", ca_module
        args = {"path": str(tmp_path), "common_name": "x"}
        again = {**args, "force": True, "backup": True}
    first = call(module, args)
    assert not first.get("failed"), first.get("msg")
    if os.geteuid() == 0:  # the copy must get the original's owner and group, not ours
        os.chown(target, 65534, 65534)
    old, before = target.read_bytes(), target.stat()
    created: list[tuple[str, int]] = []

    def look(tmp: str, fd: int) -> None:
        created.append((os.path.basename(tmp), stat.S_IMODE(os.fstat(fd).st_mode)))

    files.after_create = look
    watch.marker, watch.directory = b"PRIVATE KEY", tmp_path
    try:
        r = call(module, again)
    finally:
        files.after_create = None
        watch.directory = None
    assert not r.get("failed"), r.get("msg")
    backup = Path(r["backup_file"] if kind == "certificate" else r["backup_files"][0])
    assert re.fullmatch(re.escape(target.name) + BACKUP_NAME, backup.name), backup.name
    assert watch.exposed == [], f"the key was readable by others: {watch.exposed}"
    assert [mode for name, mode in created if name.startswith(f".{backup.name}.")] == [0o600]
    assert backup.read_bytes() == old
    after = backup.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        before.st_uid,
        before.st_gid,
        stat.S_IMODE(before.st_mode),
    )
    assert after.st_mtime_ns == before.st_mtime_ns
    assert target.read_bytes() != old
