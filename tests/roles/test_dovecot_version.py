"""pyqmail_dovecot refuses Dovecot 2.4 (Debian 13) before it installs or writes anything.

2.4 reads no 2.3 configuration and removed the checkpassword passdb the role's logins go
through. The role's ``tasks/version.yml`` runs on this machine (Dovecot 2.3 installed, the
package lists never updated: the packages count as installed): the version it reads from
``apt-cache policy`` is the one dpkg has; a 2.4 one (given as the version read) is refused with
a message that names it and the way out.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from tests.roles.playbook import ROLES, run_role_tasks, task_result

CHECK = "Refuse Dovecot 2.4 or later (this role writes a Dovecot 2.3 configuration)"
PACKAGES = ["dovecot-core", "dovecot-imapd", "dovecot-pop3d"]
# The packages count as installed: the package lists are not updated (no network).
INSTALLED = {"pyqmail_dovecot__packages": PACKAGES, "pyqmail__debian_packages": PACKAGES}


def version_check(tmp: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """The role's tasks/version.yml alone on localhost; the JSON callback's output."""
    task = {
        "name": "The role pyqmail_dovecot's version check",
        "ansible.builtin.include_tasks": str(ROLES / "pyqmail_dovecot" / "tasks" / "version.yml"),
    }
    return run_role_tasks((), tmp, {**INSTALLED, **extra}, must_pass=False, before=[task])


def dpkg_upstream_version() -> str:
    """dovecot-core's version as dpkg has it, without epoch and Debian revision."""
    full = subprocess.run(
        ["dpkg-query", "--show", "--showformat", "${Version}", "dovecot-core"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.fullmatch(r"(?:\d+:)?([0-9.]+)[+~-].*", full)
    assert match, full
    return match.group(1)


def test_the_installed_dovecot_2_3_is_read_and_accepted(tmp_path: Path) -> None:
    out = version_check(tmp_path, {})
    result = task_result(out, CHECK)
    assert not result.get("failed"), result
    assert result["msg"] == f"Dovecot {dpkg_upstream_version()}"


def test_dovecot_2_4_is_refused_naming_the_version_and_the_way_out(tmp_path: Path) -> None:
    out = version_check(tmp_path, {"pyqmail_dovecot__version": "2.4.1"})
    result = task_result(out, CHECK)
    assert result.get("failed"), result
    assert "Dovecot 2.4.1" in result["msg"]
    assert "pyqmail_dovecot__enabled: false" in result["msg"]
    assert "checkpassword" in result["msg"]
