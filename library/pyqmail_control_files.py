#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_control_files
short_description: Write or remove a set of small files in one directory in one call
description:
  - Writes each file of O(files) with its content into O(path), or removes it
    (O(files[].state=absent)); files not listed are left alone.
  - One module run for a whole set of qmail control files, instead of one
    C(ansible.builtin.copy) or C(ansible.builtin.template) per file - each of those is a
    round trip to the host. Render templates on the controller with
    C(lookup('ansible.builtin.template', ...)) and pass the text.
  - A file is rewritten only when its content differs (atomically, through the collection's
    file writer, with the final mode and owner before the rename); owner, group and mode are
    corrected in place otherwise. RV(changed_files) names what changed, so one task can
    notify the handlers of a whole group of files.
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    details: Nothing is written or removed; RV(changed_files) lists what would change.
  diff_mode:
    support: full
    details: Before/after of each changed file's content (with O(secret), only that it
      changed), and of its owner, group and mode.
  platform:
    platforms: posix
options:
  path:
    description:
      - The directory holding the files, such as C(/var/qmail/control). It must exist
        (except in check mode, where a missing directory means every present file would be
        created).
    type: path
    required: true
  files:
    description: The files to write or remove. Names are unique (across O(values) too).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: File name inside O(path); not empty, not C(.) or C(..), without C(/),
          whitespace or control characters (NUL and line breaks too).
        type: str
        required: true
      content:
        description: The file's whole content (no newline is added). Required when
          O(files[].state=present).
        type: str
      state:
        description: V(present) writes the file, V(absent) removes it when it exists.
        type: str
        choices: [present, absent]
        default: present
  values:
    description:
      - One-value files, such as the role's C(pyqmail_control__extra) - a file name (as
        O(files[].name)) and its value, a string or an integer. The file holds the value as
        text, stripped, and a newline; V(null) removes the file. Anything else (a list, a
        dict, a boolean, a float) fails the task, naming the file. Applied after O(files).
    type: dict
    default: {}
  secret:
    description:
      - The files hold secrets (relay passwords, private keys). Each is created 0600 and only
        then given its owner, group and mode (no other account can open it at any moment,
        whatever O(mode) says), and the diff says that the content changed without showing
        it. Use it, never C(ansible.builtin.copy) or C(ansible.builtin.template), for a file
        others must not read - those create a new file 0666 less the umask and set its mode
        only after, long enough for a local user to open it and keep the handle.
      - The contents (and O(values)) are also masked in the result's C(invocation), as a
        C(no_log) option's would be. Still set C(no_log) on the task - only that keeps the
        arguments out of the host's journal and the controller's output.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Write the control files read by the listeners
  pyqmail.mail.pyqmail_control_files:
    path: /var/qmail/control
    owner: root
    group: root
    mode: "0644"
    files:
      - name: databytes
        content: "10485760\n"
      - name: rcpthosts
        content: "{{ lookup('ansible.builtin.template', 'var/qmail/control/rcpthosts.j2') }}"
      - name: tlsclients
        state: absent
  notify: pyqmail reload listeners

- name: The relay passwords, readable by pyqmail-send's user alone
  pyqmail.mail.pyqmail_control_files:
    path: /var/qmail/control
    owner: pyqmails
    group: root
    mode: "0400"
    secret: true
    files:
      - name: smtproutes-auth
        content: "{{ lookup('ansible.builtin.template', 'var/qmail/control/smtproutes-auth.j2') }}"
  no_log: true

- name: One-value files; null removes the file
  pyqmail.mail.pyqmail_control_files:
    path: /var/qmail/control
    owner: root
    group: root
    mode: "0644"
    values:
      queuelifetime: 604800
      bouncefrom: null
  register: extra
"""

RETURN = r"""
changed_files:
  description: Names of the files written, corrected or removed (in check mode - that would
    be), in the order of O(files).
  returned: always
  type: list
  elements: str
  sample: [databytes, tlsclients]
"""

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_controlfiles import (
    name_problem,
    value_problem,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import (
    ensure_file,
    read_if_exists,
)


def value_files(values: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """``values`` as ``files`` entries (the value as text, stripped, plus a newline), or the
    first value that is no string, integer or null (``value_problem``, the preflight's rule)."""
    out: list[dict[str, Any]] = []
    for name, value in values.items():
        problem = value_problem(value)
        if problem:
            return out, f"values: {str(name)!r} {problem}"
        state = "absent" if value is None else "present"
        content = None if value is None else f"{str(value).strip()}\n"
        out.append({"name": str(name), "state": state, "content": content})
    return out, None


def check_files(files: list[dict[str, Any]]) -> str | None:
    """Why ``files`` cannot be applied (first problem, naming the entry), or None."""
    seen: set[str] = set()
    for index, item in enumerate(files):
        name = item["name"]
        where = f"file {name!r} (entry {index + 1})"
        problem = name_problem(name)
        if problem:
            return f"{where}: {problem}"
        if name in seen:
            return f"{where}: listed twice; give each file once"
        seen.add(name)
        if item["state"] == "present" and item["content"] is None:
            return f"{where}: content is required when state is present"
    return None


class ControlFiles:
    """Apply each listed file; collect the names and diffs of what changed."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.path: str = module.params["path"]
        self.changed_files: list[str] = []
        self.diffs: list[dict[str, Any]] = []

    def fail(self, msg: str) -> None:
        """Fail naming what already changed (a partial run is visible)."""
        self.module.fail_json(
            msg=msg, changed=bool(self.changed_files), changed_files=self.changed_files
        )

    def run(self) -> None:
        """Check every entry first, then apply them in order."""
        values, problem = value_files(self.module.params["values"])
        files = self.module.params["files"] + values
        problem = problem or check_files(files)
        if problem:
            self.fail(problem)
        missing_dir = not os.path.isdir(self.path)
        if missing_dir and not self.module.check_mode:
            self.fail(
                f"path {self.path} is not a directory; create it first "
                "(ansible.builtin.file with state: directory)"
            )
        for item in files:
            target = os.path.join(self.path, item["name"])
            if item["state"] == "absent":
                self.remove(item["name"], target)
            elif missing_dir:  # check mode on a fresh host: an earlier task makes the directory
                self.changed_files.append(item["name"])
            else:
                self.write(item["name"], target, item["content"].encode())
        result: dict[str, Any] = {
            "changed": bool(self.changed_files),
            "changed_files": self.changed_files,
        }
        if self.module._diff:
            result["diff"] = self.diffs
        self.module.exit_json(**result)

    def remove(self, name: str, target: str) -> None:
        """Remove ``target`` when it exists (a directory there is an error, not removed)."""
        if not os.path.lexists(target):
            return
        if os.path.isdir(target) and not os.path.islink(target):
            self.fail(f"{target} is a directory; state absent removes files only")
        self.changed_files.append(name)
        self.diffs.append(
            {
                "before_header": target,
                "after_header": "(absent)",
                "before": f"{name}: present\n",
                "after": f"{name}: absent\n",
            }
        )
        if not self.module.check_mode:
            try:
                os.unlink(target)
            except OSError as exc:
                self.fail(f"cannot remove {target}: {exc.strerror}")

    def write(self, name: str, target: str, content: bytes) -> None:
        """Write ``content`` when it differs; fix owner/group/mode otherwise."""
        try:
            existing = read_if_exists(target)
        except OSError as exc:
            self.fail(f"cannot read {target}: {exc.strerror}")
            return
        attr_diff: dict[str, Any] = {"before": {}, "after": {}}
        secret = self.module.params["secret"]
        changed, _backup = ensure_file(
            self.module,
            target,
            content,
            self.module.params["mode"],
            secret=secret,
            existing=existing,
            diff=attr_diff,
        )
        if not changed:
            return
        self.changed_files.append(name)
        if existing != content:
            before = "" if existing is None else existing.decode(errors="replace")
            after = content.decode(errors="replace")
            if secret:  # a diff is printed by --diff even where no_log hides the result
                before = "" if existing is None else f"{name}: (secret content)\n"
                after = f"{name}: (secret content, changed)\n"
            self.diffs.append(
                {
                    "before": before,
                    "after": after,
                    "before_header": target if existing is not None else "(absent)",
                    "after_header": target,
                }
            )
        if existing is not None and (attr_diff["before"] or attr_diff["after"]):
            attr_diff["before_header"] = attr_diff["after_header"] = f"{target} (attributes)"
            self.diffs.append(attr_diff)


def mask_secrets(module: AnsibleModule) -> None:
    """With O(secret), hide every content (and value) in the result's ``invocation``, as
    ``no_log`` would; ``files[].content`` cannot be ``no_log`` itself, as most files are not
    secret. Empty or blank contents are skipped: masking them would star every string."""
    if not module.params["secret"]:
        return
    contents = [item["content"] for item in module.params["files"]]
    for value in module.params["values"].values():
        if value is not None:
            contents += [str(value), f"{str(value).strip()}\n"]
    module.no_log_values.update(text for text in contents if text and text.strip())


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "values": {"type": "dict", "default": {}},
            "secret": {"type": "bool", "default": False},
            "files": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {
                    "name": {"type": "str", "required": True},
                    "content": {"type": "str"},
                    "state": {
                        "type": "str",
                        "choices": ["present", "absent"],
                        "default": "present",
                    },
                },
            },
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    mask_secrets(module)
    ControlFiles(module).run()


if __name__ == "__main__":
    main()
