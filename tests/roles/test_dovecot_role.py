"""pyqmail_dovecot: the configuration the role writes.

The role's ``tasks/config.yml`` runs through ansible-playbook on this machine with the role's
vars and defaults, into a scratch file that ``doveconf -n`` (the task's own validation, and
here once more) reads back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.roles.playbook import REPO, ansible_env

ROLE = REPO / "roles" / "pyqmail_dovecot"


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
