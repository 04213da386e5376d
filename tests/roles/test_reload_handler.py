"""The listeners' reload handler, run for real by ansible-playbook (local connection).

A play notifies ``pyqmail reload listeners`` with the role pyqmail's own handlers imported;
a real ``supervise`` runs the linked ``qmail-smtpd`` service. With a good configuration the
handler's ``pyqmail-smtpd --check`` passes and ``svc -h`` follows; with a broken one the run
fails with the daemon's own message and nothing is signalled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, listeners_root
from tests.roles.playbook import results_by_task, run_role_tasks

VENV = Path(sys.executable).parents[1]
CHECK_TASK = (
    "Validate the daemon and its configuration before signalling it (pyqmail-smtpd --check)"
)
REFUSE_TASK = "Refuse to signal the listeners with a configuration they cannot load"
RELOAD_TASK = "Reload the SMTP listeners (svc -h)"


def _supervised(base: Path, name: str) -> tuple[Path, subprocess.Popen[bytes]]:
    """A real supervise running ``sleep`` as service ``name``, linked into base/service."""
    service = base / "supervise" / name
    service.mkdir(parents=True)
    (service / "run").write_text("#!/bin/sh\nexec sleep 600\n")
    (service / "run").chmod(0o755)
    (base / "service").mkdir(exist_ok=True)
    (base / "service" / name).symlink_to(service)
    proc = subprocess.Popen(["supervise", str(service)])
    for _ in range(100):
        if (service / "supervise" / "ok").exists():
            break
        time.sleep(0.05)
    return service, proc


@pytest.fixture
def host(pki: PKI) -> Iterator[QmailRoot]:
    """A qmail root, its rules cdbs, and supervised (sleeping) qmail-smtpd and qmail-smtpd-tls
    services."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-handler-"))
    base.chmod(0o755)
    root = listeners_root(base / "qmail", pki)
    services = [_supervised(base, name) for name in ("qmail-smtpd", "qmail-smtpd-tls")]
    try:
        yield root
    finally:
        for service, proc in services:
            subprocess.run(["svc", "-dx", str(service)], check=False)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def run_play(root: QmailRoot, **more: object) -> dict[str, list[dict[str, Any]]]:
    """Notify ``pyqmail reload listeners``; task name -> its results on localhost."""
    base = root.path.parent
    out = run_role_tasks(
        (),
        base,
        {
            "pyqmail__root": str(root.path),
            "pyqmail__service_dir": str(base / "service"),
            "pyqmail__venv": str(VENV),
            "pyqmail__rules_path": str(root.path / "etc" / "smtp"),
            "pyqmail__smtpd_user": DROP_USER if IS_ROOT else os.environ.get("USER", "root"),
            **more,
        },
        must_pass=False,
        before=[
            {
                "name": "Pretend a control file changed",
                "ansible.builtin.command": "true",
                "changed_when": True,
                "notify": "pyqmail reload listeners",
            }
        ],
    )
    return results_by_task(out)


def test_good_configuration_is_checked_then_signalled(host: QmailRoot) -> None:
    # No listener with rules of its own: neither an environment nor the file of one.
    (host.path / "etc" / "smtp-submission.cdb").unlink()
    ran = run_play(host)
    check = ran[CHECK_TASK][0]
    assert not check.get("failed"), check
    smtp, submission = check["results"]
    for result, mode in ((smtp, "smtp"), (submission, "submission")):
        assert result["rc"] == 0, result
        assert result["cmd"][result["cmd"].index("--mode") + 1] == mode
        assert result["cmd"][result["cmd"].index("--rules") + 1] == str(
            host.path / "etc" / "smtp.cdb"
        )
        assert result["stdout"].startswith("pyqmail-smtpd: configuration of")
        assert f"--mode {mode} OK" in result["stdout"]
    assert ran[REFUSE_TASK][0].get("skipped")
    assert ran[RELOAD_TASK][0].get("changed") and not ran[RELOAD_TASK][0].get("failed")


def test_broken_configuration_fails_with_the_daemons_message_and_signals_nothing(
    host: QmailRoot,
) -> None:
    host.control("databytes", "ten\n")
    ran = run_play(host)
    refuse = ran[REFUSE_TASK][0]
    assert refuse.get("failed"), refuse
    assert refuse["msg"].startswith("not reloaded, the running daemons keep their old state: ")
    assert (
        f"pyqmail-smtpd: fatal: {host.path}/control/databytes:1: not a non-negative integer: 'ten'"
        in refuse["msg"]
    )
    assert RELOAD_TASK not in ran


def test_each_listener_is_checked_with_its_own_rules_cdb(host: QmailRoot) -> None:
    """A listener with an environment of its own reads <rules>-<kind>.cdb: a corrupt one
    stops the reload of every listener, naming that file; the other listener's check passed."""
    own = host.write("etc/smtp-submission.cdb", b"\x00" * 100)
    ran = run_play(host, pyqmail__listener_env={"submission": {"FORCETLS": "0"}})
    smtp, submission = ran[CHECK_TASK][0]["results"]
    assert smtp["rc"] == 0, smtp
    assert submission["rc"] == 111
    assert submission["cmd"][submission["cmd"].index("--rules") + 1] == str(own)
    refuse = ran[REFUSE_TASK][0]
    assert refuse.get("failed"), refuse
    assert f"pyqmail-smtpd: fatal: {own}: " in refuse["msg"]
    assert RELOAD_TASK not in ran


def test_a_listener_that_lost_its_environment_is_checked_with_the_rules_it_still_loads(
    host: QmailRoot,
) -> None:
    """The submission listener's entry left pyqmail__listener_env, and pyqmail_services has not
    restarted it yet: it still loads <rules>-submission.cdb (pyqmail_rules keeps that file
    up to date until then), so its reload is checked with that file, not <rules>.cdb."""
    own = host.write("etc/smtp-submission.cdb", b"\x00" * 100)
    ran = run_play(host, pyqmail__listener_env={})
    smtp, submission = ran[CHECK_TASK][0]["results"]
    assert smtp["rc"] == 0, smtp
    assert smtp["cmd"][smtp["cmd"].index("--rules") + 1] == str(host.path / "etc" / "smtp.cdb")
    assert submission["cmd"][submission["cmd"].index("--rules") + 1] == str(own)
    assert submission["rc"] == 111
    refuse = ran[REFUSE_TASK][0]
    assert refuse.get("failed"), refuse
    assert f"pyqmail-smtpd: fatal: {own}: " in refuse["msg"]
    assert RELOAD_TASK not in ran
