"""A scanner moved to another address on a running host: the role's supervise.yml and its
handlers under our own svscan, with a stand-in scanner whose run script listens where its
configuration file says (as rspamd's worker-normal.inc says for rspamd).

The configuration task notifies the restart; the wait for the new address must come after it,
or it waits for a scanner still on the old address until it times out and the notification is
lost (every later run would fail the same way). The run passes, the scanner answers on the new
address, and a second run changes nothing. Only paths of this test are touched.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import ROLES, ansible_playbook, changed_tasks
from tests.scanners import free_port
from tests.svscan import own_svscan

pytestmark = pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools")

ROLE = ROLES / "pyqmail_scanners"

# Listens where the configuration file (argv[1]) says, as a scanner reads its own.
STAND_IN = """\
import socket, sys
host, port = open(sys.argv[1]).read().strip().rsplit(":", 1)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, int(port)))
server.listen()
while True:
    server.accept()[0].close()
"""


@pytest.fixture
def host() -> Iterator[Path]:
    """svscan on <base>/service; the stand-in rspamd's run script and conftest as templates
    where the play finds them, the role's log run script beside them."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-scanner-move-"))
    base.chmod(0o755)
    (base / "service").mkdir()
    (base / "qmail" / "supervise").mkdir(parents=True)
    (base / "standin.py").write_text(STAND_IN)
    templates = base / "templates" / "var" / "qmail" / "supervise"
    (templates / "rspamd").mkdir(parents=True)
    (templates / "rspamd" / "run.j2").write_text(
        "#!/bin/sh\nexec 2>&1\n"
        f"exec {sys.executable} {base / 'standin.py'} {base / 'rspamd.addr'}\n"
    )
    (templates / "rspamd" / "conftest.j2").write_text(
        f"#!/bin/sh\nexec grep -q : {base / 'rspamd.addr'}\n"
    )
    (templates / "any" / "log").mkdir(parents=True)
    (templates / "any" / "log" / "run.j2").symlink_to(
        ROLE / "templates" / "var" / "qmail" / "supervise" / "any" / "log" / "run.j2"
    )
    try:
        with own_svscan(
            base / "service", base / "qmail" / "supervise", base / "svscan.log", settle=15
        ):
            yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: Path, listen: str) -> tuple[int, dict[str, Any]]:
    """The role's supervise.yml with the stand-in's configuration (its address, written by
    supervise.yml as it writes rspamd's), with the role's handlers."""
    play = [
        {
            "name": "A scanner under supervise",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars_files": [
                str(path)
                for role in ("pyqmail", "pyqmail_scanners")
                for part in ("defaults", "vars")
                if (path := ROLES / role / part / "main.yml").is_file()
            ],
            "tasks": [
                {
                    "name": "The role's supervise.yml",
                    "ansible.builtin.include_tasks": str(ROLE / "tasks" / "supervise.yml"),
                    "vars": {
                        "pyqmail_scanners__service": "{{ pyqmail_scanners__rspamd_service }}",
                        "pyqmail_scanners__listen": "{{ pyqmail_scanners__rspamd_listen }}",
                        "pyqmail_scanners__config": [
                            {
                                "path": str(base),
                                "files": [
                                    {
                                        "name": "rspamd.addr",
                                        "content": "{{ pyqmail_scanners__rspamd_listen }}\n",
                                    }
                                ],
                            }
                        ],
                    },
                },
            ],
            "handlers": [
                {
                    "name": "The role's handlers",
                    "ansible.builtin.import_tasks": str(ROLE / "handlers" / "main.yml"),
                }
            ],
        }
    ]
    (base / "play.yml").write_text(json.dumps(play))
    extra = {
        "pyqmail__root": str(base / "qmail"),
        "pyqmail__service_dir": str(base / "service"),
        "pyqmail__log_dir": str(base / "log"),
        "pyqmail__log_user": "nobody",
        "pyqmail__check_fresh": False,
        "pyqmail__preflight_done": True,  # restart_note's include runs the role's dependency
        "pyqmail_scanners__rspamd_enabled": True,
        "pyqmail_scanners__rspamd_listen": listen,
    }
    proc = ansible_playbook(base / "play.yml", extra, cwd=base, timeout=400)
    return proc.returncode, json.loads(proc.stdout)


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_a_scanner_moved_to_another_address_is_restarted_before_the_wait(host: Path) -> None:
    old, new = free_port(), free_port()
    rc, out = run(host, f"127.0.0.1:{old}")
    assert rc == 0, out["stats"]
    assert answers(old)
    started = time.monotonic()
    rc, out = run(host, f"127.0.0.1:{new}")
    assert rc == 0, (time.monotonic() - started, json.dumps(out)[-3000:])
    assert answers(new) and not answers(old)
    assert "Restart rspamd (svc -t)" in changed_tasks(out)
    rc, out = run(host, f"127.0.0.1:{new}")
    assert rc == 0
    assert changed_tasks(out) == []
