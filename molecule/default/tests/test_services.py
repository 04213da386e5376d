"""Every service and its log service is up under daemontools and stays up."""

from __future__ import annotations

import time
from typing import Any

from mailcheck import CA_PATH, all_service_paths, svstat


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


def test_services_run_as_unprivileged_users(mx: Any) -> None:
    owners = mx.check_output("ps -eo user:20,args | grep -E 'pyqmail-(smtpd|send)' | grep -v grep")
    users = {line.split()[0] for line in owners.splitlines()}
    assert "pyqmaild" in users and "pyqmails" in users, owners
    # A root parent may hold the listening socket, but no process that reads mail runs as root.
    workers = [ln for ln in owners.splitlines() if ln.split()[0] == "root"]
    assert len(workers) <= 3, owners


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
