"""The host's own mail (issue 16, item 7): the pyqmail_install role links the sendmail paths
no package owns to its pyqmail-sendmail wrapper, leaves a package's (another MTA's) and a
stranger's file alone with a WARNING for the summary, and removes only its own links when
turned off. Run through ansible-playbook on this machine with the sendmail paths moved into
a temporary directory (and /usr/bin/python3, which dpkg says python3-minimal owns, standing
in for another MTA's /usr/sbin/sendmail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyqmail.queue.store import Queue
from tests.queue_util import messages
from tests.roles.playbook import REPO, ansible_env

TASKS = REPO / "roles" / "pyqmail_install" / "tasks" / "sendmail.yml"
OWNED = "/usr/bin/python3"  # python3-minimal's: stands in for postfix's /usr/sbin/sendmail


def run(tmp: Path, paths: list[str], *, enabled: bool = True) -> dict[str, Any]:
    """One ansible-playbook run of the role's sendmail tasks; the play's JSON result."""
    playbook = tmp / "play.yml"
    templates = tmp / "templates"  # the role's template, where a play outside the role looks
    if not templates.exists():
        templates.mkdir()
        (templates / "sendmail.j2").symlink_to(TASKS.parents[1] / "templates" / "sendmail.j2")
    playbook.write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        f"    - ansible.builtin.import_tasks: {TASKS}\n"
        "    - ansible.builtin.debug: {var: pyqmail_install__sendmail_summary}\n"
    )
    extra = {
        "pyqmail__venv": str(tmp / "venv"),
        "pyqmail__root": str(tmp / "qmail"),
        "pyqmail__check_fresh": False,
        "pyqmail_install__sendmail": enabled,
        "pyqmail_install__sendmail_paths": paths,
        "ansible_python_interpreter": sys.executable,
    }
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
         str(playbook), "-e", json.dumps(extra)],
        cwd=REPO, env=ansible_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def summary(result: dict[str, Any]) -> list[str]:
    last = result["plays"][0]["tasks"][-1]["hosts"]["localhost"]
    lines: list[str] = last["pyqmail_install__sendmail_summary"]
    return lines


def changed(result: dict[str, Any]) -> int:
    return int(result["stats"]["localhost"]["changed"])


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A venv with the real pyqmail-sendmail, a qmail root with its queue, empty sbin/ lib/."""
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "pyqmail-sendmail").symlink_to(
        Path(sys.executable).with_name("pyqmail-sendmail")
    )
    (tmp_path / "qmail" / "control").mkdir(parents=True)
    (tmp_path / "qmail" / "control" / "me").write_text("mx.test\n")
    Queue(tmp_path / "qmail" / "queue").create()
    (tmp_path / "sbin").mkdir()
    (tmp_path / "lib").mkdir()
    return tmp_path


def test_free_paths_are_linked_and_mail_reaches_the_queue(host: Path) -> None:
    sbin, lib = host / "sbin" / "sendmail", host / "lib" / "sendmail"
    lib.write_text("#!/bin/sh\n# someone's own script\n")
    owned_before = os.readlink(OWNED)
    result = run(host, [str(sbin), str(lib), OWNED])
    wrapper = host / "venv" / "bin" / "sendmail"
    assert os.readlink(sbin) == str(wrapper)
    assert lib.read_text() == "#!/bin/sh\n# someone's own script\n"  # left alone
    assert os.readlink(OWNED) == owned_before  # the package's file is untouched
    assert summary(result) == [
        f"{sbin} -> {wrapper} (pyqmail-sendmail)",
        f"WARNING: {lib} exists, belongs to no package and is not pyqmail's: left alone;"
        " cron and system mail do not go through pyqmail",
        f"WARNING: {OWNED} belongs to the package python3-minimal: cron and system mail go"
        " through python3-minimal, not pyqmail (remove it to send them through pyqmail)",
    ]
    # As Debian's cron calls it, through the link: the message is in pyqmail's queue.
    proc = subprocess.run(
        [str(sbin), "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        input=b"Subject: cron\n\nok\n", capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [(_, stored)] = list(messages(Queue(host / "qmail" / "queue"), "new"))
    assert stored.env.recipients == ("root@mx.test",)
    # Idempotent; turned off, only pyqmail's own link goes.
    assert changed(run(host, [str(sbin), str(lib), OWNED])) == 0
    off = run(host, [str(sbin), str(lib), OWNED], enabled=False)
    assert not sbin.exists() and not sbin.is_symlink()
    assert lib.exists() and Path(OWNED).exists()
    assert f"{sbin}: not managed (pyqmail_install__sendmail is false)" in summary(off)
