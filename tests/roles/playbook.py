"""How the role tests run ansible-playbook: this checkout's ansible.cfg, JSON output, quiet."""

from __future__ import annotations

import os
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
