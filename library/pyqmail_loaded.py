#!/usr/bin/python
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pyqmail_loaded
short_description: Note what each supervised pyqmail daemon loaded, and find the reloads due
description:
  - A reload is a signal sent by a handler at the end of the play that changed a file. A run
    that ended before its handlers (Ctrl-C, a lost connection), or whose reload the daemon's
    C(--check) refused until the file was mended by hand, leaves the daemons on the old files,
    and the next run finds nothing to change. This module keeps, per linked service, a note of
    what it loaded (C(loaded) in its supervise directory, reached through its link in
    O(service_dir)), so that any later run can tell.
  - The note is one line per kind of file the service loads, each a SHA-256 over the paths,
    ctimes and sizes of those files (a symlink counts with its target). ctimes, not mtimes -
    C(cp -p), C(touch -r) and restores keep an old mtime, nobody can set a ctime - and
    compared for equality, so a clock stepped back changes nothing twice.
  - What each daemon loads - a listener (a link named C(qmail-smtpd*)) the files under
    C(control/) that O(routes) gives to C(smtpd), and the relay rules cdbs (C(<rules_path>.cdb),
    C(<rules_path>-<kind>.cdb)); pyqmail-send (C(qmail-send)) the files under C(control/) that
    O(routes) gives to C(send); Dovecot (O(dovecot_service)) O(dovecot_config) and
    C(control/servercert.pem). So a reload of one daemon after a change to a file only it reads
    leaves the other's note as it was. A removed or added file counts (its path is in the
    digest); directories count only through the files beneath them.
  - O(state=due) changes nothing and returns the services whose note differs from their files,
    or that have none (set up before the notes, or linked just now), and the handlers that
    reload them. O(state=noted) writes the note of each linked service of O(daemons), as the
    files are now - the reload handlers call it right after their signal.
author:
  - pyqmail maintainers (@pyqmail)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: O(state=noted) reports the notes it would write and writes none.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  root:
    description: The qmail root (C(control/) beneath it).
    type: path
    default: /var/qmail
  service_dir:
    description: The directory svscan watches; the services are the links in it.
    type: path
    default: /etc/service
  rules_path:
    description:
      - The relay rules' path without C(.cdb), as P(pyqmail.mail.pyqmail_tcprules#module) compiles
        them.
    type: path
    default: /etc/tcp/smtp
  dovecot_service:
    description: The name of Dovecot's link in O(service_dir).
    type: str
    default: dovecot
  dovecot_config:
    description: The configuration Dovecot runs with.
    type: path
    default: /etc/dovecot/pyqmail.conf
  routes:
    description:
      - Which daemons read each control file - C(smtpd) (the listeners), C(send) - by the first
        name of its path under C(control/) (C(tlshosts) for C(control/tlshosts/mx.example.pem)),
        as the role C(pyqmail)'s C(pyqmail__loaded_routes). A name not in it counts for both.
    type: dict
    default: {}
  daemons:
    description: Which linked services to look at - V(listeners), V(send), V(dovecot).
    type: list
    elements: str
    choices: [listeners, send, dovecot]
    default: [listeners, send, dovecot]
  state:
    description:
      - V(due) - compare each service's note with its files; change nothing.
      - V(noted) - write each service's note as its files are now.
    type: str
    choices: [due, noted]
    default: due
"""

EXAMPLES = r"""
- name: Find the reloads a run never got to
  pyqmail.mail.pyqmail_loaded:
    state: due
  register: loaded

- name: Reload them
  ansible.builtin.debug:
    msg: "due: {{ loaded.due | join(', ') }}"
  changed_when: true
  when: loaded.due | length > 0
  notify: "{{ loaded.handlers }}"

- name: Note what the listeners loaded (a handler, right after svc -h)
  pyqmail.mail.pyqmail_loaded:
    daemons: [listeners]
    state: noted
"""

RETURN = r"""
due:
  description: With O(state=due), the linked services whose note differs from their files or
    that have none; with O(state=noted), the services whose note was (in check mode - would
    be) written. Sorted.
  returned: always
  type: list
  elements: str
  sample: [qmail-send, qmail-smtpd]
handlers:
  description: The reload handlers of the services in RV(due) (C(pyqmail reload listeners),
    C(pyqmail reload send), C(pyqmail reload dovecot)), in that order.
  returned: always
  type: list
  elements: str
"""

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_files import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    read_if_exists,
    write_file,
)

NOTE = "loaded"
HANDLERS = {
    "listeners": "pyqmail reload listeners",
    "send": "pyqmail reload send",
    "dovecot": "pyqmail reload dovecot",
}
# What each daemon loads, by kind of file (the note has one line per kind).
LOADS = {"listeners": ("control", "rules"), "send": ("sendcontrol",), "dovecot": ("dovecot",)}


def entry_line(path: str) -> str:
    """``path``'s line: its own ctime and size, and its target's when it is a link (a
    certificate linked from elsewhere is renewed there). A missing path has a line too."""
    parts = [path]
    for look in (os.lstat, os.stat):
        try:
            found = look(path)
        except OSError:
            parts.append("-")
        else:
            parts.append(f"{found.st_ctime_ns}:{found.st_size}")
    return " ".join(parts)


def walk(top: str) -> Iterator[str]:
    """Every path beneath ``top`` but its directories, links not followed (a linked directory
    counts as its link and target, as ``entry_line`` sees them). No directory's own ctime:
    it changes with every rename in it, including those of files another daemon reads; an
    added or removed file changes the list of paths instead."""
    for directory, dirs, files in os.walk(top):
        linked_dirs = [name for name in dirs if os.path.islink(os.path.join(directory, name))]
        for name in files + linked_dirs:
            yield os.path.join(directory, name)


def readers(path: str, control: str, routes: Mapping[str, Any]) -> set[str]:
    """The daemons (``smtpd``, ``send``) that read ``path`` under ``control``: its first name's
    route, or both for a name without one."""
    first = os.path.relpath(path, control).split(os.sep, 1)[0]
    route = routes.get(first)
    return set(route) if isinstance(route, list) else {"smtpd", "send"}


def rules_cdbs(rules_path: str) -> list[str]:
    """The rules cdbs a listener may load: ``<rules_path>.cdb`` and each listener's own."""
    directory, base = os.path.split(rules_path)
    wanted = re.compile(re.escape(base) + r"(-(smtp|smtps|submission))?[.]cdb\Z")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [os.path.join(directory, name) for name in names if wanted.match(name)]


def digest(paths: Iterable[str]) -> str:
    """The SHA-256 of the sorted lines of ``paths``."""
    lines = sorted(entry_line(path) for path in paths)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def stamps(params: dict[str, Any]) -> dict[str, str]:
    """Each kind of file's digest as the files are now (``control`` of the files the listeners
    read, ``sendcontrol`` of those pyqmail-send reads)."""
    root = str(params["root"])
    control = os.path.join(root, "control")
    read: dict[str, list[str]] = {"smtpd": [], "send": []}
    for path in walk(control):
        for daemon in readers(path, control, params["routes"]) & set(read):
            read[daemon].append(path)
    return {
        "control": digest(read["smtpd"]),
        "sendcontrol": digest(read["send"]),
        "rules": digest(rules_cdbs(str(params["rules_path"]))),
        "dovecot": digest(
            [str(params["dovecot_config"]), os.path.join(root, "control", "servercert.pem")]
        ),
    }


def linked(params: dict[str, Any]) -> dict[str, str]:
    """Service name -> daemon, for the links in the service directory of ``daemons``."""
    service_dir = str(params["service_dir"])
    wanted = set(params["daemons"])
    try:
        names = sorted(os.listdir(service_dir))
    except FileNotFoundError:
        return {}
    found: dict[str, str] = {}
    for name in names:
        if not os.path.islink(os.path.join(service_dir, name)):
            continue
        if name == params["dovecot_service"]:
            daemon = "dovecot"
        elif name == "qmail-send":
            daemon = "send"
        elif name.startswith("qmail-smtpd"):
            daemon = "listeners"
        else:
            continue
        if daemon in wanted:
            found[name] = daemon
    return found


def routes_problem(routes: Mapping[str, Any]) -> str | None:
    """What makes ``routes`` no table of control file names to daemons, naming the entry."""
    for name, route in routes.items():
        if not isinstance(route, list) or not set(route) <= {"smtpd", "send"}:
            return f"routes.{name} is {route!r}: give a list of smtpd and send"
    return None


def note_of(daemon: str, now: dict[str, str]) -> str:
    """The note a service of ``daemon`` gets once it loaded the files as they are ``now``."""
    return "".join(f"{kind} {now[kind]}\n" for kind in LOADS[daemon])


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "default": "/var/qmail"},
            "service_dir": {"type": "path", "default": "/etc/service"},
            "rules_path": {"type": "path", "default": "/etc/tcp/smtp"},
            "dovecot_service": {"type": "str", "default": "dovecot"},
            "dovecot_config": {"type": "path", "default": "/etc/dovecot/pyqmail.conf"},
            "routes": {"type": "dict", "default": {}},
            "daemons": {
                "type": "list",
                "elements": "str",
                "choices": list(HANDLERS),
                "default": list(HANDLERS),
            },
            "state": {"type": "str", "choices": ["due", "noted"], "default": "due"},
        },
        supports_check_mode=True,
    )
    params = module.params
    problem = routes_problem(params["routes"])
    if problem:
        module.fail_json(msg=problem)
    services = linked(params)
    now = stamps(params)
    differ: list[str] = []
    for name, daemon in services.items():
        note = os.path.join(params["service_dir"], name, NOTE)
        wanted = note_of(daemon, now)
        try:
            current = read_if_exists(note)
        except OSError as exc:
            module.fail_json(msg=f"cannot read {note}: {exc.strerror}")
        if current == wanted.encode():
            continue
        differ.append(name)
        if params["state"] == "noted" and not module.check_mode:
            try:
                write_file(note, wanted.encode(), 0o600)
            except OSError as exc:
                module.fail_json(msg=f"cannot write {note}: {exc.strerror}", due=differ)
    handlers = [HANDLERS[d] for d in HANDLERS if d in {services[name] for name in differ}]
    noted = params["state"] == "noted"
    module.exit_json(changed=noted and bool(differ), due=differ, handlers=handlers)


if __name__ == "__main__":
    main()
