"""How the role tests run ansible-playbook: this checkout's ansible.cfg, JSON output, quiet."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ansible_env() -> dict[str, str]:
    """The test process's environment plus the settings every role test's playbook needs."""
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "PYTHONWARNINGS": "ignore",
    }


def debian_packages() -> list[str]:
    """The installed Debian packages, as roles/pyqmail/tasks/host.yml notes them in
    pyqmail__debian_packages (for tests that import a role's tasks without that role)."""
    done = subprocess.run(
        ["dpkg-query", "--show", "--showformat", "${db:Status-Abbrev} ${Package}\n"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.split()[-1] for line in done.stdout.splitlines() if line[1:2] == "i"]
