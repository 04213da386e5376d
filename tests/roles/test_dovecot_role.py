"""pyqmail_dovecot: the packaged Dovecot kept off without systemd, and the configuration written.

The role's own task files run through ansible-playbook on this machine:

- ``tasks/packaged.yml`` as on a host without systemd, in a mount namespace of its own whose
  ``/etc/init.d`` and ``/etc/rc?.d`` are copies (a Debian ``dovecot`` init script with its
  links, installed there by ``update-rc.d defaults`` as the package does): the host's boot
  links are never touched, and the copies show what the role did;
- ``tasks/config.yml`` with the role's vars and defaults, into a scratch file that
  ``doveconf -n`` (the task's own validation, and here once more) reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IMPOSSIBLE_HERE
from tests.roles.playbook import ROLES, ansible_playbook, link_tree, task_result

ROLE = ROLES / "pyqmail_dovecot"
RC = [f"rc{level}.d" for level in "0123456S"]
INIT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          dovecot
# Required-Start:    $local_fs $remote_fs $network $syslog $time
# Required-Stop:     $local_fs $remote_fs $network $syslog
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Dovecot init script (a stand-in for the package's)
### END INIT INFO
exit 0
"""


def playbook(tmp: Path, tasks: str, extra: dict[str, Any], wrapper: list[str] | None = None) -> Any:
    """One run of the role's ``tasks`` file on localhost, with the role's defaults and vars
    (not its main.yml: no packages, no services); the JSON callback's output."""
    link_tree(ROLE / "templates", tmp / "templates")
    play = {
        "name": f"The role pyqmail_dovecot's {tasks}",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars_files": [
            str(ROLES / role / part / "main.yml")
            for role, part in (
                ("pyqmail", "defaults"),
                ("pyqmail", "vars"),
                ("pyqmail_dovecot", "defaults"),
                ("pyqmail_dovecot", "vars"),
            )
        ],
        "tasks": [{"ansible.builtin.import_tasks": str(ROLE / "tasks" / tasks)}],
        "handlers": [{"ansible.builtin.import_tasks": str(ROLES / "pyqmail/handlers/main.yml")}],
    }
    (tmp / "play.yml").write_text(json.dumps([play]))
    proc = ansible_playbook(tmp / "play.yml", extra, cwd=tmp, wrapper=wrapper)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout)


DISABLE = "Keep the packaged Dovecot from starting at boot (no systemd)"


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """Copies of /etc/init.d and /etc/rc?.d, with a dovecot init script and no links yet."""
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
        for old in (etc / sub).glob("*dovecot"):
            old.unlink()
    (etc / "init.d" / "dovecot").write_text(INIT)
    (etc / "init.d" / "dovecot").chmod(0o755)
    (tmp_path / "run-dovecot").mkdir()  # no packaged master to stop here, whatever the host has
    return etc


def in_namespace(etc: Path) -> list[str]:
    """``unshare`` into a mount namespace where /etc/init.d, /etc/rc?.d are the copies."""
    mounts = [f"mount --bind {etc / sub} /etc/{sub}" for sub in ["init.d", *RC]]
    if Path("/run/dovecot").is_dir():
        mounts.append(f"mount --bind {etc.parent / 'run-dovecot'} /run/dovecot")
    script = " && ".join([*mounts, 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def links(etc: Path) -> list[str]:
    return sorted(p.name[0] + p.parent.name[2] for p in etc.glob("rc?.d/[SK][0-9][0-9]dovecot"))


def test_packaged_init_script_is_disabled_without_systemd_once(tmp_path: Path, etc: Path) -> None:
    ns = in_namespace(etc)
    subprocess.run([*ns, "update-rc.d", "dovecot", "defaults"], check=True, timeout=60)
    assert links(etc) == ["K0", "K1", "K6", "S2", "S3", "S4", "S5"]  # as the package leaves it
    extra = {"ansible_facts": {"service_mgr": "sysvinit"}}
    first = task_result(playbook(tmp_path, "packaged.yml", extra, ns), DISABLE)
    assert first.get("changed") is True, first
    assert links(etc) == ["K0", "K1", "K2", "K3", "K4", "K5", "K6"], "still starts at boot"
    again = task_result(playbook(tmp_path, "packaged.yml", extra, ns), DISABLE)
    assert again.get("changed") is False, again
    (etc / "init.d" / "dovecot").unlink()  # no such script (dovecot-core never installed)
    gone = task_result(playbook(tmp_path, "packaged.yml", extra, ns), DISABLE)
    assert gone.get("skipped") is True, gone


def written(tmp_path: Path, **variables: object) -> str:
    """``doveconf -n`` of the configuration the role's config task writes with ``variables``."""
    root = tmp_path / "qmail"
    (root / "control").mkdir(parents=True, exist_ok=True)
    (root / "control" / "servercert.pem").write_text("not read by doveconf -n\n")
    config = tmp_path / "pyqmail.conf"
    extra = {
        "pyqmail__root": str(root),
        "pyqmail__dovecot_config": str(config),
        "pyqmail__service_dir": str(tmp_path / "service"),
        "pyqmail__check_fresh": False,
        "pyqmail__me": "mx.test",
        "pyqmail__mailbox_user": "daemon",  # a user with a group of its name
        "pyqmail__auth_group": "nogroup",
        "pyqmail_dovecot__listen_ip": "127.0.0.1",
        "pyqmail_dovecot__protocols": ["imap", "pop3"],
        "pyqmail_dovecot__listen_ports": {"imaps": 993, "pop3s": 995},
        **variables,
    }
    playbook(tmp_path, "config.yml", extra)
    return subprocess.run(
        ["doveconf", "-n", "-c", str(config)], capture_output=True, text=True, check=True
    ).stdout


def _args(conf: str) -> list[str]:
    """The passdb's and userdb's ``args`` lines."""
    return [line.strip() for line in conf.splitlines() if line.strip().startswith("args = ")]


def _block(conf: str, header: str, end: str = "\n}") -> str:
    start = conf.index(header)
    return conf[start : conf.index(end, start)]


def test_checkpassword_concurrency_reaches_the_checker(tmp_path: Path) -> None:
    def args(where: Path, **variables: object) -> list[str]:
        checker = f"/opt/pyqmail/bin/pyqmail-checkpassword --root {where / 'qmail'}"
        lines = _args(written(where, **variables))
        return [line.replace(checker, "CHECKER") for line in lines]

    default = "args = CHECKER --mail-user daemon --mail-group daemon"
    assert args(tmp_path / "default") == [default] * 2  # the checker's own default
    six = args(tmp_path / "six", pyqmail_dovecot__checkpassword_concurrency=6)
    assert six == [f"{default} --concurrency 6"] * 2


def test_written_configuration_keeps_userdb_lookups_private(tmp_path: Path) -> None:
    auth = _block(written(tmp_path), "service auth {")
    assert "extra_groups = nogroup" in auth
    userdb = _block(auth, "unix_listener auth-userdb {", "}")
    assert "mode = 0600" in userdb, auth
