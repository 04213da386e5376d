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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.roles.playbook import changed_tasks
from tests.roles.scanner_host import (
    SUPERVISE_TEMPLATES,
    answers,
    run_script,
    run_supervise,
    stand_in_host,
)
from tests.scanners import free_port

pytestmark = pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools")


@pytest.fixture
def host() -> Iterator[Path]:
    """The stand-in rspamd listening where its configuration file <base>/rspamd.addr says (as
    a scanner reads its own), its conftest passing when that file holds an address."""
    with stand_in_host("pyqmail-scanner-move-", "open(sys.argv[1]).read().strip()") as base:
        templates = base / SUPERVISE_TEMPLATES / "rspamd"
        (templates / "run.j2").write_text(run_script(base, str(base / "rspamd.addr")))
        (templates / "conftest.j2").write_text(
            f"#!/bin/sh\nexec grep -q : {base / 'rspamd.addr'}\n"
        )
        yield base


def run(base: Path, listen: str) -> tuple[int, dict[str, Any]]:
    """The role's supervise.yml with the stand-in's configuration (its address, written by
    supervise.yml as it writes rspamd's), with the role's handlers."""
    config = [
        {
            "path": str(base),
            "files": [
                {"name": "rspamd.addr", "content": "{{ pyqmail_scanners__rspamd_listen }}\n"}
            ],
        }
    ]
    return run_supervise(base, listen, config)


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
