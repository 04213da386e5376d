"""The role pyqmail_scanners run for real by ansible-playbook (local connection) against our own
svscan on a temporary service directory: rspamd and clamd come up under supervise with their
log services (svstat ``up``) and a ``conftest`` that passes, answer on the addresses the role
wrote into the listeners' control files (GTUBE rejected, EICAR found, by pyqmail's own
clients), a second run changes
nothing, and turning them off unlinks them and removes their control files. A host without a
ClamAV database gets one clear error. Only paths of this test are touched: the play runs the
role's tasks with the qmail root, the service directory, rspamd's configuration directory
(``rspamd.conf`` linked to Debian's), its database and run directories and clamd's
configuration, database and socket all in a temporary directory.

The preflight's checks of the role's variables are at the end (in process, one line each).
"""

from __future__ import annotations

import asyncio
import copy
import io
import os
import pwd
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyqmail.scan import clamd, rspamd
from pyqmail.scan.settings import DEFAULT_ACTIONS, load, parse_address
from tests.roles.playbook import REPO, results_by_task, run_role_tasks
from tests.roles.scanner_host import scratch_vars
from tests.roles.test_preflight import problems_of
from tests.scanners import (
    EICAR,
    GTUBE,
    auth_module_conf,
    eicar_database,
    free_port,
    with_attachment,
)
from tests.svscan import own_svscan

ROLE = REPO / "roles" / "pyqmail_scanners"
ENV = rspamd.Envelope("192.0.2.1", "client.test", "a@client.test", ("u@mx.test",))


def chown(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)


@pytest.fixture
def host() -> Iterator[Path]:
    """A scratch host: svscan on <base>/service, rspamd's and clamd's directories."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-scanners-role-"))
    base.chmod(0o755)
    service = base / "service"
    service.mkdir()
    conf = base / "rspamd"
    (conf / "local.d").mkdir(parents=True)
    (conf / "override.d").mkdir()
    (conf / "rspamd.conf").symlink_to("/etc/rspamd/rspamd.conf")
    (base / "tld.dat").write_text("com\norg\ntest\n")
    # What only a test wants (start-up in a second); the role does not manage these. DNS and
    # the modules that reach other hosts are the role's (run_role: offline, as molecule).
    (conf / "override.d" / "options.inc").write_text(
        f'disable_hyperscan = true;\nurl_tld = "{base / "tld.dat"}";\n'
    )
    for worker in ("controller", "proxy"):
        (conf / "override.d" / f"worker-{worker}.inc").write_text(
            f'bind_socket = "127.0.0.1:{free_port()}";\n'
        )
    (base / "rspamd-db").mkdir()
    chown(base / "rspamd-db", "_rspamd")
    eicar_database(base / "clamdb")
    (base / "clamd-run").mkdir()
    chown(base / "clamd-run", "clamav")
    for path in [conf, *conf.rglob("*"), base / "clamdb", *(base / "clamdb").iterdir()]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        with own_svscan(service, base / "qmail" / "supervise", base / "svscan.log", settle=15):
            yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_role(base: Path, **more: object) -> dict[str, list[dict[str, Any]]]:
    """The role's tasks and handlers (with the role pyqmail's handlers), as the role runs them;
    task name -> results on localhost. Fails the test if the play fails, unless asked."""
    extra = {
        **scratch_vars(base),
        "pyqmail_scanners__rspamd_enabled": True,
        "pyqmail_scanners__clamav_enabled": True,
        "pyqmail_scanners__rspamd_listen": f"127.0.0.1:{free_port()}",
        "pyqmail_scanners__clamd_listen": str(base / "clamd-run" / "clamd.sock"),
        "pyqmail_scanners__rspamd_confdir": str(base / "rspamd"),
        "pyqmail_scanners__rspamd_rundir": str(base / "rspamd-run"),
        "pyqmail_scanners__rspamd_dbdir": str(base / "rspamd-db"),
        "pyqmail_scanners__clamd_config": str(base / "clamd.conf"),
        "pyqmail_scanners__clamav_database_dir": str(base / "clamdb"),
        "pyqmail_scanners__rspamd_dns_servers": ["127.0.0.1:1"],
        "pyqmail_scanners__rspamd_offline": True,
        # No packaged init scripts there: this machine's boot links stay as they are (the
        # role disables them on a host without systemd: test_packaged_services.py).
        "pyqmail_scanners__rspamd_init_script": str(base / "init.d" / "rspamd"),
        "pyqmail_scanners__clamd_init_script": str(base / "init.d" / "clamav-daemon"),
        # The tasks are included, not run as a role: where the role's lookups find the
        # other roles' defaults (pyqmail_control__authchecks).
        "role_path": str(ROLE),
        **more,
    }
    (base / "qmail" / "control").mkdir(parents=True, exist_ok=True)
    (base / "qmail" / "supervise").mkdir(exist_ok=True)
    out = run_role_tasks(
        ("pyqmail_scanners",),
        base,
        extra,
        must_pass=False,
        before=[
            {
                "name": "What the role pyqmail notes once per run (pyqmail__debian_packages), "
                "as it does",
                "ansible.builtin.import_tasks": str(
                    REPO / "roles" / "pyqmail" / "tasks" / "host.yml"
                ),
            }
        ],
        gather_subset=["!all"],
        timeout=600,
    )
    ran = results_by_task(out)
    ran["_stats"] = [out["stats"]["localhost"]]
    return ran


def source_tree() -> bytes:
    """Harmless mail over one of clamd's limits: a zip of 10,050 small text files (a source
    tree, 1.4 MB), more than clamd's MaxFiles (10000)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(10_050):
            archive.writestr(f"src/mod{i // 100}/file{i}.py", f"# module {i}\nvalue = {i}\n")
    return out.getvalue()


def svstat(path: Path) -> str:
    done = subprocess.run(["svstat", str(path)], capture_output=True, text=True, check=False)
    return done.stdout


def failures(ran: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [
        f"{name}: {result.get('msg')}"
        for name, results in ran.items()
        for result in results
        if result.get("failed")
    ]


def test_the_role_runs_the_scanners_and_names_them_to_the_listeners(host: Path) -> None:
    ran = run_role(host)
    assert not failures(ran), failures(ran)
    service = host / "service"
    for name in ("rspamd", "rspamd/log", "clamd", "clamd/log"):
        assert ": up (pid " in svstat(service / name), svstat(service / name)
    for name in ("rspamd", "clamd"):  # what the upgrade hook runs first: the running config is OK
        check = subprocess.run(
            ["./conftest"], cwd=service / name, capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, (name, check.stderr)  # rspamadm warns, on stderr
    control = host / "qmail" / "control"
    settings = load(control)
    assert settings.rspamd is not None and settings.clamd is not None
    assert str(settings.clamd) == str(host / "clamd-run" / "clamd.sock")
    assert (settings.timeout, settings.tempfail, settings.clients) == (20, True, {"inbound"})
    assert dict(settings.actions) == dict(DEFAULT_ACTIONS)
    assert (settings.rspamd_max, settings.clamd_max) == (52428800, 104857600)
    assert (control / "rspamdmaxsize").read_text().split() == ["52428800"]
    conf = host / "rspamd"
    # the scanners take the headroom above the control files: our Received field and
    # Authentication-Results ride on the client's bytes, which the control files bound
    assert "max_message = 53477376;" in (conf / "local.d" / "options.inc").read_text()
    clamd_conf = (host / "clamd.conf").read_text().splitlines()
    assert {"StreamMaxLength 105906176", "MaxFileSize 105906176"} <= set(clamd_conf), clamd_conf
    # a scan stopped at a limit is "Heuristics.Limits.Exceeded.<limit> FOUND", never "OK"
    assert {"AlertExceedsMax true", "MaxScanTime 120000"} <= set(clamd_conf), clamd_conf
    for module in ("spf", "dkim", "dmarc", "arc", "dkim_signing"):
        assert "enabled = false;" in (conf / "local.d" / f"{module}.conf").read_text()
    assert "reject = 15.0;" in (conf / "local.d" / "actions.conf").read_text()
    assert "rewrite_subject = null;" in (conf / "local.d" / "actions.conf").read_text()
    assert 'nameserver = ["127.0.0.1:1"];' in (conf / "local.d" / "options.inc").read_text()
    offline = (conf / "rspamd.conf.local.override").read_text()
    assert "fuzzy_check { enabled = false; }" in offline
    assert "rbl { enabled = false; }" in offline

    gtube = b"From: <a@client.test>\r\nTo: <u@mx.test>\r\nSubject: x\r\n\r\n" + GTUBE + b"\r\n"
    spam = asyncio.run(rspamd.check(settings.rspamd, ENV, gtube))
    assert spam.action == "reject"
    virus = asyncio.run(clamd.scan(settings.clamd, with_attachment(EICAR)))
    assert virus == "Eicar-Test-Signature.UNOFFICIAL"
    # the price of the alert: harmless mail over a limit is answered as not scanned completely
    # (the listeners refuse it, 554)
    tree = with_attachment(source_tree())
    assert asyncio.run(clamd.scan(settings.clamd, tree)) == "Heuristics.Limits.Exceeded.MaxFiles"
    assert (host / "log" / "rspamd" / "current").exists()

    again = run_role(host, pyqmail_scanners__rspamd_listen=str(settings.rspamd))
    assert again["_stats"][0]["changed"] == 0, [
        name for name, results in again.items() for r in results if r.get("changed")
    ]

    # An admin's own module file in local.d (phishing.conf) that rspamd cannot read, then a
    # run that changes a threshold (a restart): the handler's check refuses, naming rspamd's
    # error, and the running rspamd keeps its pid instead of being restarted into one that
    # cannot start.
    before = svstat(service / "rspamd")
    (conf / "local.d" / "phishing.conf").write_text("this is { not rspamd configuration\n")
    (conf / "local.d" / "phishing.conf").chmod(0o644)
    broken = run_role(
        host,
        pyqmail_scanners__rspamd_listen=str(settings.rspamd),
        pyqmail_scanners__thresholds={"reject": 16, "add_header": 6, "greylist": 4},
    )
    [problem] = failures(broken)
    assert problem.startswith("Refuse to restart rspamd into a configuration"), problem
    assert "rspamd not restarted, it keeps running as it was" in problem
    assert "phishing.conf" in problem, problem
    assert "Restart rspamd (svc -t)" not in broken
    assert (
        svstat(service / "rspamd").split("(pid ")[1].split(")")[0]
        == (before.split("(pid ")[1].split(")")[0])
    )
    note = host / "qmail" / "supervise" / "rspamd" / "restart-pending"
    assert note.is_file()  # the restart the new threshold needs stays due

    # The admin's file removed: the next run changes no file, and still restarts rspamd into
    # the new threshold (the note), then forgets it.
    (conf / "local.d" / "phishing.conf").unlink()
    fixed = run_role(
        host,
        pyqmail_scanners__rspamd_listen=str(settings.rspamd),
        pyqmail_scanners__thresholds={"reject": 16, "add_header": 6, "greylist": 4},
    )
    assert not failures(fixed), failures(fixed)
    assert [r.get("changed") for r in fixed["Restart rspamd (svc -t)"]] == [True]
    assert ": up (pid " in svstat(service / "rspamd")
    assert svstat(service / "rspamd").split("(pid ")[1] != before.split("(pid ")[1]
    assert not note.exists()

    # The admin turns the alert off (pyqmail_scanners__clamd_alert_exceeds_max false): clamd's
    # own default, restarted into it; the same source tree is answered clean, the other
    # limits stay as they were.
    clamd_before = svstat(service / "clamd")
    lenient = run_role(
        host,
        pyqmail_scanners__rspamd_listen=str(settings.rspamd),
        pyqmail_scanners__thresholds={"reject": 16, "add_header": 6, "greylist": 4},
        pyqmail_scanners__clamd_alert_exceeds_max=False,
    )
    assert not failures(lenient), failures(lenient)
    lenient_conf = (host / "clamd.conf").read_text().splitlines()
    assert "AlertExceedsMax false" in lenient_conf, lenient_conf
    assert [line for line in clamd_conf if not line.startswith("AlertExceedsMax ")] == [
        line for line in lenient_conf if not line.startswith("AlertExceedsMax ")
    ]
    assert [r.get("changed") for r in lenient["Restart clamd (svc -t)"]] == [True]
    assert ": up (pid " in svstat(service / "clamd")
    assert svstat(service / "clamd").split("(pid ")[1] != clamd_before.split("(pid ")[1]
    assert asyncio.run(clamd.scan(settings.clamd, tree)) is None

    off = run_role(
        host,
        pyqmail_scanners__rspamd_enabled=False,
        pyqmail_scanners__clamav_enabled=False,
    )
    assert not failures(off), failures(off)
    assert not (control / "rspamd").exists()
    assert not (control / "clamd").exists()
    assert not (control / "rspamdmaxsize").exists()
    assert not (control / "clamdmaxsize").exists()
    assert not (service / "rspamd").exists()
    assert not (service / "clamd").exists()
    assert not load(control).enabled


def test_clamav_without_a_database_is_one_clear_error(host: Path) -> None:
    empty = host / "empty-db"
    empty.mkdir()
    ran = run_role(
        host,
        pyqmail_scanners__rspamd_enabled=False,
        pyqmail_scanners__clamav_database_dir=str(empty),
    )
    [problem] = failures(ran)
    assert "holds no signature database" in problem, problem
    assert "pyqmail_scanners__clamav_database_dir" in problem
    assert not (host / "qmail" / "control" / "clamd").exists()


def test_rspamd_computes_spf_dkim_dmarc_only_when_pyqmail_does_not() -> None:
    """One side owns each check: the role's template for rspamd's spf, dkim, dmarc and arc
    modules (pyqmail_scanners__pyqmail_checks follows pyqmail_control__authchecks)."""
    assert "\nenabled = false;\n" in auth_module_conf(pyqmail_checks=True)
    assert "\nenabled = true;\n" in auth_module_conf(pyqmail_checks=False)
    assert "enabled = false" not in auth_module_conf(pyqmail_checks=False)


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "rspamd-not-loopback": (
        {"pyqmail_scanners__rspamd_listen": "192.0.2.7:11333"},
        "pyqmail_scanners__rspamd_listen: '192.0.2.7:11333' is not a loopback address: the role"
        " runs the scanner on this host, listening on loopback or a Unix socket only"
        " (127.0.0.1:port, [::1]:port or /socket/path)",
    ),
    "rspamd-host-name": (
        {"pyqmail_scanners__rspamd_listen": "localhost:11333"},
        "pyqmail_scanners__rspamd_listen: 'localhost:11333' is not an address: give a loopback"
        " ip:port, [ipv6]:port or /socket/path",
    ),
    "clamd-no-port": (
        {"pyqmail_scanners__clamd_listen": "127.0.0.1:"},
        "pyqmail_scanners__clamd_listen: '127.0.0.1:' has no port from 1 to 65535 after the"
        " last ':' ('')",
    ),
    "threshold-not-a-number": (
        {"pyqmail_scanners__thresholds": {"reject": "high", "add_header": 6}},
        "pyqmail_scanners__thresholds.reject: 'high' is not a score (a number such as 6 or 7.5,"
        " or null)",
    ),
    "thresholds-out-of-order": (
        {"pyqmail_scanners__thresholds": {"reject": 5, "add_header": 6, "greylist": 4}},
        "pyqmail_scanners__thresholds.reject: 5 is not above add_header (6); the thresholds must"
        " grow from greylist to reject",
    ),
    "threshold-unknown-action": (
        {"pyqmail_scanners__thresholds": {"reject": 15, "discard": 20}},
        "pyqmail_scanners__thresholds: unknown key 'discard' (known: reject, add_header,"
        " rewrite_subject, greylist)",
    ),
    "action-unknown": (
        {"pyqmail_scanners__actions": {"reject": "refuse", "quarantine": "junk"}},
        "pyqmail_scanners__actions: unknown key 'quarantine' (known: reject, soft_reject,"
        " rewrite_subject, add_header, greylist, no_action)",
    ),
    "action-reply-unknown": (
        {"pyqmail_scanners__actions": {"reject": "bounce"}},
        "pyqmail_scanners__actions.reject: 'bounce' is not one of refuse, defer, junk, accept",
    ),
    "dns-server-name": (
        {"pyqmail_scanners__rspamd_dns_servers": ["127.0.0.1:53", "resolver.example:53"]},
        "pyqmail_scanners__rspamd_dns_servers[1]: 'resolver.example:53' is not an IP address and"
        " port: give ip:port or [ipv6]:port (127.0.0.1:53)",
    ),
    "dns-server-no-port": (
        {"pyqmail_scanners__rspamd_dns_servers": ["192.0.2.53"]},
        "pyqmail_scanners__rspamd_dns_servers[0]: '192.0.2.53' is not an IP address and port:"
        " give ip:port or [ipv6]:port (127.0.0.1:53)",
    ),
    "dns-server-ipv6-unbracketed": (
        {"pyqmail_scanners__rspamd_dns_servers": ["::1:53"]},
        "pyqmail_scanners__rspamd_dns_servers[0]: '::1:53' is not an IP address and port: give"
        " ip:port or [ipv6]:port (127.0.0.1:53)",
    ),
    "dns-server-port": (
        {"pyqmail_scanners__rspamd_dns_servers": ["127.0.0.1:65536"]},
        "pyqmail_scanners__rspamd_dns_servers[0]: '127.0.0.1:65536' has no port from 1 to 65535"
        " after the last ':' ('65536')",
    ),
    "timeout": (
        {"pyqmail_scanners__timeout": 0},
        "pyqmail_scanners__timeout: 0 is out of range: must be from 1 to 300",
    ),
    "clients": (
        {"pyqmail_scanners__clients": ["inbound", "everyone"]},
        "pyqmail_scanners__clients[1]: 'everyone' is not one of inbound, relay, auth",
    ),
    "clamd-smaller-than-databytes": (
        {
            "pyqmail_scanners__clamav_enabled": True,
            "pyqmail_scanners__clamd_max_size": 10_000_000,
            "pyqmail_control__databytes": 20_000_000,
        },
        "pyqmail_scanners__clamd_max_size: 10000000 is smaller than pyqmail_control__databytes"
        " (20000000): the listeners would take messages clamd cannot scan, and accept them"
        " unscanned",
    ),
    "rspamd-smaller-than-databytes": (
        {
            "pyqmail_scanners__rspamd_enabled": True,
            "pyqmail_scanners__rspamd_max_size": 10_000_000,
            "pyqmail_control__databytes": 20_000_000,
        },
        "pyqmail_scanners__rspamd_max_size: 10000000 is smaller than pyqmail_control__databytes"
        " (20000000): the listeners would take messages rspamd cannot scan, and accept them"
        " unscanned",
    ),
    "rspamd-max-size-tiny": (
        {"pyqmail_scanners__rspamd_enabled": True, "pyqmail_scanners__rspamd_max_size": 1000},
        "pyqmail_scanners__rspamd_max_size: 1000 is out of range: must be 1048576 (1 MiB) or more",
    ),
    "scan-env": (
        {"pyqmail__listener_env": {"submission": {"SCAN": "yes"}}},
        "pyqmail__listener_env.submission.SCAN: 'yes' is not '', 0 (not scanned) or 1 (scanned)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_one_bad_value_is_one_clear_line(case: str) -> None:
    overrides, line = BAD[case]
    assert problems_of(copy.deepcopy(overrides)) == [line]


def test_the_defaults_and_good_values_pass() -> None:
    assert problems_of({}) == []
    good = {
        "pyqmail_scanners__rspamd_enabled": True,
        "pyqmail_scanners__clamav_enabled": True,
        "pyqmail_scanners__rspamd_listen": "[::1]:11333",
        "pyqmail_scanners__clamd_listen": "127.0.0.1:3310",
        "pyqmail_scanners__thresholds": {"reject": "20.5", "add_header": 7, "greylist": None},
        "pyqmail__listener_env": {"submission": {"SCAN": "1"}, "smtp": {"SCAN": ""}},
        "pyqmail_scanners__rspamd_dns_servers": ["127.0.0.1:1", "192.0.2.53:53", "[::1]:53"],
        "pyqmail_scanners__rspamd_offline": True,
    }
    assert problems_of(good) == []
    assert parse_address(good["pyqmail_scanners__rspamd_listen"], "x").port == 11333
