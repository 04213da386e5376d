# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""File writes for pyqmail_ca / pyqmail_certificate (after community.crypto's _io.py).

Compare first; write to a temp file in the target's own directory, fsync, ``atomic_move``
under umask 077 (so a new key file is never readable by others, not even for the moment
between the rename and the chmod), then owner/group/mode. Check mode never writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Any


def read_if_exists(path: str) -> bytes | None:
    """The file's bytes, or None if it does not exist; other errors propagate."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def file_args(module: Any, path: str, mode: Any) -> dict[str, Any]:
    args: dict[str, Any] = module.load_file_common_arguments(module.params, path=path)
    args["mode"] = mode
    return args


def set_attributes(module: Any, args: dict[str, Any], diff: dict[str, Any]) -> bool:
    """owner/group/mode as asked; True when any differed (check mode: would differ)."""
    if not os.path.exists(args["path"]):
        return False
    return bool(module.set_fs_attributes_if_different(args, False, diff=diff))


def write_file(
    module: Any,
    path: str,
    content: bytes,
    mode: Any,
    *,
    backup: bool = False,
    existing: bytes | None = None,
    diff: dict[str, Any] | None = None,
) -> tuple[bool, str | None]:
    """Make ``path`` hold ``content`` with the asked attributes; return (changed, backup_file).

    ``existing`` is the current content when the caller already read it.
    """
    if existing is None:
        existing = read_if_exists(path)
    args = file_args(module, path, mode)
    attr_diff: dict[str, Any] = diff if diff is not None else {"before": {}, "after": {}}
    if existing == content:
        return set_attributes(module, args, attr_diff), None
    if module.check_mode:
        return True, None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        module.fail_json(
            msg=f"the directory of {path} does not exist; create {directory} first "
            "(ansible.builtin.file with state: directory)"
        )
    backup_file = None
    if backup and existing is not None:
        backup_file = module.backup_local(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    module.add_cleanup_file(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        old_umask = os.umask(0o077)
        try:
            module.atomic_move(tmp, os.path.abspath(path))
        finally:
            os.umask(old_umask)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        module.fail_json(msg=f"cannot write {path}: {exc}")
    if existing is None:
        # A new file has no "before" attributes (the temp file's 0600 would only confuse).
        scratch: dict[str, Any] = {"before": {}, "after": {}}
        set_attributes(module, args, scratch)
        attr_diff.setdefault("after", {}).update(scratch["after"])
    else:
        set_attributes(module, args, attr_diff)
    return True, backup_file
