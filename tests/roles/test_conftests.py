"""The conftest each role writes beside a service's run script: what pyqmail-restart-stale runs
before it restarts the service after a package upgrade.

Each role's own tasks that write the configuration, the supervise directory and the conftest
run through ansible-playbook on this machine (the role's and the role pyqmail's defaults and
vars), into a temporary tree; then the conftest written runs as the tool runs it (in its
directory, as root) with the programs installed here: Dovecot's ``doveconf``, ``rspamadm``,
``clamd``, and this checkout's pyqmail-smtpd and pyqmail-send through this virtualenv. It passes
for the configuration the role wrote, and fails, with the program's own first line, once that
configuration is broken. The role pyqmail's handlers, notified then, run the very same command
and refuse to signal with the same line. No service runs: the restarts are
tests/e2e/test_restart_stale.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pyqmail.tools.restartstale import conftest
from tests.conftest import PKI
from tests.e2e.conftest import DROP_USER, IS_ROOT, QmailRoot, listeners_root
from tests.roles.playbook import ROLES, ansible_playbook, link_tree, results_by_task, run_role_tasks
from tests.roles.test_dovecot_role import TEST_HOST_VARS

VENV = Path(sys.executable).parents[1]  # its pyqmail-smtpd and pyqmail-send: this checkout's
SERVICES = ("qmail-smtpd", "qmail-smtpd-ssl", "qmail-smtpd-tls", "qmail-send")


def role_tasks(role: str, tasks_file: str, *names: str) -> list[dict[str, Any]]:
    """The tasks called ``names`` of the role's ``tasks_file``, as written there."""
    tasks = yaml.safe_load((ROLES / role / "tasks" / tasks_file).read_text())
    found = [task for task in tasks if task.get("name") in names]
    assert [task["name"] for task in found] == list(names), f"{role}/tasks/{tasks_file}"
    return found


def play(base: Path, role: str, tasks: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """``tasks`` on localhost with the role's and the role pyqmail's defaults, vars and
    handlers, the role's templates and files where its tasks look them up."""
    for part in ("templates", "files"):
        link_tree(ROLES / role / part, base / part)
    vars_files = [
        str(path)
        for name in ("pyqmail", role)
        for part in ("defaults", "vars")
        if (path := ROLES / name / part / "main.yml").is_file()
    ]
    handlers = [
        {"ansible.builtin.import_tasks": str(path)}
        for name in (role, "pyqmail")
        if (path := ROLES / name / "handlers" / "main.yml").is_file()
    ]
    playbook = base / "play.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "name": f"The role {role}'s conftest",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars_files": vars_files,
                    "tasks": tasks,
                    "handlers": handlers,
                }
            ]
        )
    )
    proc = ansible_playbook(playbook, {"pyqmail__check_fresh": False, **extra}, cwd=base)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def run_conftest(service: Path) -> subprocess.CompletedProcess[str]:
    """``./conftest`` in its directory, as pyqmail-restart-stale runs it."""
    return subprocess.run(
        ["./conftest"], cwd=service, capture_output=True, text=True, timeout=120, check=False
    )


def exec_argv(service: Path) -> list[str]:
    """The command the conftest execs (its last line), without its redirection and the run
    script's address-space limit (``softlimit -a N``) before it."""
    words = shlex.split((service / "conftest").read_text().splitlines()[-1])
    assert words[0] == "exec"
    if words[1] == "softlimit":
        assert words[2] == "-a", words
        words = words[3:]
    return [word for word in words[1:] if word != ">/dev/null"]


def handlers_run(base: Path, notify: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The role pyqmail's handlers after a task that notifies ``notify``; task name -> its
    result (the play may fail: a check that refuses fails it)."""
    out = run_role_tasks(
        (),
        base,
        {"pyqmail__check_fresh": False, **extra},
        must_pass=False,
        before=[
            {
                "name": "A configuration changed",
                "ansible.builtin.command": "true",
                "changed_when": True,
                "notify": notify,
            }
        ],
    )
    return {name: results[0] for name, results in results_by_task(out).items()}


def assert_written(service: Path) -> None:
    """Beside run, executable, root's alone to change (it runs as root)."""
    st = (service / "conftest").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    if IS_ROOT:
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert (service / "conftest").read_text().startswith("#!/bin/sh\n")


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch tree outside pytest's tmp_path (the daemons' users must read it)."""
    path = Path(tempfile.mkdtemp(prefix="pyqmail-conftest-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qmail(base: Path, pki: PKI) -> QmailRoot:
    """A qmail root both daemons load: control files, a queue, the rules cdbs (the
    submission listener's own one too)."""
    return listeners_root(base / "qmail", pki)


def services_extra(qmail: QmailRoot) -> dict[str, Any]:
    """pyqmail_services' variables for ``qmail``, its three listeners, this checkout's daemons."""
    user = DROP_USER if IS_ROOT else os.environ.get("USER", "root")
    return {
        "pyqmail__root": str(qmail.path),
        "pyqmail__venv": str(VENV),
        "pyqmail__rules_path": str(qmail.path / "etc" / "smtp"),
        "pyqmail__smtpd_user": user,
        "pyqmail__send_user": user,
        "pyqmail__listener_env": {"submission": {"FORCETLS": "0"}},
        "pyqmail_services__listeners": ["smtp", "smtps", "submission"],
    }


SERVICES_TASKS = (
    "List the services to run",
    "Create the supervise directories",
    "Write the checks of the installed daemon against the configuration (conftest)",
)


def test_the_listeners_and_pyqmail_send_check_their_own_configuration(qmail: QmailRoot) -> None:
    """pyqmail_services: one conftest per service, the handlers' own --check with the
    listener's --mode and rules cdb, under the run script's address-space limit; a broken
    control file fails each with the daemon's line."""
    tasks = role_tasks("pyqmail_services", "main.yml", *SERVICES_TASKS)
    extra = services_extra(qmail)
    play(qmail.path.parent, "pyqmail_services", tasks, extra)
    supervise = qmail.path / "supervise"
    assert sorted(p.name for p in supervise.iterdir()) == sorted(SERVICES)
    for name in SERVICES:
        assert_written(supervise / name)
        assert "exec softlimit -a 1073741824 " in (supervise / name / "conftest").read_text()
        done = run_conftest(supervise / name)
        assert (done.returncode, done.stderr) == (0, ""), (name, done.stdout)
        assert " OK" in done.stdout, done.stdout
    rules = {
        name: (supervise / name / "conftest").read_text().split(" --rules ")[1].split()[0]
        for name in SERVICES[:3]
    }
    etc = qmail.path / "etc"
    assert rules == {
        "qmail-smtpd": f"{etc}/smtp.cdb",
        "qmail-smtpd-ssl": f"{etc}/smtp.cdb",
        "qmail-smtpd-tls": f"{etc}/smtp-submission.cdb",  # an environment of its own
    }

    qmail.control("databytes", "ten\n")
    qmail.control("concurrencyremote", "many\n")
    fatal = f"pyqmail-smtpd: fatal: {qmail.path}/control/databytes:1: not a non-negative integer"
    for name in SERVICES[:3]:
        assert conftest(str(supervise / name)) == f"./conftest failed (exit 111): {fatal}: 'ten'"
    refused = conftest(str(supervise / "qmail-send"))
    assert refused is not None
    assert refused.startswith("./conftest failed (exit 111): pyqmail-send: "), refused
    assert "concurrencyremote" in refused

    # The handlers, the services linked: the same commands, refusing with the same lines.
    service_dir = qmail.path.parent / "service"
    service_dir.mkdir()
    for name in SERVICES:
        (service_dir / name).symlink_to(supervise / name)
    extra["pyqmail__service_dir"] = str(service_dir)
    ran = handlers_run(qmail.path.parent, "pyqmail reload listeners", extra)
    checks = ran["Validate the daemon and its configuration before signalling it (pyqmail-smtpd"
                 " --check)"]["results"]  # fmt: skip
    assert {Path(r["item"]).name: r["cmd"] for r in checks} == {
        name: exec_argv(supervise / name) for name in SERVICES[:3]
    }
    refusal = ran["Refuse to signal the listeners with a configuration they cannot load"]
    assert fatal in refusal["msg"]
    assert "Reload the SMTP listeners (svc -h)" not in ran
    ran = handlers_run(qmail.path.parent, "pyqmail reload send", extra)
    check = ran["Validate pyqmail-send's configuration before signalling it (pyqmail-send --check)"]
    assert check["cmd"] == exec_argv(supervise / "qmail-send")
    refusal = ran["Refuse to signal pyqmail-send with a configuration it cannot load"]
    assert refused.split(": ", 1)[1] in refusal["msg"]


def test_a_daemon_that_cannot_start_within_the_run_scripts_limit_fails_its_conftest(
    qmail: QmailRoot,
) -> None:
    """The conftest starts the daemon under the run script's own ``softlimit -a``: with a
    limit the interpreter cannot load its modules in (12 MB here), every check fails, as the
    service would after the restart; with no limit (0) none is written."""
    tasks = role_tasks("pyqmail_services", "main.yml", *SERVICES_TASKS)
    extra = {**services_extra(qmail), "pyqmail_services__softlimit": 12_000_000}
    play(qmail.path.parent, "pyqmail_services", tasks, extra)
    supervise = qmail.path / "supervise"
    for name in SERVICES:
        done = run_conftest(supervise / name)
        assert done.returncode != 0, (name, done.stdout, done.stderr)
    extra["pyqmail_services__softlimit"] = 0
    play(qmail.path.parent, "pyqmail_services", tasks, extra)
    for name in SERVICES:
        assert "softlimit" not in exec_argv(supervise / name)
        assert "exec softlimit" not in (supervise / name / "conftest").read_text()
        assert run_conftest(supervise / name).returncode == 0, name


@pytest.mark.skipif(shutil.which("doveconf") is None, reason="Dovecot not installed")
def test_dovecots_conftest_reads_the_configuration_the_role_wrote(base: Path) -> None:
    """pyqmail_dovecot: doveconf -n on the configuration the role wrote passes; with a syntax
    error in it, the check fails with doveconf's own line (as 2.4 would refuse a 2.3 file)."""
    root = base / "qmail"
    (root / "control").mkdir(parents=True)
    (root / "control" / "servercert.pem").write_text("not read by doveconf -n\n")
    config = base / "pyqmail.conf"
    tasks = [
        {"ansible.builtin.import_tasks": str(ROLES / "pyqmail_dovecot" / "tasks" / "config.yml")},
        *role_tasks(
            "pyqmail_dovecot",
            "dovecot.yml",
            "Create the supervise directories",
            "Write the check of the installed Dovecot against the configuration (conftest)",
        ),
    ]
    extra = {
        "pyqmail__root": str(root),
        "pyqmail__dovecot_config": str(config),
        "pyqmail__service_dir": str(base / "service"),
        **TEST_HOST_VARS,
    }
    play(base, "pyqmail_dovecot", tasks, extra)
    service = root / "supervise" / "dovecot"
    assert_written(service)
    assert str(config) in (service / "conftest").read_text()
    done = run_conftest(service)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")

    with config.open("a") as conf:
        conf.write("protocol imap {\n")  # never closed
    refused = conftest(str(service))
    assert refused is not None
    assert refused.startswith(
        f"./conftest failed (exit 89): doveconf: Fatal: Error in configuration file {config}: "
    ), refused

    # The reload handler, Dovecot linked: the same command, refusing with the same line.
    (base / "service").mkdir()
    (base / "service" / "dovecot").symlink_to(service)
    ran = handlers_run(base, "pyqmail reload dovecot", extra)
    check = ran["Validate Dovecot's configuration before signalling it (doveconf -n)"]
    assert check["cmd"] == exec_argv(service)
    refusal = ran["Refuse to signal Dovecot with a configuration it cannot load"]
    assert refused.split(": ", 1)[1] in refusal["msg"]
    assert "Reload Dovecot (svc -h, then check it stays up)" not in ran


def scanner_extra(base: Path, service: str) -> dict[str, Any]:
    """The role pyqmail_scanners' paths in ``base``; the scanners off, so that the restart
    handlers the configuration tasks notify have nothing to restart."""
    return {
        "pyqmail__root": str(base / "qmail"),
        "pyqmail_scanners__service": service,
        "pyqmail_scanners__rspamd_enabled": False,
        "pyqmail_scanners__clamav_enabled": False,
        "pyqmail_scanners__rspamd_confdir": str(base / "rspamd"),
        "pyqmail_scanners__rspamd_rundir": str(base / "rspamd-run"),
        "pyqmail_scanners__rspamd_dbdir": str(base / "rspamd-db"),
        "pyqmail_scanners__rspamd_listen": "127.0.0.1:11333",
        "pyqmail_scanners__rspamd_dns_servers": ["127.0.0.1:1"],
        "pyqmail_scanners__rspamd_offline": True,
        "pyqmail_scanners__clamd_config": str(base / "clamd.conf"),
        "pyqmail_scanners__clamd_listen": str(base / "clamd-run" / "clamd.sock"),
        "pyqmail_scanners__clamav_database_dir": str(base / "clamdb"),
        "role_path": str(ROLES / "pyqmail_scanners"),  # its lookups of other roles' defaults
    }


SUPERVISE_TASKS = (
    "Create the supervise directories of {{ pyqmail_scanners__service }}",
    "Write the configuration of {{ pyqmail_scanners__service }}",
    "Write the check of the installed scanner against the configuration (conftest): "
    "{{ pyqmail_scanners__service }}",
)


def supervise_tasks(tasks_file: str) -> list[dict[str, Any]]:
    """supervise.yml's tasks that write the scanner's configuration, supervise directory and
    conftest, with the vars the scanner's task file includes it with (its configuration)."""
    [include] = [
        task
        for task in yaml.safe_load((ROLES / "pyqmail_scanners" / "tasks" / tasks_file).read_text())
        if task.get("ansible.builtin.include_tasks") == "supervise.yml"
    ]
    return [
        {**task, "vars": {**include["vars"], **task.get("vars", {})}}
        for task in role_tasks("pyqmail_scanners", "supervise.yml", *SUPERVISE_TASKS)
    ]


@pytest.mark.skipif(shutil.which("rspamadm") is None, reason="rspamd not installed")
def test_rspamds_conftest_reads_the_configuration_the_role_wrote(base: Path) -> None:
    """pyqmail_scanners: rspamadm configtest of Debian's rspamd.conf with the role's local.d
    and override.d (the run script's variables) passes; a syntax error in local.d fails it."""
    conf = base / "rspamd"
    conf.mkdir()
    (conf / "rspamd.conf").symlink_to("/etc/rspamd/rspamd.conf")
    tasks = [
        *role_tasks("pyqmail_scanners", "rspamd.yml", "Create rspamd's configuration directories"),
        *supervise_tasks("rspamd.yml"),
    ]
    play(base, "pyqmail_scanners", tasks, scanner_extra(base, "rspamd"))
    service = base / "qmail" / "supervise" / "rspamd"
    assert_written(service)
    assert f"--var=LOCAL_CONFDIR={conf} " in (service / "conftest").read_text()
    done = run_conftest(service)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""

    (conf / "local.d" / "actions.conf").write_text("reject = ;\n")
    refused = conftest(str(service))
    assert refused is not None
    said = f"failed to load config: ucl parser error: error while parsing {conf}/local.d/"
    assert refused.startswith(f"./conftest failed (exit 1): {said}actions.conf: "), refused


@pytest.mark.skipif(shutil.which("clamd") is None, reason="ClamAV not installed")
def test_clamds_conftest_reads_the_configuration_the_role_wrote(base: Path) -> None:
    """pyqmail_scanners: clamd parses the configuration the role wrote (--version answers
    after the parse, before any signature or socket); an option it does not know fails it."""
    (base / "clamdb").mkdir()
    tasks = supervise_tasks("clamav.yml")
    play(base, "pyqmail_scanners", tasks, scanner_extra(base, "clamd"))
    service = base / "qmail" / "supervise" / "clamd"
    assert_written(service)
    done = run_conftest(service)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")

    config = base / "clamd.conf"
    lines = len(config.read_text().splitlines())
    with config.open("a") as conf:
        conf.write("NoSuchOption yes\n")
    assert conftest(str(service)) == (
        f"./conftest failed (exit 1): ERROR: Parse error at {config}:{lines + 1}: Unknown option"
        " NoSuchOption (+1 more line)"  # ERROR: Can't open/parse the config file ...
    )
