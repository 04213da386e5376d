"""No secret of the inventory reaches Ansible's output, nor a file others could open.

Secrets are the role options that meta/argument_specs.yml marks ``no_log: true`` (mailbox
passwords, smarthost passwords), whatever holds one of them (the results registered by a
task hidden with ``no_log``, a fact set from a secret) and files written with a restrictive
mode (keys, relay passwords).

Output: at ``-v`` the callback prints each task's facts (set_fact) and each loop item whole
(``loop_control.label`` only shortens the header line); a vaulted password is printed
decrypted. So every set_fact and every loop that reads a secret needs ``no_log: true``. The
static test follows secrets through set_fact, register and task ``vars``; one run of the
role pyqmail_mailboxes at ``-v`` checks the output for real.

Files: ``ansible.builtin.copy``/``template`` create a new file 0666 less the umask and set
its mode only after: a local user can open a key in that moment and keep the handle. A file
with a mode that keeps others out goes through the collection's own modules
(``pyqmail_control_files`` with ``secret: true``: created 0600 from the first byte).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles.playbook import REPO, ansible_playbook

ROLES = REPO / "roles"
LOOP_KEYS = ("loop", "with_items", "with_list", "with_dict", "with_nested", "with_subelements")
BLOCK_KEYS = ("block", "rescue", "always")
RESTRICTIVE = re.compile(r"0?[0-7][0-7][04]0")  # 0400 0440 0600 0640 ...: others read nothing
WRITERS = {"ansible.builtin.copy", "ansible.builtin.template"}
# Tasks that read a secret without printing it, each with why (checked to exist).
NOT_PRINTED = {
    # its vars keep box.home only; no_log would hide the module's own errors
    ("pyqmail_mailboxes", "Create the mailbox homes and Maildirs"),
    # its vars keep the logins of the boxes that have a password (only tested for presence)
    (
        "pyqmail_mailboxes",
        "Remove the SMTP AUTH users the list no longer declares (deleted, renamed, without a "
        "password)",
    ),
}
# Facts set from a secret holder that keep no secret, each with why (checked to exist): they
# are not secret holders, and the set_fact that makes them is not a reader.
NOT_SECRET_FACTS = {
    # users/logins' text: each login and its mailbox's name (logins.j2), never a password,
    # and the logins whose line of it changed
    ("pyqmail_mailboxes", "pyqmail_mailboxes__logins_map"),
    ("pyqmail_mailboxes", "pyqmail_mailboxes__moved"),
}
# Restrictive files written with copy/template, each with why (checked to exist): none now.
PLAIN_WRITE: set[tuple[str, str]] = set()


def task_files() -> Iterator[tuple[str, Path]]:
    """(role, file) of every task and handler file of every role."""
    for path in sorted(ROLES.glob("*/tasks/*.yml")) + sorted(ROLES.glob("*/handlers/*.yml")):
        yield path.parts[-3], path


def flatten(tasks: list[dict[str, Any]] | None) -> Iterator[dict[str, Any]]:
    """Every task, blocks opened (a block's no_log is handed down to its tasks)."""
    for task in tasks or []:
        if any(key in task for key in BLOCK_KEYS):
            for key in BLOCK_KEYS:
                for inner in flatten(task.get(key)):
                    inherited = {"no_log": task["no_log"]} if "no_log" in task else {}
                    yield {**inherited, **inner}
        else:
            yield task


def all_tasks() -> list[tuple[str, dict[str, Any]]]:
    return [
        (role, task)
        for role, path in task_files()
        for task in flatten(yaml.safe_load(path.read_text()))
    ]


def module_of(task: dict[str, Any]) -> str:
    """The task's action (the one key with a dot, or a short builtin name)."""
    for key in task:
        if "." in key:
            return key
    return next((f"ansible.builtin.{k}" for k in ("set_fact", "copy", "template") if k in task), "")


def spec_secrets() -> set[str]:
    """Role options holding a ``no_log: true`` value, at any depth of their suboptions."""

    def secret(option: dict[str, Any]) -> bool:
        subs = option.get("options") or {}
        return bool(option.get("no_log")) or any(secret(sub) for sub in subs.values())

    found: set[str] = set()
    for path in ROLES.glob("*/meta/argument_specs.yml"):
        for entry in yaml.safe_load(path.read_text())["argument_specs"].values():
            found |= {name for name, opt in (entry.get("options") or {}).items() if secret(opt)}
    return found


def mentions(value: Any, names: set[str]) -> bool:
    """Whether the text of ``value`` names one of ``names`` (as a whole word)."""
    text = json.dumps(value)
    return any(re.search(rf"(?<![\w.]){re.escape(name)}\b", text) for name in names)


def secrets_and_readers() -> tuple[set[str], list[tuple[str, dict[str, Any], str]]]:
    """Every secret-bearing variable, then each task that prints one: (role, task, how)."""
    names = spec_secrets()
    tasks = all_tasks()
    while True:  # until no new holder: facts set from a secret, results of hidden tasks
        more = set(names)
        for role, task in tasks:
            if task.get("no_log") and task.get("register"):
                more.add(task["register"])
            facts = task.get("ansible.builtin.set_fact") or {}
            more |= {
                name
                for name, value in facts.items()
                if mentions(value, names) and (role, name) not in NOT_SECRET_FACTS
            }
        if more == names:
            break
        names = more
    readers = []
    for role, task in tasks:
        local = {name for name, value in (task.get("vars") or {}).items() if mentions(value, names)}
        seen = names | local
        facts = {
            name: value
            for name, value in (task.get("ansible.builtin.set_fact") or {}).items()
            if (role, name) not in NOT_SECRET_FACTS
        }
        if mentions(facts, seen):
            readers.append((role, task, "sets a fact from"))
        elif any(mentions(task.get(key), seen) for key in LOOP_KEYS):
            readers.append((role, task, "loops over"))
        elif local and (role, task.get("name")) not in NOT_PRINTED:
            readers.append((role, task, "has vars from"))
    return names, readers


def test_the_secrets_are_known() -> None:
    """Guard the follow-through: the spec's secrets and what the roles derive from them."""
    names, _ = secrets_and_readers()
    assert {"pyqmail_mailboxes__list", "pyqmail_control__smtproutes"} <= spec_secrets()
    assert {"pyqmail_mailboxes__present", "pyqmail_certificates__issued"} <= names


def test_every_task_that_prints_a_secret_hides_its_result() -> None:
    _, readers = secrets_and_readers()
    shown = [
        f"{role}: {task.get('name')!r} {how} a secret"
        for role, task, how in readers
        if task.get("no_log") is not True
    ]
    assert not shown, "add no_log: true (Ansible prints facts and loop items at -v):\n" + (
        "\n".join(shown)
    )
    named = {(role, task.get("name")) for role, task in all_tasks()}
    assert named >= NOT_PRINTED, "an exception names a task that is gone"
    facts = {
        (role, name)
        for role, task in all_tasks()
        for name in task.get("ansible.builtin.set_fact") or {}
    }
    assert facts >= NOT_SECRET_FACTS, "an exception names a fact no task sets"


def test_restrictive_files_are_not_written_with_copy_or_template() -> None:
    plain = []
    for role, task in all_tasks():
        action = module_of(task)
        args = task.get(action) or {}
        if action not in WRITERS or not RESTRICTIVE.fullmatch(str(args.get("mode", ""))):
            continue
        if action == "ansible.builtin.copy" and args.get("content") == "":
            continue  # an empty marker file: nothing to read in it
        if (role, task.get("name")) not in PLAIN_WRITE:
            plain.append(f"{role}: {task.get('name')!r} ({action}, mode {args['mode']})")
    assert not plain, (
        "write these with pyqmail.mail.pyqmail_control_files and secret: true (copy/template "
        "leave a new file 0644 until the mode is set):\n" + "\n".join(plain)
    )
    named = {(role, task.get("name")) for role, task in all_tasks()}
    assert named >= PLAIN_WRITE, "an exception names a task that is gone"


PASSWORD = "Vaulted-Secret-8472"


@pytest.mark.parametrize("verbosity", ["-v", "-vvv"])
def test_mailbox_passwords_are_not_printed(tmp_path: Path, verbosity: str) -> None:
    """The role pyqmail_mailboxes for real, with the default callback at -v: the password is
    nowhere in the output (it was in the facts of pyqmail_mailboxes__present and in each
    item of the Maildir++ folder loop)."""
    (tmp_path / "qmail" / "users").mkdir(parents=True)
    (tmp_path / "qmail" / "control").mkdir()
    (tmp_path / "templates").symlink_to(ROLES / "pyqmail_mailboxes" / "templates")
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        f"""---
- name: The role pyqmail_mailboxes's tasks
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {REPO}/roles/pyqmail/defaults/main.yml
    - {REPO}/roles/pyqmail/vars/main.yml
    - {REPO}/roles/pyqmail_mailboxes/defaults/main.yml
  tasks:
    - name: The role's tasks
      ansible.builtin.import_tasks: {REPO}/roles/pyqmail_mailboxes/tasks/main.yml
  handlers:
    - name: pyqmail reload listeners
      ansible.builtin.debug:
        msg: reload
"""
    )
    user = "root" if os.geteuid() == 0 else None
    extra = {
        "pyqmail__root": str(tmp_path / "qmail"),
        "pyqmail__me": "mx.example.org",
        "pyqmail_control__locals": ["example.org"],
        "pyqmail_mailboxes__home_base": str(tmp_path / "vmail"),
        "pyqmail_mailboxes__list": [
            {"name": "alice", "password": PASSWORD, "senders": ["@example.org"]},
            {"name": "bob"},
        ],
    }
    if user is None:
        extra["pyqmail__check_fresh"] = True  # no chown to another user without root
    else:
        extra |= {"pyqmail__mailbox_user": user, "pyqmail__auth_group": user}
    # The default callback: what an operator reads at -v, where the passwords were printed.
    proc = ansible_playbook(
        playbook, extra, verbosity, cwd=REPO, callback="ansible.builtin.default"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "alice/Maildir/.Sent" in proc.stdout, "the folder loop did not run"
    assert "pyqmail_mailboxes__present" in proc.stdout or "censored" in proc.stdout
    assert PASSWORD not in proc.stdout + proc.stderr
    assert (tmp_path / "vmail" / "alice" / "Maildir" / ".Sent" / "maildirfolder").exists()
