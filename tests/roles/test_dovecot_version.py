"""pyqmail_dovecot refuses Dovecot 2.4 (Debian 13) before it installs or writes anything.

2.4 reads no 2.3 configuration and removed the checkpassword passdb the role's logins go
through. The role's ``tasks/version.yml`` runs on this machine (Dovecot 2.3 installed, the
package lists never updated: the packages count as installed): the version it reads from
``apt-cache policy`` is the one dpkg has. apt-cache's other answers are given as extra vars
(which outrank the registered result): Debian 13's candidate 2.4.1 is refused with a message
that names it and the way out, an answer without "Candidate:" is refused, an empty one passes.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from tests.roles.playbook import ROLES, run_role_tasks, task_result

CHECK = "Refuse Dovecot 2.4 or later (this role writes a Dovecot 2.3 configuration)"
UNDERSTOOD = "Check apt-cache policy's answer was understood"
# apt-cache policy as Debian 13 answers before Dovecot is installed (the candidate is read).
TRIXIE = """dovecot-core:
  Installed: (none)
  Candidate: 1:2.4.1+dfsg1-6+deb13u1
  Version table:
     1:2.4.1+dfsg1-6+deb13u1 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
"""
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
    """apt-cache's answer as Debian 13 gives it (an extra var outranks the registered one)."""
    out = version_check(tmp_path, {"pyqmail_dovecot__policy": {"stdout": TRIXIE}})
    result = task_result(out, CHECK)
    assert result.get("failed"), result
    assert "Dovecot 2.4.1" in result["msg"]
    assert "pyqmail_dovecot__enabled: false" in result["msg"]
    assert "checkpassword" in result["msg"]


def test_an_answer_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    """Not a silent pass: apt-cache in another language (the task sets LC_ALL=C, but an
    answer without "Candidate:" must not read as "no version")."""
    german = "dovecot-core:\n  Installiert: (keine)\n  Installationskandidat: 1:2.4.1\n"
    out = version_check(tmp_path, {"pyqmail_dovecot__policy": {"stdout": german}})
    result = task_result(out, UNDERSTOOD)
    assert result.get("failed"), result
    assert "Installationskandidat: 1:2.4.1" in result["msg"]


def test_no_package_lists_leave_the_install_task_to_say_so(tmp_path: Path) -> None:
    out = version_check(tmp_path, {"pyqmail_dovecot__policy": {"stdout": ""}})
    result = task_result(out, CHECK)
    assert not result.get("failed"), result
    assert "no Dovecot version known" in result["msg"]
