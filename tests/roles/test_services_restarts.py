"""The role pyqmail_services run for real (its tasks and handlers, the role pyqmail's handlers)
against our own svscan on a scratch service directory, with this checkout's pyqmail-smtpd and
pyqmail-send as the supervised daemons over a scratch qmail root, on free loopback ports.

What a run changes on a running host: a changed run script restarts its service even when the
run ends before its handlers (the note ``restart-pending`` the next run reads).
Only paths of this test are touched.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, listeners_root
from tests.roles.playbook import results_by_task, run_role_tasks
from tests.roles.test_conftests import VENV
from tests.scanners import free_port
from tests.svscan import own_svscan

pytestmark = [
    pytest.mark.skipif(shutil.which("svscan") is None, reason="needs daemontools"),
    pytest.mark.skipif(not IS_ROOT, reason="the services bind, then drop to their users"),
]

SERVICES = ("qmail-smtpd", "qmail-smtpd-ssl", "qmail-smtpd-tls", "qmail-send")


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch tree outside pytest's tmp_path (the daemons' users must read it)."""
    path = Path(tempfile.mkdtemp(prefix="pyqmail-services-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host(base: Path, pki: PKI) -> Iterator[QmailRoot]:
    """The qmail root the daemons load, svscan on <base>/service."""
    qmail = listeners_root(base / "qmail", pki)
    (qmail.path / "supervise").mkdir()
    (base / "service").mkdir()
    with own_svscan(
        base / "service",
        qmail.path / "supervise",
        base / "svscan.log",
        stragglers_under=qmail.path,
        settle=15,
    ):
        yield qmail


def extra_vars(qmail: QmailRoot, **more: Any) -> dict[str, Any]:
    """The role's variables for the scratch host (the ports: ``more``'s, else free ones)."""
    base = qmail.path.parent
    return {
        "pyqmail__root": str(qmail.path),
        "pyqmail__service_dir": str(base / "service"),
        "pyqmail__log_dir": str(base / "log"),
        "pyqmail__venv": str(VENV),
        "pyqmail__rules_path": str(qmail.path / "etc" / "smtp"),
        "pyqmail__listener_env": {"submission": {"FORCETLS": "0"}},
        "pyqmail__listen_ip": "127.0.0.1",
        "pyqmail__check_fresh": False,
        **{
            f"pyqmail__{user}_user": DROP_USER
            for user in ("smtpd", "send", "remote", "mailbox", "log")
        },
        "pyqmail_services__ports": {
            "smtp": free_port(),
            "smtps": free_port(),
            "submission": free_port(),
        },
        "pyqmail_services__workers": "1",
        "pyqmail_services__softlimit": 0,
        "pyqmail_services__wait": 1,
        "pyqmail_services__timeout": 20,
        "pyqmail_services__fail2ban": False,
        "pyqmail_services__summary": False,
        **more,
    }


def run_role(
    qmail: QmailRoot, extra: dict[str, Any], after: list[dict[str, Any]] | None = None
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The role's tasks and handlers, then ``after``: (stats, task name -> its results)."""
    out = run_role_tasks(
        ("pyqmail_services",), qmail.path.parent, extra, must_pass=False, after=after
    )
    return out["stats"]["localhost"], results_by_task(out)


def svstat_pid(service: Path) -> int:
    """The pid svstat shows for an up service (0 when it is not up)."""
    done = subprocess.run(["svstat", str(service)], capture_output=True, text=True, check=False)
    words = done.stdout.split()
    return int(words[3].rstrip(")")) if len(words) > 3 and words[1] == "up" else 0


def pids(qmail: QmailRoot) -> dict[str, int]:
    service = qmail.path.parent / "service"
    return {name: svstat_pid(service / name) for name in SERVICES}


def test_a_changed_run_script_restarts_its_service_though_the_run_ended_first(
    host: QmailRoot,
) -> None:
    extra = extra_vars(host)
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats
    before = pids(host)
    assert all(before.values()), before

    # pyqmail_services__workers changes every listener's run script; the run fails before
    # its handlers (a wait that cannot succeed; no force_handlers in this play), as a Ctrl-C
    # or a lost connection would end it.
    doomed = {"pyqmail_services__wait": 5, "pyqmail_services__timeout": 1}
    stats, ran = run_role(host, {**extra, "pyqmail_services__workers": "2", **doomed})
    assert stats["failures"] == 1, stats
    assert (
        "Restart the services whose run script changed (svc -t, then check they stay up)" not in ran
    )
    supervise = host.path / "supervise"
    assert sorted(p.parent.name for p in supervise.glob("*/restart-pending")) == sorted(
        SERVICES[:3]
    )
    assert pids(host) == before  # still the old command lines

    stats, ran = run_role(host, {**extra, "pyqmail_services__workers": "2"})
    assert stats["failures"] == 0, stats
    restarted = ran[
        "Restart the services whose run script changed (svc -t, then check they stay up)"
    ]
    assert sorted(r["item"] for r in restarted[0]["results"]) == sorted(SERVICES[:3])
    after = pids(host)
    assert all(after[name] != before[name] for name in SERVICES[:3]), (before, after)
    assert after["qmail-send"] == before["qmail-send"]
    assert list(supervise.glob("*/restart-pending")) == []
    stats, _ = run_role(host, {**extra, "pyqmail_services__workers": "2"})
    assert (stats["failures"], stats["changed"]) == (0, 0), stats
