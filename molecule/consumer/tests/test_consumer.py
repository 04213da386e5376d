"""The collection as a user installs it (issue 20): the playbook directory outside the
repository holds the offline-installed collection and uses fully qualified names only; the
host it provisioned runs every service, speaks STARTTLS with a certificate that verifies
against the run's CA, and runs the daemon of the collection's version."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import yaml
from conftest import MX_NAME
from mailcheck import all_service_paths, svstat

REPO = Path(__file__).resolve().parents[3]
VERSION = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
CA = "/tmp/pyqmail-ca.pem"


def test_the_playbook_directory_is_outside_and_uses_only_the_installed_collection(
    playbook_dir: Path,
) -> None:
    assert not playbook_dir.resolve().is_relative_to(REPO)
    root = playbook_dir / "collections" / "ansible_collections" / "pyqmail" / "mail"
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["collection_info"]["version"] == VERSION
    assert not [p for p in root.rglob("*") if p.is_symlink()]
    wheel = root / "roles" / "pyqmail_install" / "files" / f"pyqmail-{VERSION}-py3-none-any.whl"
    assert wheel.is_file()
    site = yaml.safe_load((playbook_dir / "site.yml").read_text())
    assert site == [
        {
            "name": "Provision the mail servers with the installed collection pyqmail.mail",
            "ansible.builtin.import_playbook": "pyqmail.mail.site",
        }
    ]
    assert "library" not in (playbook_dir / "ansible.cfg").read_text()
    assert "roles_path" not in (playbook_dir / "ansible.cfg").read_text()


def test_all_services_up_and_not_restarting(mx: Any) -> None:
    paths = all_service_paths()
    first = svstat(mx, *paths)
    time.sleep(3)
    second = svstat(mx, *paths)
    for path in paths:
        assert second[path]["state"] == "up", f"{path}: {second[path]}"
        assert second[path]["pid"] == first[path]["pid"], f"{path} restarted between two svstat"


def test_the_daemon_is_the_collections_version(mx: Any) -> None:
    out = mx.check_output("/opt/pyqmail/bin/pyqmail-smtpd --version")
    assert out.strip() == f"pyqmail-smtpd {VERSION}"


def test_starttls_on_25_and_587_verifies_against_the_run_ca(client: Any) -> None:
    for port in (25, 587):
        out = client.run(
            f"echo QUIT | openssl s_client -starttls smtp -connect {MX_NAME}:{port} -CAfile {CA}"
            f" -verify_hostname {MX_NAME} -verify_return_error -brief 2>&1"
        )
        assert out.rc == 0, out.stdout
        assert "Verification: OK" in out.stdout, out.stdout
        assert re.search(r"Protocol version: TLSv1\.[23]", out.stdout), out.stdout
