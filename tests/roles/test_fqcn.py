"""Every module, filter and role of pyqmail is used by its fully qualified name (issue 20).

The roles and playbooks are the collection pyqmail.mail: a user who installed it has no
``library`` or ``roles_path`` pointing at this checkout, so a short name (``pyqmail_service:``,
``| pyqmail_dns_zone``, ``role: pyqmail``) works nowhere but here - and not even here, since
ansible.cfg no longer sets those paths. This test names each short use with its file, so a role
merged from elsewhere gets the treatment the same way:
  modules:  sed -i -E 's/^(\\s*-?\\s*)(pyqmail_[a-z_]+):\\s*$/\\1pyqmail.mail.\\2:/' <files>
  filters:  sed -i -E 's/\\|(\\s*)(pyqmail_[a-z_]+)\\b/|\\1pyqmail.mail.\\2/g' <files>
  roles:    sed -i -E 's/^(\\s*- role: )(pyqmail[a-z_]*)\\s*$/\\1pyqmail.mail.\\2/' <files>
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.playbook.block import Block
from ansible.playbook.task import Task

REPO = Path(__file__).resolve().parents[2]
# Task keys that are not the action (keywords, loops, blocks, a handler's listen).
KEYWORDS = set(Task.fattributes) | set(Block.fattributes) | {"local_action", "listen"}
# A filter of this project used without its collection prefix.
SHORT_FILTER = re.compile(r"\|\s*(pyqmail_[a-z_]+)\b")
ROLE_PREFIX = "pyqmail.mail."


def yaml_files() -> list[Path]:
    """Task, handler, playbook and role meta files of the collection and of molecule."""
    found = [
        *REPO.glob("roles/*/tasks/*.yml"),
        *REPO.glob("roles/*/handlers/*.yml"),
        *REPO.glob("roles/*/meta/main.yml"),
        *REPO.glob("playbooks/*.yml"),
        *REPO.glob("molecule/*/*.yml"),
        REPO / "site.yml",
    ]
    return sorted(p for p in found if p.is_file())


def tasks_in(items: Any) -> Iterator[dict[str, Any]]:
    """Every task dict in a task list, blocks included."""
    for item in items or []:
        if not isinstance(item, dict):
            continue
        if any(k in item for k in ("block", "rescue", "always")):
            for key in ("block", "rescue", "always"):
                yield from tasks_in(item.get(key))
        else:
            yield item


def tasks_of(path: Path, data: Any) -> Iterator[dict[str, Any]]:
    """The tasks of a task file, or of every play of a playbook."""
    if path.parent.name in ("tasks", "handlers"):
        yield from tasks_in(data)
        return
    if not isinstance(data, list):
        return
    for play in data:
        if isinstance(play, dict) and "hosts" in play:
            for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                yield from tasks_in(play.get(section))


def role_refs(path: Path, data: Any) -> Iterator[str]:
    """Role names a play's ``roles:``, a role's dependencies or include/import_role use."""
    if path.name == "main.yml" and path.parent.name == "meta":
        for dep in (data or {}).get("dependencies") or []:
            yield dep.get("role", dep.get("name")) if isinstance(dep, dict) else dep
    if isinstance(data, list):
        for play in data:
            if isinstance(play, dict):
                for role in play.get("roles") or []:
                    yield role.get("role", role.get("name")) if isinstance(role, dict) else role
    for task in tasks_of(path, data):
        for key in ("ansible.builtin.include_role", "ansible.builtin.import_role"):
            if isinstance(task.get(key), dict):
                yield task[key]["name"]


def problems(path: Path, root: Path = REPO) -> list[str]:
    """One line per short name in ``path`` (named relative to ``root``)."""
    text = path.read_text()
    data = yaml.safe_load(text)
    rel = path.relative_to(root)
    found = [f"{rel}: filter {m} is used without pyqmail.mail." for m in SHORT_FILTER.findall(text)]
    for task in tasks_of(path, data):
        actions = [k for k in task if k not in KEYWORDS and not k.startswith("with_")]
        found += [
            f"{rel}: task action {a!r} is not fully qualified" for a in actions if "." not in a
        ]
    for role in role_refs(path, data):
        if str(role).startswith("pyqmail") and not str(role).startswith(ROLE_PREFIX):
            found.append(f"{rel}: role {role!r} is not {ROLE_PREFIX}{role}")
    return found


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_name_is_fully_qualified(path: Path) -> None:
    assert problems(path) == []


def filter_files() -> list[Path]:
    """Templates and role variables: Jinja that may call a filter, but holds no task."""
    found = [
        *REPO.glob("roles/*/templates/**/*.j2"),
        *REPO.glob("roles/*/defaults/*.yml"),
        *REPO.glob("roles/*/vars/*.yml"),
        *REPO.glob("inventory/**/*.yml"),
    ]
    return sorted(p for p in found if p.is_file())


@pytest.mark.parametrize("path", filter_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_templates_and_variables_call_filters_by_fqcn(path: Path) -> None:
    rel = path.relative_to(REPO)
    found = [
        f"{rel}: filter {m} is used without pyqmail.mail."
        for m in SHORT_FILTER.findall(path.read_text())
    ]
    assert found == []


def test_the_check_finds_short_names(tmp_path: Path) -> None:
    """The check itself: short module, filter and role names are each reported."""
    tasks = tmp_path / "roles" / "x" / "tasks"
    tasks.mkdir(parents=True)
    bad = tasks / "main.yml"
    bad.write_text(
        "- name: Short module\n  pyqmail_service:\n    name: x\n"
        '- name: Short filter\n  ansible.builtin.debug:\n    msg: "{{ a | pyqmail_dns_zone }}"\n'
        "- name: Short role\n  ansible.builtin.include_role:\n    name: pyqmail_dkim\n"
        "- name: Fine\n  block:\n    - name: In a block\n      copy:\n        src: a\n"
    )
    found = problems(bad, tmp_path)
    assert found == [
        "roles/x/tasks/main.yml: filter pyqmail_dns_zone is used without pyqmail.mail.",
        "roles/x/tasks/main.yml: task action 'pyqmail_service' is not fully qualified",
        "roles/x/tasks/main.yml: task action 'copy' is not fully qualified",
        "roles/x/tasks/main.yml: role 'pyqmail_dkim' is not pyqmail.mail.pyqmail_dkim",
    ]
