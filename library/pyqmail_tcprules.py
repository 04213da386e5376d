#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_tcprules
short_description: tcprules source file and its compiled cdb (selective relaying)
description:
  - Writes the tcprules source file (for example C(/etc/tcp/smtp)) from O(rules) given as
    data, with a header saying that it is managed, and compiles it to the cdb that
    C(tcpserver) and C(pyqmail-smtpd) read (C(/etc/tcp/smtp.cdb)), in pure Python.
    The compiled file is byte for byte what ucspi-tcp's C(tcprules) writes for the same
    source; the C(tcprules) binary is not needed on the host.
  - Every rule is checked before anything is written, and a bad one fails the task with its
    index and text - bad IPv4/IPv6 addresses or prefixes (C(1.2.3) without its dot,
    leading zeros), bad host names, bad variable names, quotes or control characters in
    values, unknown actions, two rules for the same address.
  - Idempotent. Both files are compared with what is asked and only a file that differs is
    rewritten - a cdb changed or damaged on disk is rewritten even when the source file is
    unchanged. Writes go to a temporary file in the same directory that has the final owner,
    group and mode before its first byte, renamed into place (readers never see a partial
    file); a change of owner, group or mode alone reports C(changed).
  - pyqmail-smtpd re-reads the cdb on C(SIGHUP) (tcpserver on each connection).
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    details: Reports what would change; writes nothing.
  diff_mode:
    support: full
    details: The source file before and after (the cdb is binary and follows the source),
      plus owner/group/mode changes.
  platform:
    platforms: posix
options:
  path:
    description:
      - The tcprules source file to write. Its directory must exist (in check mode a
        missing directory is reported as a change - both files would be created - so
        C(--check) works on a host an earlier task has not prepared yet).
    type: path
    default: /etc/tcp/smtp
  cdb:
    description:
      - The compiled rules file. Default O(path) with C(.cdb) appended. Its directory must
        exist.
    type: path
  rules:
    description:
      - The rules, in order (the order only matters for the file layout - C(tcpserver) picks
        the most specific address, see C(man tcprules)).
      - An empty list writes a file with no rules, so every client is allowed with no
        extra environment.
    type: list
    elements: dict
    required: true
    suboptions:
      address:
        description:
          - C(1.2.3.4) (one IPv4 address), C(127.) or C(10.1.) (a prefix, ending in a dot),
            C(192.168.1.10-20) or C(10.2-3.) (a range), C(=mx.example.com) (a host name as
            reverse DNS gives it), C(=.example.com) (a domain), C(=) (any host with a name),
            C(joe@1.2.3.4) or C(joe@=host) (ident user), C("") (the default rule).
          - IPv6 as C(tcpserver) from ucspi-tcp-ipv6 writes it, for example C(::1) or the
            prefix C(2001:db8:) (lower case, no leading zeros, C(::) for the longest run of
            zero groups).
          - A string; quote it in YAML - C(10.) unquoted is the number 10.0 and is refused.
        type: raw
        required: true
      action:
        description:
          - V(allow) or V(deny) the connection.
        type: str
        required: true
        choices: [allow, deny]
      env:
        description:
          - Environment variables set for clients matching this rule, for example
            C(RELAYCLIENT) set to an empty string (may relay), C(SMTPAUTH), C(FORCETLS), C(BARELF),
            C(DATABYTES), C(MAXRCPT) (see pyqmail-smtpd). Names are letters, digits and
            C(_); values are strings or integers without double quotes or control
            characters. The order is kept.
        type: dict
        default: {}
  backup:
    description:
      - Keep a timestamped copy of each file before overwriting it.
    type: bool
    default: false
notes:
  - The source file is what C(tcprules) reads, so C(tcprules /etc/tcp/smtp.cdb
    /etc/tcp/smtp.tmp < /etc/tcp/smtp) rebuilds the same cdb by hand (IPv6 rules need
    Debian's ucspi-tcp-ipv6 build of C(tcprules)).
seealso:
  - name: tcprules
    description: The ucspi-tcp rules compiler whose format this module writes.
    link: https://cr.yp.to/ucspi-tcp/tcprules.html
"""

EXAMPLES = r"""
- name: Relay for localhost and the office LAN; everyone else may only deliver here
  pyqmail.mail.pyqmail_tcprules:
    path: /etc/tcp/smtp
    owner: root
    group: root
    mode: "0644"
    rules:
      - address: "127."
        action: allow
        env:
          RELAYCLIENT: ""
      - address: "192.168.1."
        action: allow
        env:
          RELAYCLIENT: ""
          BARELF: "1"
      - address: "10.9.9.9"
        action: deny
      - address: ""
        action: allow
        env:
          SMTPAUTH: "0"
  notify: Reload pyqmail-smtpd
"""

RETURN = r"""
path:
  description: The source file.
  returned: always
  type: str
  sample: /etc/tcp/smtp
cdb:
  description: The compiled file.
  returned: always
  type: str
  sample: /etc/tcp/smtp.cdb
rules:
  description: Number of rules.
  returned: always
  type: int
  sample: 4
keys:
  description: Number of keys in the cdb (ranges expanded).
  returned: always
  type: int
  sample: 14
source_changed:
  description: Whether the source file's content was (or in check mode would be) rewritten.
  returned: always
  type: bool
cdb_changed:
  description: Whether the cdb's content was (or in check mode would be) rewritten.
  returned: always
  type: bool
would_create_directory:
  description: Check mode only - the directory of O(path) or O(cdb) does not exist yet (an
    earlier task would create it); both files are then reported as created.
  returned: always
  type: bool
backup_file:
  description: Backup of the previous source file.
  returned: when O(backup=true) and the source file was rewritten
  type: str
cdb_backup_file:
  description: Backup of the previous cdb.
  returned: when O(backup=true) and the cdb was rewritten
  type: str
"""

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import (
    ensure_file,
    read_if_exists,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_rules import (
    Rule,
    RulesError,
    check_duplicates,
    compile_rules,
    format_source,
    make_rule,
)

HEADER = """\
Managed by Ansible (pyqmail_tcprules): local changes will be overwritten.
tcprules(1) source, compiled to {cdb}; to rebuild by hand:
  tcprules {cdb} {cdb}.tmp < {path}
"""


def rules_from_params(items: list[dict[str, Any]]) -> list[Rule]:
    """Validate the ``rules`` option into Rule objects; RulesError names the bad one."""
    rules = []
    for index, item in enumerate(items):
        where = f"rules[{index}]"
        env: list[tuple[str, str]] = []
        for name, value in (item.get("env") or {}).items():
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                shown = "null" if value is None else repr(value)
                raise RulesError(
                    f"{where} (address {item['address']!r}): env {name} is {shown}; "
                    f'give a string, for example {name}: "" or {name}: "1"'
                )
            env.append((name, str(value)))
        rules.append(make_rule(item["address"], item["action"], env, where))
    check_duplicates(rules)
    return rules


class TcpRules:
    """Compare the asked rules with both files; write only what differs."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.path: str = module.params["path"]
        self.cdb: str = module.params["cdb"] or self.path + ".cdb"
        self.result: dict[str, Any] = {
            "changed": False,
            "path": self.path,
            "cdb": self.cdb,
            "source_changed": False,
            "cdb_changed": False,
            "would_create_directory": False,
        }
        self.diffs: list[dict[str, Any]] = []

    def fail(self, msg: str) -> None:
        self.module.fail_json(msg=msg, **self.result)

    def run(self) -> None:
        try:
            rules = rules_from_params(self.module.params["rules"])
        except RulesError as exc:
            self.fail(f"bad rule: {exc}")
            return
        source = format_source(rules, HEADER.format(path=self.path, cdb=self.cdb)).encode()
        compiled = compile_rules(rules)
        self.result["rules"] = len(rules)
        self.result["keys"] = sum(len(rule.cdb_keys()) for rule in rules)
        for path in (self.path, self.cdb):
            directory = os.path.dirname(os.path.abspath(path))
            if os.path.isdir(directory):
                continue
            if self.module.check_mode:
                # On a fresh host an earlier task (skipped by --check) would create it: both
                # files would be created, so say so instead of failing.
                self.result["would_create_directory"] = True
                continue
            self.fail(
                f"the directory of {path} does not exist; create {directory} first "
                "(ansible.builtin.file with state: directory)"
            )
        self.ensure(self.path, source, "source_changed", "backup_file", text=True)
        self.ensure(self.cdb, compiled, "cdb_changed", "cdb_backup_file", text=False)
        if self.module._diff:
            self.result["diff"] = self.diffs
        self.module.exit_json(**self.result)

    def ensure(self, path: str, content: bytes, flag: str, backup_key: str, *, text: bool) -> None:
        try:
            existing = read_if_exists(path)
        except OSError as exc:
            self.fail(f"cannot read {path}: {exc.strerror}")
            return
        if existing != content:
            self.result[flag] = True
            if text:
                self.diffs.append(
                    {
                        "before": "" if existing is None else existing.decode(errors="replace"),
                        "after": content.decode(),
                        "before_header": path if existing is not None else "(absent)",
                        "after_header": path,
                    }
                )
        attr_diff: dict[str, Any] = {"before": {}, "after": {}}
        changed, backup_file = ensure_file(
            self.module,
            path,
            content,
            self.module.params["mode"],
            backup=self.module.params["backup"],
            existing=existing,
            diff=attr_diff,
        )
        if backup_file is not None:
            self.result[backup_key] = backup_file
        if changed:
            self.result["changed"] = True
        # A new file's attributes are part of its creation, not a change of its own.
        if existing is not None and (attr_diff["before"] or attr_diff["after"]):
            attr_diff["before_header"] = attr_diff["after_header"] = f"{path} (attributes)"
            self.diffs.append(attr_diff)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/etc/tcp/smtp"},
            "cdb": {"type": "path"},
            "rules": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "address": {"type": "raw", "required": True},
                    "action": {"type": "str", "required": True, "choices": ["allow", "deny"]},
                    "env": {"type": "dict", "default": {}},
                },
            },
            "backup": {"type": "bool", "default": False},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    for index, item in enumerate(module.params["rules"]):
        if not isinstance(item["address"], str):
            module.fail_json(
                msg=f"bad rule: rules[{index}]: address {item['address']!r} is not a string; "
                "quote it in YAML (10. unquoted is the number 10.0)"
            )
    TcpRules(module).run()


if __name__ == "__main__":
    main()
