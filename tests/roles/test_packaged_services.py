"""The packaged services daemontools runs instead (Dovecot, rspamd, clamd) kept from starting at
boot on a host without systemd.

Each role's own tasks about its packaged service (those of its task file whose names say
"packaged": the include of the role pyqmail's ``tasks/packaged.yml`` with that service's units,
pid file, process name and init script) run through ansible-playbook on this machine as on a
host without systemd, in a mount namespace of its own whose ``/etc/init.d`` and ``/etc/rc?.d``
are copies (a Debian init script of the service's name with its links, installed there by
``update-rc.d defaults`` as the package does) and whose run directory of the packaged daemon is
an empty one: the host's boot links and daemons are never touched, and the copies show what the
role did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IMPOSSIBLE_HERE
from tests.roles.playbook import ROLES, ansible_playbook, results_by_task

RC = [f"rc{level}.d" for level in "0123456S"]
INIT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
# Required-Start:    $local_fs $remote_fs $network $syslog $time
# Required-Stop:     $local_fs $remote_fs $network $syslog
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: {name} init script (a stand-in for the package's)
### END INIT INFO
exit 0
"""


@dataclass(frozen=True)
class Packaged:
    """A role's packaged service: where the role keeps it off, and what a run shows of it."""

    role: str
    tasks: str  # the role's task file that installs the package and keeps its service off
    script: str  # the package's init script under /etc/init.d
    run_dir: str  # the packaged daemon's run directory (its pid file), empty in the namespace
    installed: str  # the variable the role registers its apt task's result in
    label: str  # the service as the task names show it


SERVICES = {
    "dovecot": Packaged(
        "pyqmail_dovecot",
        "dovecot.yml",
        "dovecot",
        "/run/dovecot",
        "pyqmail_dovecot__installed",
        "Dovecot",
    ),
    "rspamd": Packaged(
        "pyqmail_scanners",
        "rspamd.yml",
        "rspamd",
        "/run/rspamd",
        "pyqmail_scanners__rspamd_installed",
        "rspamd",
    ),
    "clamd": Packaged(
        "pyqmail_scanners",
        "clamav.yml",
        "clamav-daemon",
        "/run/clamav",
        "pyqmail_scanners__clamav_installed",
        "clamd",
    ),
}


def packaged_tasks(service: Packaged) -> list[dict[str, Any]]:
    """The tasks of the role's task file about its packaged service (their names say so)."""
    tasks = yaml.safe_load((ROLES / service.role / "tasks" / service.tasks).read_text())
    found = [task for task in tasks if "packaged" in task.get("name", "")]
    assert found, f"{service.role}/tasks/{service.tasks}: no task about the packaged service"
    return found


def playbook(tmp: Path, service: Packaged, extra: dict[str, Any], wrapper: list[str]) -> Any:
    """One run of those tasks on localhost with the role's (and the role pyqmail's) defaults
    and vars, as after the role pyqmail ran (the dependency of every role: the preflight done)
    and the apt task found the package installed; the JSON callback's output."""
    play = {
        "name": f"The role {service.role}'s packaged {service.label}",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars_files": [
            str(path)
            for role in ("pyqmail", service.role)
            for part in ("defaults", "vars")
            if (path := ROLES / role / part / "main.yml").is_file()
        ],
        "tasks": packaged_tasks(service),
    }
    (tmp / "play.yml").write_text(json.dumps([play]))
    extra = {"pyqmail__preflight_done": True, service.installed: {"changed": False}, **extra}
    proc = ansible_playbook(tmp / "play.yml", extra, cwd=tmp, wrapper=wrapper)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout)


def disable_result(out: dict[str, Any], service: Packaged) -> dict[str, Any]:
    """The result of the task that disables the init script's links (the role pyqmail's, so
    its name comes with the role's)."""
    ending = f"Keep the packaged service from starting at boot (no systemd): {service.label}"
    ran = {name: results for name, results in results_by_task(out).items() if name.endswith(ending)}
    assert len(ran) == 1, f"no one task {ending!r} ran: {sorted(results_by_task(out))}"
    [results] = ran.values()
    return results[0]


@pytest.fixture(params=sorted(SERVICES))
def service(request: pytest.FixtureRequest) -> Packaged:
    return SERVICES[request.param]


@pytest.fixture
def etc(tmp_path: Path, service: Packaged) -> Path:
    """Copies of /etc/init.d and /etc/rc?.d, with the service's init script and no links yet."""
    if os.geteuid() != 0:
        pytest.skip(f"{IMPOSSIBLE_HERE} a private mount namespace needs root")
    if not shutil.which("unshare") or not shutil.which("update-rc.d"):
        pytest.skip("a private mount namespace needs unshare and update-rc.d")
    etc = tmp_path / "etc"
    for sub in ["init.d", *RC]:
        src = Path("/etc") / sub
        if src.is_dir():
            shutil.copytree(src, etc / sub, symlinks=True)
        else:
            (etc / sub).mkdir(parents=True)
        for old in (etc / sub).glob(f"*{service.script}"):
            old.unlink()
    script = etc / "init.d" / service.script
    script.write_text(INIT.format(name=service.script))
    script.chmod(0o755)
    (tmp_path / "run").mkdir()  # no packaged daemon to stop here, whatever the host has
    return etc


def in_namespace(etc: Path, service: Packaged) -> list[str]:
    """``unshare`` into a mount namespace where /etc/init.d, /etc/rc?.d are the copies."""
    mounts = [f"mount --bind {etc / sub} /etc/{sub}" for sub in ["init.d", *RC]]
    if Path(service.run_dir).is_dir():
        mounts.append(f"mount --bind {etc.parent / 'run'} {service.run_dir}")
    script = " && ".join([*mounts, 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def links(etc: Path, service: Packaged) -> list[str]:
    found = etc.glob(f"rc?.d/[SK][0-9][0-9]{service.script}")
    return sorted(p.name[0] + p.parent.name[2] for p in found)


def test_packaged_init_script_is_disabled_without_systemd_once(
    tmp_path: Path, service: Packaged, etc: Path
) -> None:
    ns = in_namespace(etc, service)
    subprocess.run([*ns, "update-rc.d", service.script, "defaults"], check=True, timeout=60)
    assert links(etc, service) == ["K0", "K1", "K6", "S2", "S3", "S4", "S5"]  # as installed
    extra = {"ansible_facts": {"service_mgr": "sysvinit"}}
    first = playbook(tmp_path, service, extra, ns)
    assert links(etc, service) == ["K0", "K1", "K2", "K3", "K4", "K5", "K6"], "starts at boot"
    assert disable_result(first, service).get("changed") is True
    again = disable_result(playbook(tmp_path, service, extra, ns), service)
    assert again.get("changed") is False, again
    (etc / "init.d" / service.script).unlink()  # no such script (the package never installed)
    gone = disable_result(playbook(tmp_path, service, extra, ns), service)
    assert gone.get("skipped") is True, gone


def _role_includes() -> list[tuple[Path, dict[str, Any]]]:
    """Every include_role of the role pyqmail in any role's task files: (file, its args)."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(ROLES.glob("*/tasks/*.yml")):
        todo = list(yaml.safe_load(path.read_text()) or [])
        while todo:
            task = todo.pop()
            for key in ("block", "rescue", "always"):
                todo.extend(task.get(key) or [])
            args = task.get("ansible.builtin.include_role")
            if args and args.get("name") == "pyqmail.mail.pyqmail":
                found.append((path, args))
    return found


def test_the_shared_tasks_bring_no_second_copy_of_the_handlers() -> None:
    """An include_role appends the included role's handlers to the play again, after the
    including role's own, and notifications reach the last copy: the role pyqmail's reloads
    would then run after, not before, e.g. pyqmail_dovecot's restart, against the order its
    handlers file keeps. Each include names a handlers file without handlers."""
    includes = _role_includes()
    assert {path.parent.parent.name for path, _ in includes} >= {
        "pyqmail_dovecot",
        "pyqmail_scanners",
    }
    for path, args in includes:
        name = args.get("handlers_from")
        assert name, f"{path}: include_role of pyqmail.mail.pyqmail without handlers_from"
        handlers = yaml.safe_load((ROLES / "pyqmail" / "handlers" / f"{name}.yml").read_text())
        assert handlers == [], f"{path}: handlers_from {name} holds handlers"
