"""pyqmail_dovecot: the configuration it writes.

The role's ``tasks/config.yml`` runs through ansible-playbook on this machine with the role's
vars and defaults, into a scratch file that ``doveconf -n`` (the task's own validation, and here
once more) reads back. The packaged Dovecot kept off without systemd: test_packaged_services.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.roles.playbook import ROLES, ansible_playbook, link_tree

ROLE = ROLES / "pyqmail_dovecot"
# The role's settings a test host needs beyond its paths: users and a group that exist on
# any Debian machine, and listeners on loopback.
TEST_HOST_VARS: dict[str, Any] = {
    "pyqmail__me": "mx.test",
    "pyqmail__mailbox_user": "daemon",  # a user with a group of its name
    "pyqmail__auth_group": "nogroup",
    "pyqmail_dovecot__listen_ip": "127.0.0.1",
    "pyqmail_dovecot__protocols": ["imap", "pop3"],
    "pyqmail_dovecot__listen_ports": {"imaps": 993, "pop3s": 995},
}


def playbook(tmp: Path, tasks: str, extra: dict[str, Any]) -> Any:
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
    proc = ansible_playbook(tmp / "play.yml", extra, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout)


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
        **TEST_HOST_VARS,
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
