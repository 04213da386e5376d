"""Action pyqmail.mail.pyqmail_preflight: check the inventory of every pyqmail role first.

Runs on the controller and changes nothing (check mode or not). For the host at hand it
collects the value of every variable the roles in ``roles`` declare in their
``meta/argument_specs.yml``, as those roles would see it even when they are not in this play:
the inventory (and play, extra) variables, else the role's ``defaults/main.yml``, templated
with the host's variables. It hands them to ``module_utils/pyqmail_inventory.py`` and fails
with one line per problem, each naming the variable and the element, all at once.

What only the host can say is asked there, by commands that only read, when a check needs
it: with ``pyqmail_dovecot__enabled``, which Dovecot the host has or would get
(``module_utils/pyqmail_dovecot.py``: dpkg-query, apt-cache policy, /etc/os-release). They run
without asking for become (reading needs no root; under this checkout's Mitogen strategy they
run as the play's become user all the same, which changes nothing: they write nothing), in
check mode too.

Why an action and not a task per role: a role's own argument validation runs when the role
starts, after the roles before it have changed the host, and prints its whole spec; and a
play that runs only some roles (playbooks/daemontools.yml) would never check the others.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_inventory import (
    check,
    unknown,
)


class ActionModule(ActionBase):
    """Collect the values of every declared pyqmail variable and check them."""

    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("roles", "roles_dir", "root"))

    def load(self, path: Path) -> Any:
        """A YAML file of a role, loaded as Ansible loads role files (templates trusted)."""
        if not path.is_file():
            return {}
        try:
            return self._loader.load_from_file(str(path), trusted_as_template=True) or {}
        except TypeError:  # ansible-core < 2.19: every string is a template
            return self._loader.load_from_file(str(path)) or {}

    def role_files(self, roles_dir: Path, roles: list[str]) -> tuple[dict[str, Any], ...]:
        """(option specs, defaults, role vars) of all ``roles``, merged."""
        specs: dict[str, Any] = {}
        defaults: dict[str, Any] = {}
        role_vars: dict[str, Any] = {}
        for role in roles:
            spec = self.load(roles_dir / role / "meta" / "argument_specs.yml")
            specs.update(spec.get("argument_specs", {}).get("main", {}).get("options") or {})
            defaults.update(self.load(roles_dir / role / "defaults" / "main.yml"))
            role_vars.update(self.load(roles_dir / role / "vars" / "main.yml"))
        return specs, defaults, role_vars

    def values(self, names: list[str], layers: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The templated value of each of ``names`` found in ``layers``, and the problems
        of those that cannot be templated (one line each, without the value)."""
        try:
            templar = self._templar.copy_with_new_env(available_variables=layers)
        except TypeError:  # ansible-core < 2.19: the arguments were Jinja overrides
            templar = self._templar
            templar.available_variables = layers
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name in names:
            if name not in layers:
                continue
            try:
                values[name] = templar.template(layers[name])
            except AnsibleError as exc:
                first = str(exc.message if hasattr(exc, "message") else exc).splitlines()
                problems.append(f"{name}: cannot be evaluated: {first[0] if first else exc}")
        return values, problems

    def host_run(self, argv: list[str]) -> str:
        """What a command that only reads prints on the host; the readers judge its output,
        not its status (dpkg-query exits 1 for a package it does not know)."""
        result = self._low_level_execute_command(shlex.join(argv), sudoable=False)
        return str(result.get("stdout") or "")

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fail with every problem of this host's pyqmail variables, or report ok."""
        task_vars = task_vars or {}
        result: dict[str, Any] = super().run(tmp, task_vars)
        args = self._task.args
        roles = list(args.get("roles") or [])
        role = self._task._role
        if not args.get("roles_dir") and role is None:
            return {**result, "failed": True, "msg": "outside a role, give roles_dir"}
        roles_dir = Path(args.get("roles_dir") or Path(role._role_path).parent)
        specs, defaults, role_vars = self.role_files(roles_dir, roles)
        # Role defaults are the lowest precedence: what the host's variables set wins.
        layers = {**defaults, **role_vars, **task_vars}
        values, problems = self.values(list(specs), layers)
        context = {
            "groups": task_vars.get("groups", {}),
            "inventory_hostname": task_vars.get("inventory_hostname"),
            "host_run": self.host_run,
            "host_root": str(args.get("root") or "/"),
            **self.values(list(role_vars), layers)[0],
        }
        bad = {line.split(":", 1)[0] for line in problems}
        sources = {name: str(layers[name]) for name in values}
        checked = {k: v for k, v in values.items() if k not in bad}
        problems += check(checked, {k: specs[k] for k in specs if k not in bad}, context, sources)
        if values.get("pyqmail__strict_variables") is not False:
            host = task_vars.get("inventory_hostname")
            hostvars = task_vars.get("hostvars", {})
            names = list(hostvars[host]) if host in hostvars else []
            problems = unknown(names, set(specs)) + problems
        result["changed"] = False
        if problems:
            result["failed"] = True
            result["msg"] = "\n".join(problems)
        else:
            result["msg"] = f"{len(values)} variables of {len(roles)} roles checked"
        return result
