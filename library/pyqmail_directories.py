#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_directories
short_description: Create a set of directories with their owner, group and mode in one call
description:
  - Makes each path of O(paths) a directory with the owner, group and mode given for it or for
    all (the file options below). Missing parents are created too, with the same owner, group
    and mode, as C(ansible.builtin.file) with C(state=directory) does.
  - One module run for a whole set of directories (a Maildir and its folders, the supervise
    directories of every service), instead of one C(ansible.builtin.file) per directory -
    each of those is a round trip to the host.
  - Paths are handled in the order given. A path that exists and is not a directory (or a
    symlink to one) is an error.
  - With O(foreign_owner=fail), a path that exists and belongs to a user other than root and
    O(owner) is an error, found before anything is created or changed.
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    details: Nothing is created or changed; RV(changed_paths) lists what would be, missing
      parents included.
  diff_mode:
    support: full
    details: Each created directory, and each owner, group or mode change.
  platform:
    platforms: posix
options:
  paths:
    description: The directories, each a path or a dict with its own owner, group or mode.
    type: list
    elements: raw
    required: true
  foreign_owner:
    description:
      - What to do with a path that exists and belongs to a user other than root and the
        owner asked for it (O(owner), or the entry's own). The path itself and, for a
        symlink, the directory it names are looked at.
      - V(change) gives it to the owner asked for, as C(ansible.builtin.file) does. Right for
        the directories a role owns outright (its queue, its log directories), which may
        still carry the user of an earlier installation.
      - V(fail) refuses, before any path of the set is created or changed, with an error that
        names the path, its owner and the owner asked for. Right for paths built from names
        an administrator types under a base directory (mailbox homes), where an existing
        directory of that name can be another user's home.
      - A path owned by root or already by the owner asked for is changed as asked either
        way, so a second run re-asserts what the first made.
    type: str
    choices: [change, fail]
    default: change
"""

EXAMPLES = r"""
- name: A Maildir with its folders
  pyqmail.mail.pyqmail_directories:
    owner: pyqmailv
    group: pyqmailv
    mode: "0700"
    foreign_owner: fail  # /home/vmail/admin belonging to a login user is theirs, not a mailbox
    paths:
      - /home/vmail/admin
      - /home/vmail/admin/Maildir
      - /home/vmail/admin/Maildir/cur
      - /home/vmail/admin/Maildir/new
      - /home/vmail/admin/Maildir/tmp

- name: The queue layout, one mode each
  pyqmail.mail.pyqmail_directories:
    owner: pyqmails
    group: pyqmail
    paths:
      - {path: /var/qmail/queue/tmp, mode: "03730"}
      - {path: /var/qmail/queue/mess, mode: "0700"}
"""

RETURN = r"""
changed_paths:
  description: The directories created or changed (in check mode - that would be), in the
    order of O(paths).
  returned: always
  type: list
  elements: str
  sample: [/home/vmail/admin/Maildir/.Sent]
"""

import os
import pwd
from typing import Any

from ansible.module_utils.basic import AnsibleModule

ENTRY_KEYS = {"path", "owner", "group", "mode"}


def entries(paths: list[Any]) -> tuple[list[dict[str, Any]], str | None]:
    """``paths`` as dicts, or the first problem (naming the entry)."""
    out: list[dict[str, Any]] = []
    for index, item in enumerate(paths):
        where = f"paths entry {index + 1}"
        entry = {"path": item} if isinstance(item, str) else item
        if not isinstance(entry, dict):
            return out, f"{where}: give a path or a dict with path (and owner, group, mode)"
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            return out, f"{where}: unknown keys {unknown}; use {sorted(ENTRY_KEYS)}"
        path = entry.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            return out, f"{where}: path {path!r} is not an absolute path"
        out.append(entry)
    return out, None


def uid_of(owner: Any) -> int | None:
    """A user name or number as a uid, as Ansible's chown reads it; None for a name this
    host does not know (every existing directory but root's is then someone else's)."""
    try:
        return int(owner)
    except ValueError:
        pass
    try:
        return pwd.getpwnam(str(owner)).pw_uid
    except KeyError:
        return None


def user_named(uid: int) -> str:
    """``alice (uid 1000)``, or ``uid 1000`` for a number no user has."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def foreign_owner(path: str, owner: Any) -> str | None:
    """The refusal if ``path`` exists and belongs to neither root nor ``owner``, else None.

    Why: a mailbox home is ``<base>/<name>``; with a base such as /home, the home of mailbox
    alice is the login user alice's home, and giving it to the delivery user (mode 0700)
    takes it from her. Postfix's virtual(8) (virtual_minimum_uid) and Dovecot
    (first_valid_uid) refuse to act as a system user for the same reason. Root is let
    through: the module makes a directory as root and then chowns it, so root is what an
    interrupted earlier run leaves, as is a directory an administrator made for the role.
    The owner asked for is let through so a second run re-asserts mode and group. The link
    and the directory it names are both looked at: a mode change follows the link.
    """
    if owner is None:
        return None
    asked = uid_of(owner)
    for look in (os.lstat, os.stat):
        try:
            uid = look(path).st_uid
        except OSError:  # missing, or a dangling link (then "not a directory" names it)
            return None
        if uid not in (0, asked):
            allowed = f"{owner} (the owner asked for)" + (" or root" if asked != 0 else "")
            return (
                f"{path} belongs to {user_named(uid)}, not to {allowed}: foreign_owner=fail "
                f"refuses to give another user's directory to {owner}; move it away, or chown "
                f"it to {owner} if it is meant to be this one"
            )
    return None


class Directories:
    """Create each directory and set its attributes; collect what changed."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.changed_paths: list[str] = []
        self.diffs: list[dict[str, Any]] = []
        self.planned: set[str] = set()  # created in check mode (their children are new too)

    def run(self) -> None:
        """Check every entry first, then apply them in order."""
        items, problem = entries(self.module.params["paths"])
        if not problem and self.module.params["foreign_owner"] == "fail":
            problem = self.first_foreign(items)
        if problem:
            self.module.fail_json(msg=problem, changed=False, changed_paths=[])
        for entry in items:
            self.ensure(entry)
        result: dict[str, Any] = {
            "changed": bool(self.changed_paths),
            "changed_paths": self.changed_paths,
        }
        if self.module._diff:
            result["diff"] = self.diffs
        self.module.exit_json(**result)

    def first_foreign(self, items: list[dict[str, Any]]) -> str | None:
        """The first path of the set that belongs to another user (all checked before any
        change: a refused set leaves the host as it was, in check mode too)."""
        for entry in items:
            owner = (
                entry["owner"] if entry.get("owner") is not None else self.module.params["owner"]
            )
            problem = foreign_owner(os.path.normpath(entry["path"]), owner)
            if problem:
                return problem
        return None

    def fail(self, msg: str) -> None:
        """Fail naming what already changed."""
        self.module.fail_json(
            msg=msg, changed=bool(self.changed_paths), changed_paths=self.changed_paths
        )

    def ensure(self, entry: dict[str, Any]) -> None:
        """One directory: create when missing, then owner/group/mode as asked."""
        path = os.path.normpath(entry["path"])
        params = {**self.module.params, "path": path}
        for key in ("owner", "group", "mode"):
            if entry.get(key) is not None:
                params[key] = entry[key]
        args = self.module.load_file_common_arguments(params, path=path)
        if os.path.lexists(path) and not os.path.isdir(path):
            self.fail(f"{path} exists and is not a directory")
        diff: dict[str, Any] = {"before": {"path": path}, "after": {"path": path}}
        if os.path.lexists(path):
            if self.module.set_fs_attributes_if_different(args, False, diff=diff):
                self.record(path, diff)
            return
        if self.module.check_mode:
            self.plan(path)
            return
        for new in self.missing(path):  # as ansible.builtin.file: parents get the same attributes
            new_args = {**args, "path": new}
            self.create(new, closed=args.get("mode") is not None)
            new_diff: dict[str, Any] = {
                "before": {"path": new, "state": "absent"},
                "after": {"path": new, "state": "directory"},
            }
            self.module.set_fs_attributes_if_different(new_args, True, diff=new_diff)
            self.record(new, new_diff)

    def plan(self, path: str) -> None:
        """Check mode: record ``path`` and each missing parent the real run would make (the
        entry's owner/mode go to them too), outermost first, each once - a parent an earlier
        entry planned is not made twice."""
        for new in self.missing(path):
            if new not in self.planned:
                self.planned.add(new)
                diff = {"before": {"path": new, "state": "absent"}}
                self.record(new, {**diff, "after": {"path": new, "state": "directory"}})

    @staticmethod
    def missing(path: str) -> list[str]:
        """``path`` and its missing ancestors, outermost first."""
        out = []
        while not os.path.lexists(path):
            out.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        return out[::-1]

    def create(self, path: str, *, closed: bool) -> None:
        """mkdir; ``closed``: 0700 until the asked mode is set, else the umask's default."""
        try:
            os.mkdir(path, 0o700 if closed else 0o777)
        except OSError as exc:
            self.fail(f"cannot create {path}: {exc.strerror}")

    def record(self, path: str, diff: dict[str, Any]) -> None:
        """Note a changed path and its diff."""
        self.changed_paths.append(path)
        diff["before_header"] = diff["after_header"] = path
        self.diffs.append(diff)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "paths": {"type": "list", "elements": "raw", "required": True},
            "foreign_owner": {"type": "str", "choices": ["change", "fail"], "default": "change"},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    Directories(module).run()


if __name__ == "__main__":
    main()
