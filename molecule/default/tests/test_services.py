"""Every service and its log service is up under daemontools and stays up."""

from __future__ import annotations

import time
from typing import Any

from mailcheck import CA_PATH, SERVICE_DIR, all_service_paths, svstat


def test_all_services_up_and_not_restarting(mx: Any) -> None:
    paths = all_service_paths()
    first = svstat(mx, *paths)
    assert sorted(first) == sorted(paths)
    time.sleep(3)
    second = svstat(mx, *paths)
    for path in paths:
        assert second[path]["state"] == "up", f"{path}: {second[path]}"
        assert second[path]["pid"] == first[path]["pid"], f"{path} restarted between two svstat"
        assert second[path]["seconds"] >= 3, f"{path} up only {second[path]['seconds']} s"


def test_every_service_carries_a_conftest_that_passes(mx: Any) -> None:
    """pyqmail-restart-stale restarts a service after a package upgrade only when its
    ./conftest passes: each one the roles wrote must pass on the host as set up (a conftest
    that fails here would keep every upgraded daemon on its old code for good)."""
    linked = mx.check_output(f"readlink -f {SERVICE_DIR}/*").split()
    ours = [path for path in linked if path.startswith("/var/qmail/supervise/")]
    names = {path.rsplit("/", 1)[1] for path in ours}
    assert names >= {"qmail-smtpd", "qmail-send", "dovecot"}, linked
    for path in ours:
        result = mx.run(f"cd {path} && ./conftest")
        assert result.rc == 0, f"{path}/conftest exited {result.rc}: {result.stderr}{result.stdout}"


def test_services_run_as_unprivileged_users(mx: Any) -> None:
    owners = mx.check_output(
        "ps -eo user:20,ppid,args | grep -E 'pyqmail-(smtpd|send)' | grep -v grep"
    )
    users = {line.split()[0] for line in owners.splitlines()}
    assert "pyqmaild" in users and "pyqmails" in users, owners
    # Root keeps only each listener's supervisor (it holds the sockets and forks the spawners,
    # which import the daemon before their drop: pyqmail.smtpd.prefork), the process that
    # daemontools' supervise started; it reads no mail. Its workers are its forks (same
    # name and command line) and must run as pyqmaild.
    table = mx.check_output("ps -eo user:20,ppid,comm,args --no-headers")
    for line in table.splitlines():
        user, ppid, comm, args = line.split(None, 3)
        if user == "root" and comm in ("pyqmail-smtpd", "pyqmail-send"):
            parent = mx.check_output(f"ps -o comm= -p {ppid}").strip()
            assert parent == "supervise", f"a root process not started by supervise: {line}"
            assert "pyqmail-smtpd --supervise=" in args, line


def test_pyqmail_send_runs_as_three_users(mx: Any) -> None:
    """Privilege separation: the queue manager, the remote and the local delivery processes
    each run as their own user, none as root."""
    lines = mx.check_output("ps -eo user:20,args | grep 'bin/pyqmail-send' | grep -v grep")
    assert {line.split()[0] for line in lines.splitlines()} == {
        "pyqmails",
        "pyqmailr",
        "pyqmailv",
    }, lines


def test_the_remote_delivery_user_cannot_touch_the_queue_or_the_mailboxes(mx: Any) -> None:
    """What a compromised SMTP client process could do: nothing to the queue, a mailbox or
    the control files (it reads only the client certificate it offers)."""
    as_remote = "setpriv --reuid pyqmailr --regid pyqmailr --init-groups"
    for target in (
        "/var/qmail/queue/mess/probe",
        "/var/qmail/queue/new/probe",
        "/var/qmail/queue/tmp/probe",
        "/var/vmail/alice/Maildir/new/probe",
        "/var/qmail/control/probe",
    ):
        r = mx.run(f"{as_remote} sh -c 'echo x > {target}'")
        assert r.rc != 0 and "Permission denied" in r.stderr, (target, r.stdout, r.stderr)
    assert mx.run(f"{as_remote} cat /var/qmail/control/smtpusers").rc != 0


def test_servercert_key_then_cert_owner_mode(mx: Any) -> None:
    cert = mx.file("/var/qmail/control/servercert.pem")
    assert cert.user == "pyqmaild"
    assert cert.mode == 0o400
    text = mx.check_output("cat /var/qmail/control/servercert.pem")
    markers = [ln for ln in text.splitlines() if ln.startswith("-----BEGIN")]
    assert markers[0] in ("-----BEGIN PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----")
    assert markers[1] == "-----BEGIN CERTIFICATE-----"
    assert mx.file(CA_PATH).exists


def test_aliases_point_to_postmaster_address(mx: Any) -> None:
    for name in ("root", "postmaster", "mailer-daemon"):
        alias = mx.file(f"/var/qmail/alias/.qmail-{name}")
        assert alias.exists
        assert "admin@mx1.pyqmail.test" in alias.content_string
