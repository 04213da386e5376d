"""A scanner restart that did not happen is not lost (README, "A restart that did not happen").

The role's supervise.yml and its handlers under our own svscan, with a stand-in scanner whose
run script names the address it listens on (a moved address changes the run script, which
restarts the scanner, as a changed configuration does). The restart is lost twice over: its
conftest refuses it (an admin's own file the scanner cannot read), or the run ends before the
handlers (a task fails in a play without force_handlers, as a Ctrl-C or a lost connection ends
it). Either way the note restart-pending stays in the scanner's supervise directory, the scanner
keeps its old address, and the next run, whose files no longer change, restarts it before it
waits for the new address (without the note: nothing restarts, and the wait times out after
180 s on every later run). Only paths of this test are touched.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import ROLES, ansible_playbook, changed_tasks, results_by_task
from tests.scanners import free_port
from tests.svscan import own_svscan

pytestmark = pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools")

ROLE = ROLES / "pyqmail_scanners"
RESTART = "Restart rspamd (svc -t)"
REFUSE = "Refuse to restart rspamd into a configuration it cannot read"

# Listens where its first argument says.
STAND_IN = """\
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
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
    where the play finds them (the conftest refuses while <base>/broken is there, as rspamd's
    refuses a local.d file it cannot parse), the role's log run script beside them."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-scanner-note-"))
    base.chmod(0o755)
    (base / "service").mkdir()
    (base / "qmail" / "supervise").mkdir(parents=True)
    (base / "standin.py").write_text(STAND_IN)
    templates = base / "templates" / "var" / "qmail" / "supervise"
    (templates / "rspamd").mkdir(parents=True)
    (templates / "rspamd" / "run.j2").write_text(
        "#!/bin/sh\nexec 2>&1\n"
        f"exec {sys.executable} {base / 'standin.py'} {{{{ pyqmail_scanners__rspamd_listen }}}}\n"
    )
    (templates / "rspamd" / "conftest.j2").write_text(conftest(base))
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


def conftest(base: Path) -> str:
    broken = base / "broken"
    return f"#!/bin/sh\nif [ -e {broken} ]; then echo '{broken}: cannot parse' >&2; exit 1; fi\n"


def run(base: Path, listen: str) -> tuple[int, dict[str, Any]]:
    """The role's supervise.yml for the stand-in (no configuration file of its own: its run
    script holds its address), with the role's handlers; no force_handlers."""
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
                        "pyqmail_scanners__config": [],
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
        "pyqmail__preflight_done": True,
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


def lose_the_restart(base: Path, how: str) -> None:
    """Make the next run end without the restart its changed run script notified."""
    if how == "conftest refuses":
        (base / "broken").touch()
    else:  # a task between the change and the handlers fails (the conftest cannot be written)
        template = base / "templates" / "var" / "qmail" / "supervise" / "rspamd" / "conftest.j2"
        template.write_text("#!/bin/sh\n{{ no_such_variable }}\n")


def repair(base: Path) -> None:
    (base / "broken").unlink(missing_ok=True)
    template = base / "templates" / "var" / "qmail" / "supervise" / "rspamd" / "conftest.j2"
    template.write_text(conftest(base))


@pytest.mark.parametrize("how", ["conftest refuses", "run ends before the handlers"])
def test_a_lost_scanner_restart_runs_on_the_next_run(host: Path, how: str) -> None:
    old, new = free_port(), free_port()
    note = host / "qmail" / "supervise" / "rspamd" / "restart-pending"
    rc, out = run(host, f"127.0.0.1:{old}")
    assert rc == 0, json.dumps(out)[-3000:]
    assert answers(old)
    assert not note.exists()  # the first run's restart ran: its note is gone

    lose_the_restart(host, how)
    rc, out = run(host, f"127.0.0.1:{new}")
    assert rc != 0
    ran = results_by_task(out)
    assert RESTART not in ran
    if how == "conftest refuses":
        refused = ran[REFUSE][0]
        assert f"{host / 'broken'}: cannot parse" in refused["msg"], refused
        assert f"the restart stays due: {note}" in refused["msg"], refused
    assert note.is_file()
    assert oct(note.stat().st_mode & 0o777) == "0o600"
    assert answers(old) and not answers(new)  # still the old run script's scanner

    repair(host)
    rc, out = run(host, f"127.0.0.1:{new}")  # nothing of the scanner's changes now
    assert rc == 0, json.dumps(out)[-3000:]
    assert RESTART in changed_tasks(out)
    assert answers(new) and not answers(old)
    assert not note.exists()
    rc, out = run(host, f"127.0.0.1:{new}")
    assert rc == 0
    assert changed_tasks(out) == []
