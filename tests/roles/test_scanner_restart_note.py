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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import changed_tasks, results_by_task
from tests.roles.scanner_host import (
    SUPERVISE_TEMPLATES,
    answers,
    run_script,
    run_supervise,
    stand_in_host,
)
from tests.scanners import free_port

pytestmark = pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools")

RESTART = "Restart rspamd (svc -t)"
REFUSE = "Refuse to restart rspamd into a configuration it cannot read"


@pytest.fixture
def host() -> Iterator[Path]:
    """The stand-in rspamd listening where its run script's argument says (the role's
    ``pyqmail_scanners__rspamd_listen``), its conftest refusing while <base>/broken is there
    (as rspamd's refuses a local.d file it cannot parse)."""
    with stand_in_host("pyqmail-scanner-note-", "sys.argv[1]") as base:
        templates = base / SUPERVISE_TEMPLATES / "rspamd"
        (templates / "run.j2").write_text(run_script(base, "{{ pyqmail_scanners__rspamd_listen }}"))
        (templates / "conftest.j2").write_text(conftest(base))
        yield base


def conftest(base: Path) -> str:
    broken = base / "broken"
    return f"#!/bin/sh\nif [ -e {broken} ]; then echo '{broken}: cannot parse' >&2; exit 1; fi\n"


def run(base: Path, listen: str) -> tuple[int, dict[str, Any]]:
    """The role's supervise.yml for the stand-in (no configuration file of its own: its run
    script holds its address), with the role's handlers; no force_handlers."""
    return run_supervise(base, listen, config=[])


def lose_the_restart(base: Path, how: str) -> None:
    """Make the next run end without the restart its changed run script notified."""
    if how == "conftest refuses":
        (base / "broken").touch()
    else:  # a task between the change and the handlers fails (the conftest cannot be written)
        template = base / SUPERVISE_TEMPLATES / "rspamd" / "conftest.j2"
        template.write_text("#!/bin/sh\n{{ no_such_variable }}\n")


def repair(base: Path) -> None:
    (base / "broken").unlink(missing_ok=True)
    template = base / SUPERVISE_TEMPLATES / "rspamd" / "conftest.j2"
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
