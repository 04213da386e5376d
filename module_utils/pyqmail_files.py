# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one file writer of every module in library/ (after community.crypto's _io.py).

Why one: each module used to carry its own temp-file-and-rename code, and two of them fixed
the same permission race two different ways (a umask around ``atomic_move``; an fchmod after
``mkstemp``) while a third replaced an existing file through ``atomic_move``, which copies the
*old* file's mode onto the new content before the rename. A new private key written over a
0644 file was readable by every local user until the chmod that followed.

The rule, in this order, every time:

1. create the temp file in the target's own directory with ``O_CREAT | O_EXCL | O_NOFOLLOW``
   and mode 0600 (a secret) or the final mode (anything else): nobody else can have it open;
2. ``fchown`` then ``fchmod`` to the final owner, group and mode (chown first: it clears
   setuid/setgid bits) - still before the first byte is written;
3. write, ``fsync``, ``rename`` over the target (readers see the old or the new file, never a
   partial one), ``fsync`` the directory (the rename survives a crash).

Modules call :func:`ensure_file` (compare, check mode, backup, Ansible's owner/group/mode
options and their diff) or, with numeric attributes they resolved themselves,
:func:`write_file`. Check mode never writes. A backup (``backup: true``) is written the same
way, by :func:`backup_copy`, not by Ansible's ``backup_local``: that one copies with
``shutil.copy2``, which creates the copy 0666 less the umask, writes the whole old file (a
private key) into it and only then copies the 0400 mode over.

A module may use, of the AnsibleModule it passes: ``params``, ``check_mode``,
``load_file_common_arguments``, ``set_fs_attributes_if_different``, ``selinux_enabled``,
``selinux_context``, ``set_context_if_different``, ``add_cleanup_file``, ``fail_json`` and
``_symbolic_mode_to_octal``.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import secrets
import stat
import time
from collections.abc import Callable
from typing import Any

SECRET_MODE = 0o600

# Called with (temp path, open fd) right after the temp file is created, before any byte is
# written. None in production; tests set it to look at the file at that moment.
after_create: Callable[[str, int], None] | None = None


def read_if_exists(path: str) -> bytes | None:
    """The file's bytes, or None if it does not exist; other errors propagate."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (the file's own fsync does not cover it)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_file(
    path: str,
    data: bytes,
    mode: int,
    owner: int = -1,
    group: int = -1,
    *,
    secret: bool = False,
) -> None:
    """Replace ``path`` with ``data`` carrying ``mode``/``owner``/``group`` from the start.

    ``owner``/``group`` -1 leave what the system gives a new file (the caller's uid, the
    directory's group when it is setgid). ``secret`` creates the temp file 0600 whatever the
    final mode, so not even the group sees it before the fchown. OSError propagates; the temp
    file is gone then.
    """
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, SECRET_MODE if secret else mode & 0o777)
    try:
        if after_create is not None:
            after_create(tmp, fd)
        if owner != -1 or group != -1:
            os.fchown(fd, owner, group)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def backup_name(path: str) -> str:
    """The name ``backup_local`` gives a backup: ``<path>.<pid>.<YYYY-MM-DD@HH:MM:SS>~``."""
    stamp = time.strftime("%Y-%m-%d@%H:%M:%S~", time.localtime(time.time()))
    return f"{path}.{os.getpid()}.{stamp}"


def backup_copy(module: Any, path: str, data: bytes, current: os.stat_result) -> str:
    """Copy ``data``, the content of ``path`` as ``current`` describes it, to a backup file.

    Why not ``backup_local``: see the module's docstring. The copy is made by
    :func:`write_file`: created 0600, given the original's owner, group and mode before its
    first byte, then renamed into place, so it is never readable by anyone the original did
    not let read it. Then its times (as ``shutil.copy2``) and SELinux context (as
    ``backup_local``). A module not running as root cannot give away a file: the copy is
    then its own, with the original's mode, as ``backup_local`` leaves it.
    """
    dest = backup_name(path)
    mode = stat.S_IMODE(current.st_mode)
    try:
        try:
            write_file(dest, data, mode, current.st_uid, current.st_gid, secret=True)
        except PermissionError:
            write_file(dest, data, mode, secret=True)
        os.utime(dest, ns=(current.st_atime_ns, current.st_mtime_ns), follow_symlinks=False)
    except OSError as exc:
        module.fail_json(msg=f"cannot back up {path} to {dest}: {exc} (nothing was changed)")
    if module.selinux_enabled():
        module.set_context_if_different(dest, module.selinux_context(path), False)
    return dest


# ---- Ansible's owner/group/mode options -----------------------------------------------------


def file_args(module: Any, path: str, mode: Any) -> dict[str, Any]:
    """The module's common file arguments for ``path`` with ``mode`` (a module may have two)."""
    args: dict[str, Any] = module.load_file_common_arguments(module.params, path=path)
    args["mode"] = mode
    return args


def set_attributes(module: Any, args: dict[str, Any], diff: dict[str, Any]) -> bool:
    """owner/group/mode as asked on an existing file; True when any differed.

    In check mode nothing changes and the diff still says what would.
    """
    if not os.path.exists(args["path"]):
        return False
    return bool(module.set_fs_attributes_if_different(args, False, diff=diff))


def _predict_attributes(module: Any, args: dict[str, Any], diff: dict[str, Any]) -> None:
    """Fill ``diff`` with the owner/group/mode changes the write will make, changing nothing."""
    saved = module.check_mode
    module.check_mode = True
    try:
        set_attributes(module, args, diff)
    finally:
        module.check_mode = saved


def _resolve_owner(module: Any, owner: Any, current: os.stat_result | None) -> int:
    """A uid: the asked one (name or number), else the current file's, else -1 (the caller)."""
    if owner is None:
        return current.st_uid if current is not None else -1
    try:
        return int(owner)
    except ValueError:
        pass
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        module.fail_json(msg=f"owner {owner!r} does not exist on this host; create it first")
        raise


def _resolve_group(module: Any, group: Any, current: os.stat_result | None) -> int:
    """A gid: the asked one (name or number), else the current file's, else -1."""
    if group is None:
        return current.st_gid if current is not None else -1
    try:
        return int(group)
    except ValueError:
        pass
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        module.fail_json(msg=f"group {group!r} does not exist on this host; create it first")
        raise


class _NewFile:
    """What _symbolic_mode_to_octal needs of a stat result for a file not there yet."""

    def __init__(self, mode: int) -> None:
        self.st_mode = stat.S_IFREG | mode


def _resolve_mode(module: Any, mode: Any, current: os.stat_result | None, secret: bool) -> int:
    """Numeric final mode: as asked (octal or symbolic), else the current file's, else new.

    A new file with no mode asked gets 0600 when secret, else 0666 less the umask (what
    ``atomic_move`` gave it before).
    """
    if mode is None and current is not None:
        return stat.S_IMODE(current.st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    if mode is None:
        return SECRET_MODE if secret else 0o666 & ~umask
    if isinstance(mode, int) and not isinstance(mode, bool):
        return mode
    text = str(mode)
    if re.fullmatch(r"[0-7]{1,5}", text):
        return int(text, 8)
    base = current if current is not None else _NewFile(0o666 & ~umask)
    try:
        return int(module._symbolic_mode_to_octal(base, text))
    except ValueError as exc:
        module.fail_json(msg=f"mode {text!r} is neither octal nor symbolic: {exc}")
        raise


def ensure_file(
    module: Any,
    path: str,
    content: bytes,
    mode: Any,
    *,
    secret: bool = False,
    backup: bool = False,
    existing: bytes | None = None,
    diff: dict[str, Any] | None = None,
    undo: Callable[[], str] | None = None,
) -> tuple[bool, str | None]:
    """Make ``path`` hold ``content`` with the module's owner/group and ``mode``.

    Returns (changed, backup file or None). ``existing`` is the current content when the
    caller already read it. ``diff`` receives the owner/group/mode changes in Ansible's form
    (``{"before": {"mode": "0644"}, "after": {"mode": "0600"}}``), in check mode too.
    ``undo``: for a module whose files are one change (DKIM keys and the state naming them),
    called when the write fails, before the module fails: it takes back the files written
    before and returns a sentence for the message.
    """
    if existing is None:
        existing = read_if_exists(path)
    args = file_args(module, path, mode)
    attr_diff: dict[str, Any] = diff if diff is not None else {"before": {}, "after": {}}
    if existing == content:
        return set_attributes(module, args, attr_diff), None
    _predict_attributes(module, args, attr_diff)
    if module.check_mode:
        return True, None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        module.fail_json(
            msg=f"the directory of {path} does not exist; create {directory} first "
            "(ansible.builtin.file with state: directory)"
        )
    try:
        current = os.stat(path) if existing is not None else None
    except FileNotFoundError:
        current = None
    uid = _resolve_owner(module, args.get("owner"), current)
    gid = _resolve_group(module, args.get("group"), current)
    final_mode = _resolve_mode(module, mode, current, secret)
    backup_file = None
    if backup and current is not None and existing is not None:
        backup_file = backup_copy(module, path, existing, current)
    try:
        write_file(path, content, final_mode, uid, gid, secret=secret)
    except OSError as exc:
        undone = f"; {undo()}" if undo is not None else ""
        module.fail_json(msg=f"cannot write {path}: {exc}{undone}")
    if current is None:
        # What differs from a plain new file of ours (0600, our uid and gid), as before.
        after = attr_diff.setdefault("after", {})
        if final_mode != SECRET_MODE:
            after.setdefault("mode", f"0{final_mode:03o}")
        if uid not in (-1, os.geteuid()):
            after.setdefault("owner", uid)
        if gid not in (-1, os.getegid()):
            after.setdefault("group", gid)
    # SELinux context and file attributes (chattr), which the numeric write does not carry.
    set_attributes(module, args, {"before": {}, "after": {}})
    return True, backup_file
