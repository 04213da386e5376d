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
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles.playbook import REPO, ansible_env

ROLE = REPO / "roles" / "pyqmail_dovecot"
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


def playbook(tmp: Path, tasks: str, extra: dict[str, Any], wrap: list[str] | None = None) -> Any:
    """One run of the role's ``tasks`` file on localhost; the JSON callback's output."""
    templates = tmp / "templates"  # the role's templates, where a play outside the role looks
    if not templates.exists():
        templates.symlink_to(ROLE / "templates")
    (tmp / "play.yml").write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars_files": [
                        str(REPO / "roles" / "pyqmail" / "defaults" / "main.yml"),
                        str(REPO / "roles" / "pyqmail" / "vars" / "main.yml"),
                        str(ROLE / "defaults" / "main.yml"),
                        str(ROLE / "vars" / "main.yml"),
                    ],
                    "tasks": [{"ansible.builtin.import_tasks": str(ROLE / "tasks" / tasks)}],
                    "handlers": [
                        {
                            "ansible.builtin.import_tasks": str(
                                REPO / "roles" / "pyqmail" / "handlers" / "main.yml"
                            )
                        }
                    ],
                }
            ]
        )
    )
    extra = {"ansible_python_interpreter": sys.executable, **extra}
    (tmp / "extra.json").write_text(json.dumps(extra))
    ansible = str(Path(sys.executable).with_name("ansible-playbook"))
    argv = [ansible, "-i", "localhost,", "-e", f"@{tmp / 'extra.json'}", str(tmp / "play.yml")]
    proc = subprocess.run(
        [*(wrap or []), *argv],
        cwd=tmp,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout)


def task_results(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        task["task"]["name"]: task["hosts"]["localhost"]
        for play in out["plays"]
        for task in play["tasks"]
    }


DISABLE = "Keep the packaged Dovecot from starting at boot (no systemd)"


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """Copies of /etc/init.d and /etc/rc?.d, with a dovecot init script and no links yet."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("update-rc.d"):
        pytest.skip("a private mount namespace needs root, unshare and update-rc.d")
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
    first = task_results(playbook(tmp_path, "packaged.yml", extra, ns))
    assert first[DISABLE].get("changed") is True, first[DISABLE]
    assert links(etc) == ["K0", "K1", "K2", "K3", "K4", "K5", "K6"], "still starts at boot"
    again = task_results(playbook(tmp_path, "packaged.yml", extra, ns))
    assert again[DISABLE].get("changed") is False, again[DISABLE]
    (etc / "init.d" / "dovecot").unlink()  # no such script (dovecot-core never installed)
    gone = task_results(playbook(tmp_path, "packaged.yml", extra, ns))
    assert gone[DISABLE].get("skipped") is True, gone[DISABLE]


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
