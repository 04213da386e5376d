#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_smtp_user
short_description: Manage an SMTP AUTH user of pyqmail-smtpd
description:
  - Adds, updates or removes one user in pyqmail's SMTP AUTH database
    (C(/var/qmail/control/smtpusers), the format of C(pyqmail-users); one C(NAME:HASH) line
    per user with a salted scrypt hash in passlib's C($scrypt$ln=14,r=8,p=1$...) form).
  - Idempotent without re-hashing - when the stored hash already matches O(password), the
    line is left alone and the task reports no change (a new salt every run would report a
    change every run). A hash made with older cost parameters is upgraded once.
  - The command line tool C(pyqmail-users) (add, del, list, check) edits the same file.
  - Comments, blank lines and other users in the file are kept as they are, unless O(keep)
    lists the only users the file may hold. A malformed
    file is refused with its file name and line number; nothing is written then.
  - Writes go to a temporary file in the same directory that has the final owner/group/mode
    before its first byte, then an atomic rename. A change of owner, group or mode alone reports
    C(changed).
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: User names only (with a C(cram-md5) marker and C(new password) when a password
      changes); never a password or hash.
  platform:
    platforms: posix
options:
  path:
    description: The user database file.
    type: path
    default: /var/qmail/control/smtpusers
  name:
    description:
      - User name, usually an email address. 1-255 characters, no C(:), whitespace or
        control characters, not starting with C(#).
      - Required unless O(keep) is given.
    type: str
  keep:
    description:
      - The only user names the file may hold; every other user is removed (comments and
        blank lines stay). For a role that owns the file - a user taken out of its list, or
        renamed, or left without a password, would otherwise keep its line and so its
        password, and go on passing SMTP AUTH (and relaying).
      - Mutually exclusive with O(name); the other user options are then not used. A missing
        file is not created.
    type: list
    elements: str
  password:
    description:
      - The password (not logged). Required with O(state=present). Must not be empty or
        contain NUL, CR or LF (SMTP AUTH PLAIN cannot carry them).
    type: str
  cram_md5:
    description:
      - Also store a CRAM-MD5 secret for this user. CRAM-MD5 needs the password itself on
        the server, so the file then holds a password-equivalent secret; leave this off
        unless a client cannot do PLAIN or LOGIN over TLS.
    type: bool
    default: false
  state:
    description: Whether the user should exist.
    type: str
    choices: [present, absent]
    default: present
  update_password:
    description:
      - V(always) sets O(password) when it differs from the stored one; V(on_create) sets it
        only for a new user and never touches an existing user's password (its CRAM-MD5
        secret can still be removed, or added when O(password) matches the stored hash).
    type: str
    choices: [always, on_create]
    default: always
  record_kicks:
    description:
      - Before a change that replaces an existing user's hash or removes users, add their
        names to C(PATH.kick) (created root's, V(0600); changed under a lock of
        C(PATH.kick.lock)) - the logins whose open IMAP/POP3 sessions must still end.
        C(pyqmail-users kick) ends them and removes from the file those Dovecot confirmed;
        recorded first, they are ended even when the play dies or fails between this task and
        the kick.
      - For a host whose Dovecot logs in through this file (the role pyqmail_mailboxes sets it
        where Dovecot's configuration exists). Nothing is recorded in check mode.
    type: bool
    default: false
  owner:
    description: Owner of the file (name or number); it must exist.
    type: str
    default: root
  group:
    description:
      - Group of the file (name or number); it must exist. The group of the password
        verifiers, so that C(pyqmail-smtpd) can read the file after dropping root and the
        delivery user (not in that group) cannot.
    type: str
    default: pyqmaila
  mode:
    description: Octal mode of the file, such as V('0640').
    type: raw
    default: '0640'
"""

EXAMPLES = r"""
- name: A submission user
  pyqmail.mail.pyqmail_smtp_user:
    name: alice@example.org
    password: "{{ vault_alice_password }}"

- name: Set the initial password only; the user changes it later with pyqmail-users
  pyqmail.mail.pyqmail_smtp_user:
    name: bob@example.org
    password: "{{ initial_password }}"
    update_password: on_create

- name: An old client that only speaks CRAM-MD5 (stores a password-equivalent secret)
  pyqmail.mail.pyqmail_smtp_user:
    name: printer@example.org
    password: "{{ vault_printer_password }}"
    cram_md5: true

- name: Remove a user
  pyqmail.mail.pyqmail_smtp_user:
    name: carol@example.org
    state: absent

- name: Remove every user but these two (the inventory owns the file)
  pyqmail.mail.pyqmail_smtp_user:
    keep: [alice@example.org, bob@example.org]
"""

RETURN = r"""
name:
  description: The user name.
  returned: always
  type: str
  sample: alice@example.org
path:
  description: The user database file.
  returned: always
  type: str
  sample: /var/qmail/control/smtpusers
existed:
  description: Whether the user was in the file before the task.
  returned: always
  type: bool
password_changed:
  description: Whether a new hash was (or in check mode would be) written for the user.
  returned: always
  type: bool
cram_md5:
  description: Whether the user has a CRAM-MD5 secret after the task.
  returned: always
  type: bool
removed:
  description: The users removed because O(keep) does not list them (names only).
  returned: always
  type: list
  elements: str
users:
  description: Number of users in the file after the task.
  returned: always
  type: int
"""

import contextlib
import grp
import os
import pwd
import re
import stat
import traceback
from typing import NoReturn

from ansible.module_utils.basic import AnsibleModule

try:
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_authdb import (
        AuthDB,
        AuthDBError,
        User,
        add_kicks,
        change_locked,
        hash_password,
        kicks_path,
        needs_rehash,
        validate_name,
        validate_password,
        verify_password,
    )
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import write_file

    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


class SmtpUserModule:
    """Maps options, reads the file, decides the one user's line, writes the difference."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.path: str = self.params["path"]

    def fail(self, msg: str) -> NoReturn:
        self.module.fail_json(msg=msg, name=self.params["name"], path=self.path)
        raise AssertionError("fail_json returned")

    def check_arguments(self) -> tuple[int, int, int]:
        p = self.params
        if p["keep"] is None:
            try:
                validate_name(p["name"])
            except AuthDBError as exc:
                self.fail(f"option name: {exc}")
        if p["state"] == "present" and p["keep"] is None:
            if p["password"] is None:  # not required_if: keep needs no password
                self.fail("state is present but all of the following are missing: password")
            try:
                validate_password(p["password"])
            except AuthDBError as exc:
                self.fail(f"option password: {exc}")
        return self.resolve_owner(p["owner"]), self.resolve_group(p["group"]), self.mode()

    def resolve_owner(self, owner: str) -> int:
        if owner.isdigit():
            return int(owner)
        try:
            return pwd.getpwnam(owner).pw_uid
        except KeyError:
            self.fail(f"owner {owner!r} does not exist on this host; create it first or set owner")

    def resolve_group(self, group: str) -> int:
        if group.isdigit():
            return int(group)
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            self.fail(
                f"group {group!r} does not exist on this host; create it first "
                "(ansible.builtin.group) or set group"
            )

    def mode(self) -> int:
        mode = self.params["mode"]
        if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3,4}", mode):
            return int(mode, 8)
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            self.fail(f"mode must be an octal string such as '0640', got {mode!r}")
        return mode

    def load(self) -> AuthDB | None:
        """The parsed file, or None when it does not exist yet."""
        if not os.path.lexists(self.path):
            return None
        try:
            return AuthDB.load(self.path)
        except AuthDBError as exc:
            self.fail(f"{exc}; fix the file by hand (or with pyqmail-users)")

    def decide(self, db: AuthDB) -> tuple[bool, str]:
        """Apply the asked state to ``db``; return (password_changed, note for the diff)."""
        p = self.params
        if p["keep"] is not None:
            keep = set(p["keep"])
            for user in list(db):
                if user.name not in keep:
                    db.remove(user.name)
            return False, ""
        name: str = p["name"]
        current = db.get(name)
        if p["state"] == "absent":
            db.remove(name)
            return False, ""
        password: str = p["password"]
        cram = password if p["cram_md5"] else None
        if current is None:
            db.set(User(name, hash_password(password), cram))
            return True, " (new password)"
        if p["update_password"] == "on_create":  # noqa: S105 - an option value, not a secret
            if cram is not None and current.cram is None:
                if not verify_password(password, current.hash):
                    self.fail(
                        f"cram_md5 for existing user {name!r} needs the stored password, "
                        "and the password given differs; update_password=on_create never "
                        "changes it: set update_password=always to replace it"
                    )
            elif cram is not None:
                cram = current.cram  # keep the secret that matches the stored password
            db.set(User(name, current.hash, cram))
            return False, ""
        if verify_password(password, current.hash) and not needs_rehash(current.hash):
            db.set(User(name, current.hash, cram))
            return False, ""
        db.set(User(name, hash_password(password), cram))
        return True, " (new password)"

    def record_kicks(self, stale: list[str]) -> None:
        """Before the write: the logins whose sessions the change makes stale, in PATH.kick
        (``record_kicks``), so that a play that dies before its kick still ends them."""
        if not (self.params["record_kicks"] and stale):
            return
        try:
            add_kicks(kicks_path(self.path), stale)
        except (OSError, AuthDBError) as exc:
            self.fail(f"cannot record the logins whose sessions must end: {exc}")

    def write(self, data: bytes, uid: int, gid: int, mode: int) -> None:
        """The shared writer: the temp file has the final owner/group/mode before any byte."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            self.fail(f"the directory {directory} of path does not exist; create it first")
        try:
            write_file(self.path, data, mode, uid, gid, secret=True)
        except OSError as exc:
            self.fail(f"cannot write {self.path}: {exc}")

    def attributes(self) -> dict[str, int]:
        """The owner/group/mode now on disk."""
        st = os.stat(self.path)
        return {"uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode)}

    def run(self) -> None:
        """The change under the file's change lock (``change_locked``, as pyqmail-users
        takes it): read, decide and write with no other writer in between, or a change made
        meanwhile (a user deleted by an admin) would be undone. Check mode writes nothing
        and takes no lock."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if self.module.check_mode or not os.path.isdir(directory):
            self.change()  # a missing directory fails in write() with its own message
            return
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(change_locked(self.path))
            except OSError as exc:
                self.fail(f"cannot lock {self.path}.lock: {exc}")
            self.change()

    def change(self) -> None:
        uid, gid, mode = self.check_arguments()
        p = self.params
        loaded = self.load()
        creating = loaded is None
        db = loaded if loaded is not None else AuthDB(path=self.path)
        before_text = db.dump()
        before = self.summary(db, "")
        existed = p["name"] in db
        names = [user.name for user in db]
        password_changed, note = self.decide(db)
        after_text = db.dump()
        content_changed = after_text != before_text or (
            creating and p["state"] == "present" and p["keep"] is None
        )
        wanted = {"uid": uid, "gid": gid, "mode": mode}
        now = None if creating else self.attributes()
        attrs_changed = now is not None and now != wanted
        changed = content_changed or attrs_changed
        stale = [name for name in names if name not in db]
        if password_changed and existed:
            stale.append(p["name"])
        if changed and not self.module.check_mode:
            if content_changed:
                self.record_kicks(stale)
                self.write(after_text.encode("utf-8"), uid, gid, mode)
            else:
                try:
                    os.chown(self.path, uid, gid)
                    os.chmod(self.path, mode)
                except OSError as exc:
                    self.fail(f"cannot set owner/group/mode of {self.path}: {exc}")
        result: dict[str, object] = {
            "changed": changed,
            "name": p["name"],
            "path": self.path,
            "existed": existed,
            "password_changed": password_changed,
            "cram_md5": db.cram_secret(p["name"]) is not None,
            "removed": [name for name in names if name not in db],
            "users": len(db),
        }
        if self.module._diff:
            after_exists = not (creating and not content_changed)
            result["diff"] = {
                "before_header": self.path,
                "after_header": self.path,
                "before": before + (self.attr_line(now) if now is not None else ""),
                "after": self.summary(db, note) + (self.attr_line(wanted) if after_exists else ""),
            }
        self.module.exit_json(**result)

    @staticmethod
    def attr_line(attrs: dict[str, int]) -> str:
        return f"# owner {attrs['uid']} group {attrs['gid']} mode {attrs['mode']:04o}\n"

    def summary(self, db: AuthDB, note: str) -> str:
        """User names only, one a line: the diff never shows a hash or a secret."""
        lines = []
        for user in db:
            mark = " (cram-md5)" if user.cram is not None else ""
            lines.append(user.name + mark + (note if user.name == self.params["name"] else ""))
        return "".join(line + "\n" for line in lines)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/var/qmail/control/smtpusers"},
            "name": {"type": "str"},
            "keep": {"type": "list", "elements": "str", "no_log": False},
            "password": {"type": "str", "no_log": True},
            "cram_md5": {"type": "bool", "default": False},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "update_password": {
                "type": "str",
                "choices": ["always", "on_create"],
                "default": "always",
                "no_log": False,  # a choice, not a secret: Ansible warned on every task
            },
            "owner": {"type": "str", "default": "root"},
            "group": {"type": "str", "default": "pyqmaila"},
            "mode": {"type": "raw", "default": "0640"},
            "record_kicks": {"type": "bool", "default": False},
        },
        required_one_of=[("name", "keep")],
        mutually_exclusive=[("name", "keep")],
        supports_check_mode=True,
    )
    if IMPORT_ERROR is not None:
        module.fail_json(msg="cannot import module_utils/pyqmail_authdb", exception=IMPORT_ERROR)
    SmtpUserModule(module).run()


if __name__ == "__main__":
    main()
