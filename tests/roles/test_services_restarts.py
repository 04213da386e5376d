"""The role pyqmail_services run for real (its tasks and handlers, the role pyqmail's handlers)
against our own svscan on a scratch service directory, with this checkout's pyqmail-smtpd and
pyqmail-send as the supervised daemons over a scratch qmail root, on free loopback ports.

What a run changes on a running host: a changed run script restarts its service even when the
run ends before its handlers (the note ``restart-pending`` the next run reads).
Only paths of this test are touched.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, listeners_root
from tests.roles.playbook import results_by_task, run_role_tasks
from tests.roles.test_conftests import VENV
from tests.roles.test_scanner_log_restart import writes_into
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


RESTART_LOGS = "Restart the log services whose run script changed (svc -t)"


def test_a_changed_log_run_script_restarts_the_log_services_though_the_run_ended_first(
    host: QmailRoot,
) -> None:
    """pyqmail__log_dir changes every log run script; the run ends before its handlers: each
    log service's note (<service>/log/restart-pending) stays, and the next run, whose log run
    scripts no longer change, restarts the log services alone (multilog writes into the new
    directory). --check in between reports those restarts and signals nothing."""
    extra = extra_vars(host)
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats
    service = host.path.parent / "service"
    before = pids(host)
    loggers = {name: svstat_pid(service / name / "log") for name in SERVICES}
    assert all(loggers.values()), loggers
    moved = {**extra, "pyqmail__log_dir": str(host.path.parent / "log2")}

    out = run_role_tasks(("pyqmail_services",), host.path.parent, moved, "--check", must_pass=False)
    stats, ran = out["stats"]["localhost"], results_by_task(out)
    assert stats["failures"] == 0, stats
    planned = ran[RESTART_LOGS][0]
    assert planned.get("changed"), planned
    assert sorted(r["item"] for r in planned["results"]) == sorted(SERVICES)
    assert {name: svstat_pid(service / name / "log") for name in SERVICES} == loggers

    doomed = {"pyqmail_services__wait": 5, "pyqmail_services__timeout": 1}
    stats, ran = run_role(host, {**moved, **doomed})
    assert stats["failures"] == 1, stats
    assert RESTART_LOGS not in ran
    supervise = host.path / "supervise"
    notes = sorted(p.parent.parent.name for p in supervise.glob("*/log/restart-pending"))
    assert notes == sorted(SERVICES)
    assert {name: svstat_pid(service / name / "log") for name in SERVICES} == loggers

    stats, ran = run_role(host, moved)
    assert stats["failures"] == 0, stats
    assert sorted(r["item"] for r in ran[RESTART_LOGS][0]["results"]) == sorted(SERVICES)
    for name in SERVICES:
        logger = svstat_pid(service / name / "log")
        assert logger and logger != loggers[name], name
        assert writes_into(logger) == str(host.path.parent / "log2" / name)
    assert pids(host) == before  # the daemons themselves did not restart
    assert list(supervise.glob("*/log/restart-pending")) == []
    stats, _ = run_role(host, moved)
    assert (stats["failures"], stats["changed"]) == (0, 0), stats


def run_rules(qmail: QmailRoot, listener_env: dict[str, Any]) -> None:
    """The role pyqmail_rules alone (what playbooks/config.yml runs) for ``listener_env``."""
    out = run_role_tasks(
        ("pyqmail_rules",),
        qmail.path.parent / "config-play",
        {
            "pyqmail__rules_path": str(qmail.path / "etc" / "smtp"),
            "pyqmail__listener_env": listener_env,
            "pyqmail__service_dir": str(qmail.path.parent / "service"),
            "pyqmail__root": str(qmail.path),
            "pyqmail__venv": str(VENV),
            "pyqmail__smtpd_user": DROP_USER,
            "pyqmail__check_fresh": False,
            "pyqmail_rules__relay_clients": ["127.0.0.1"],
        },
    )
    assert out["stats"]["localhost"]["failures"] == 0


def test_the_rules_of_a_listener_that_lost_its_environment_stay_until_its_run_script_changed(
    host: QmailRoot,
) -> None:
    """pyqmail__listener_env loses the submission listener's entry: the config play alone
    keeps smtp-submission.cdb, which the running listener's command line names (it restarts
    on it); the services play rewrites the run script, restarts the listener and only then
    removes the file."""
    extra = extra_vars(host)
    own = host.path / "etc" / "smtp-submission.cdb"
    run_rules(host, extra["pyqmail__listener_env"])
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats
    run_script = host.path / "supervise" / "qmail-smtpd-tls" / "run"
    assert f"--rules {own} " in run_script.read_text()

    run_rules(host, {})
    assert own.is_file()  # the running listener's command line names it
    tls = host.path.parent / "service" / "qmail-smtpd-tls"
    subprocess.run(["svc", "-t", str(tls)], check=True)
    time.sleep(1.5)
    started = svstat_pid(tls)
    time.sleep(2)  # it stays up (a missing rules cdb: it would exit and restart every second)
    assert started and svstat_pid(tls) == started
    stats, _ = run_role(host, {**extra, "pyqmail__listener_env": {}})
    assert stats["failures"] == 0, stats
    assert f"--rules {host.path / 'etc' / 'smtp.cdb'} " in run_script.read_text()
    assert not own.exists()
    assert not (host.path / "etc" / "smtp-submission").exists()
    assert svstat_pid(host.path.parent / "service" / "qmail-smtpd-tls")
    # the listeners' notes count the file's removal: the next run has nothing to reload
    stats, ran = run_role(host, {**extra, "pyqmail__listener_env": {}})
    assert (stats["failures"], stats["changed"]) == (0, 0), (stats, ran.get(RELOAD_DUE))


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (
            {"pyqmail_services__workers": "300"},
            "pyqmail-smtpd: fatal: --workers '300': expected 'auto' or a number from 1 to 256",
        ),
        (
            {"pyqmail__listen_ip": "0000::"},
            "refusing to listen on every address (name the host's IP, or pass --allow-wildcard)",
        ),
    ],
)
def test_a_run_script_its_daemon_refuses_does_not_replace_the_running_listener(
    host: QmailRoot, change: dict[str, Any], refusal: str
) -> None:
    """A value the preflight would refuse, reaching the run script anyway: the handler runs the
    new command line with --check first, refuses the restart with the daemon's words, and the
    listeners keep running; the restart stays due."""
    extra = extra_vars(host)
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats
    before = pids(host)
    stats, ran = run_role(host, {**extra, **change})
    assert stats["failures"] == 1, stats
    failed = ran["Refuse to restart a service into a command line its daemon refuses"][0]
    assert failed["msg"].startswith(
        "not restarted, the running services keep their old command line: qmail-smtpd: "
    ), failed["msg"]
    assert refusal in failed["msg"]
    assert (
        "Restart the services whose run script changed (svc -t, then check they stay up)" not in ran
    )
    assert pids(host) == before
    assert sorted(p.parent.name for p in (host.path / "supervise").glob("*/restart-pending")) == [
        "qmail-smtpd",
        "qmail-smtpd-ssl",
        "qmail-smtpd-tls",
    ]
    stats, _ = run_role(host, extra)  # the value fixed: the due restarts run
    assert stats["failures"] == 0, stats
    assert list((host.path / "supervise").glob("*/restart-pending")) == []


def greeting(port: int) -> bytes:
    """The first bytes a client gets on ``port`` (a TLS listener sends none: b'')."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(2)
        try:
            return sock.recv(4)
        except TimeoutError:
            return b""


def test_a_port_moved_to_another_listener_kind_is_freed_before_the_new_one_starts(
    host: QmailRoot,
) -> None:
    """smtps on a port, then submission on it and smtps off: the old listener is stopped and
    unlinked before the new one is linked (both would share the port: SO_REUSEPORT), and the
    port answers with the submission listener's plaintext greeting only."""
    extra = extra_vars(host, pyqmail_services__listeners=["smtp", "smtps"])
    port = extra["pyqmail_services__ports"]["smtps"]
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats
    assert greeting(port) == b""  # implicit TLS: the client speaks first
    moved = {
        **extra,
        "pyqmail_services__listeners": ["smtp", "submission"],
        "pyqmail_services__ports": {**extra["pyqmail_services__ports"], "submission": port},
    }
    out = run_role_tasks(("pyqmail_services",), host.path.parent, moved)
    order = [task["task"]["name"] for task in out["plays"][0]["tasks"]]
    stop = order.index("Stop and unlink the listeners that are not wanted")
    link = order.index(
        "Link the new services into the service directory (svscan starts them together)"
    )
    assert stop < link, order
    assert not (host.path.parent / "service" / "qmail-smtpd-ssl").exists()
    assert {greeting(port) for _ in range(10)} == {b"220 "}


def advertised_size(port: int) -> str:
    """The SIZE the smtp listener on ``port`` advertises in its EHLO reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        return client.esmtp_features.get("size", "")


def size_becomes(port: int, wanted: str, seconds: float = 8.0) -> str:
    """The advertised SIZE once it is ``wanted`` (a reload is a signal: the daemon re-reads
    its files a moment later), or the last one seen after ``seconds``."""
    deadline = time.monotonic() + seconds
    seen = advertised_size(port)
    while seen != wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = advertised_size(port)
    return seen


RELOAD_DUE = "Reload the services whose files changed since their last load (handlers)"


def test_a_reload_a_run_never_got_to_is_done_by_the_next_run(host: QmailRoot) -> None:
    """A control file written by a run that ended before its handlers (here: by hand, after
    the run, with an old mtime as cp -p leaves it) differs from the listeners' note of what they
    loaded (supervise/<service>/loaded): the next run reloads them (svc -h, not a restart), and
    the one after changes nothing. pyqmail-send does not read databytes: it is not reloaded."""
    extra = extra_vars(host)
    port = extra["pyqmail_services__ports"]["smtp"]
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats
    supervise = host.path / "supervise"
    assert sorted(p.parent.name for p in supervise.glob("*/loaded")) == sorted(SERVICES)
    before = pids(host)
    written = host.control("databytes", "2000000\n")
    day_ago = time.time() - 86400
    os.utime(written, (day_ago, day_ago))  # as cp -p or a restore leaves it: an old mtime
    time.sleep(1)
    assert advertised_size(port) != "2000000"  # nothing told the listener

    stats, ran = run_role(host, extra)
    assert stats["failures"] == 0, stats
    assert size_becomes(port, "2000000") == "2000000"
    assert ran[RELOAD_DUE][0]["changed"], ran[RELOAD_DUE]
    assert "Reload the SMTP listeners (svc -h)" in ran
    assert "Reload pyqmail-send (svc -h, then check it stays up)" not in ran
    assert pids(host) == before  # reloaded, not restarted
    stats, ran = run_role(host, extra)
    assert (stats["failures"], stats["changed"]) == (0, 0), (stats, ran.get(RELOAD_DUE))


def test_a_reload_its_check_refused_is_done_once_the_files_are_mended(host: QmailRoot) -> None:
    """A reload refused by the daemon's --check leaves the listeners on their old files and no
    new note: the run that finds the file mended by hand (nothing for it to change) reloads."""
    extra = extra_vars(host)
    port = extra["pyqmail_services__ports"]["smtp"]
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats
    host.control("databytes", "lots\n")
    stats, ran = run_role(host, extra)
    assert stats["failures"] == 1, stats
    assert "Refuse to signal the listeners with a configuration they cannot load" in ran
    host.control("databytes", "3000000\n")
    assert advertised_size(port) != "3000000"
    stats, ran = run_role(host, extra)
    assert stats["failures"] == 0, stats
    assert size_becomes(port, "3000000") == "3000000"


def test_a_reload_done_by_another_play_is_not_done_again_by_the_services_play(
    host: QmailRoot,
) -> None:
    """A play that changed a control file only one daemon reads and reloaded that daemon itself
    (the config or certificates play run on its own, as molecule's multihost scenario does
    after site.yml) notes what it loaded, and the other daemon's note does not count that
    file: the next services run has nothing to reload."""
    extra = extra_vars(host)
    port = extra["pyqmail_services__ports"]["smtp"]
    stats, _ = run_role(host, extra)
    assert stats["failures"] == 0, stats

    def changed_by_another_play(handler: str) -> list[str]:
        notify = {
            "name": "A control file changed (as the config play notifies)",
            "ansible.builtin.debug": {"msg": handler},
            "changed_when": True,
            "notify": [handler],
        }
        return list(results_by_task(run_role_tasks((), host.path.parent, extra, before=[notify])))

    host.control("databytes", "2200000\n")  # the listeners' alone
    ran = changed_by_another_play("pyqmail reload listeners")
    assert "Note what the listeners loaded (supervise/<service>/loaded)" in ran, ran
    assert size_becomes(port, "2200000") == "2200000"
    stats, ran_role = run_role(host, extra)
    assert (stats["failures"], stats["changed"]) == (0, 0), (stats, ran_role.get(RELOAD_DUE))

    (host.path / "control" / "tlshosts").mkdir(exist_ok=True)
    host.control("tlshosts/mx2.example.org.pem", host.pki.ca.cert_pem)  # pyqmail-send's alone
    ran = changed_by_another_play("pyqmail reload send")
    assert "Note what pyqmail-send loaded (supervise/<service>/loaded)" in ran, ran
    stats, ran_role = run_role(host, extra)
    assert (stats["failures"], stats["changed"]) == (0, 0), (stats, ran_role.get(RELOAD_DUE))
