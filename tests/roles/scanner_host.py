"""A scratch host for the role pyqmail_scanners' tests, and a stand-in scanner on it.

``scratch_vars`` points the role's qmail root, service and log directories into a test's
temporary directory (every scanner role test runs the role's tasks there, never on this
machine's /var/qmail). ``stand_in_host`` is our own svscan with a small Python server playing
rspamd, for the tests of what the role's supervise.yml and its handlers do on a running host
(a scanner moved to another address, a restart that did not happen, a changed log run
script): a real rspamd takes seconds to start and its address is in files a test would have
to rewrite, the stand-in's is in its run script or one file of the test's. ``run_supervise``
runs that supervise.yml for it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.roles.playbook import ROLES, ansible_playbook
from tests.svscan import own_svscan

ROLE = ROLES / "pyqmail_scanners"
SUPERVISE_TEMPLATES = Path("templates") / "var" / "qmail" / "supervise"

# Listens where ADDRESS (a Python expression over sys.argv) says, as rspamd listens where its
# configuration says.
STAND_IN = """\
import socket, sys
host, port = ADDRESS.rsplit(":", 1)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, int(port)))
server.listen()
while True:
    server.accept()[0].close()
"""


def scratch_vars(base: Path) -> dict[str, Any]:
    """The role pyqmail's directories under ``base`` (the log services as nobody), and no
    freshness check of the installed package (there is none in a scratch directory)."""
    return {
        "pyqmail__root": str(base / "qmail"),
        "pyqmail__service_dir": str(base / "service"),
        "pyqmail__log_dir": str(base / "log"),
        "pyqmail__log_user": "nobody",
        "pyqmail__check_fresh": False,
    }


@contextlib.contextmanager
def stand_in_host(prefix: str, address: str) -> Iterator[Path]:
    """A temporary directory (its name begins with ``prefix``): svscan on <base>/service,
    the stand-in at <base>/standin.py listening where ``address`` (a Python expression over
    ``sys.argv``) says, and the role's log run script where the play finds templates. The
    caller writes the stand-in rspamd's ``run.j2`` (``run_script``) and ``conftest.j2`` into
    ``base / SUPERVISE_TEMPLATES / "rspamd"``: they are what each test varies."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    (base / "service").mkdir()
    (base / "qmail" / "supervise").mkdir(parents=True)
    (base / "standin.py").write_text(STAND_IN.replace("ADDRESS", address))
    templates = base / SUPERVISE_TEMPLATES
    (templates / "rspamd").mkdir(parents=True)
    (templates / "any" / "log").mkdir(parents=True)
    (templates / "any" / "log" / "run.j2").symlink_to(
        ROLE / SUPERVISE_TEMPLATES / "any" / "log" / "run.j2"
    )
    try:
        with own_svscan(
            base / "service", base / "qmail" / "supervise", base / "svscan.log", settle=15
        ):
            yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_script(base: Path, argument: str) -> str:
    """The stand-in's run script (a template: ``argument`` may hold Jinja)."""
    return f"#!/bin/sh\nexec 2>&1\nexec {sys.executable} {base / 'standin.py'} {argument}\n"


def run_supervise(
    base: Path, listen: str, config: list[dict[str, Any]], *args: str, **more: object
) -> tuple[int, dict[str, Any]]:
    """The role's supervise.yml for the stand-in rspamd listening on ``listen``, with the
    role's handlers (no force_handlers); ``config`` is the configuration supervise.yml writes
    (``pyqmail_scanners__config``), ``args`` more ansible-playbook options (``--check``),
    ``more`` more extra vars (over ``scratch_vars``). Returns the exit status and the JSON
    output."""
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
                        "pyqmail_scanners__config": config,
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
        **scratch_vars(base),
        "pyqmail__preflight_done": True,  # restart_note's include runs the role's dependency
        "pyqmail_scanners__rspamd_enabled": True,
        "pyqmail_scanners__rspamd_listen": listen,
        **more,
    }
    proc = ansible_playbook(base / "play.yml", extra, *args, cwd=base, timeout=400)
    return proc.returncode, json.loads(proc.stdout)


def answers(port: int) -> bool:
    """Whether something accepts a connection on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False
