"""The preflight (role pyqmail) refuses bad IMAP/POP3 settings before any play changes anything.

Each case runs the real ``ansible-playbook`` with only the ``pyqmail`` role (the checks every
play starts with) against this machine in check mode: the error must name the variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAY = """\
- name: Preflight only
  hosts: all
  gather_facts: true
  gather_subset: ["!all", network]
  roles:
    - role: pyqmail.mail.pyqmail
"""
BASE: dict[str, Any] = {
    "pyqmail__me": "mx.example.test",
    "pyqmail__listen_ip": "127.0.0.1",
    "pyqmail_aliases__postmaster": "admin@mx.example.test",
    "pyqmail_dovecot__enabled": True,
    "pyqmail_mailboxes__list": [{"name": "alice", "password": "secret"}],
}


def preflight(tmp_path: Path, **extra: Any) -> subprocess.CompletedProcess[str]:
    play = tmp_path / "preflight.yml"
    play.write_text(PLAY)
    variables = tmp_path / "vars.json"
    variables.write_text(json.dumps({**BASE, **extra}))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
    }
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "--check",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-e",
            f"@{variables}",
            str(play),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            {"pyqmail_dovecot__ports": {"imaps": 587}},
            "pyqmail_dovecot__ports.imaps: 587 clashes with pyqmail_services__ports.submission",
        ),
        (
            {"pyqmail_dovecot__ports": {"imap": 993}},
            "pyqmail_dovecot__ports.imap: 993 is also the port of imaps",
        ),
        (
            {"pyqmail_dovecot__listeners": ["imaps", "pop3", "pop3"]},
            "pyqmail_dovecot__listeners[2]: 'pop3' is listed twice",
        ),
        (
            {"pyqmail_dovecot__ports": {"imaps": 70000}},
            "pyqmail_dovecot__ports.imaps: 70000 is not a port number (1-65535)",
        ),
        ({"pyqmail_dovecot__listeners": ["imap4"]}, "pyqmail_dovecot__listeners"),
        (
            {"pyqmail_dovecot__listen_ip": "0.0.0.0"},
            "pyqmail_dovecot__listen_ip: '0.0.0.0' listens on every address",
        ),
        (
            {"pyqmail_mailboxes__list": [{"name": "bob", "login": "bob smith", "password": "x"}]},
            "pyqmail_mailboxes__list[0].login:",
        ),
        (
            {"pyqmail_mailboxes__list": [{"name": "bob/../x", "password": "x"}]},
            "pyqmail_mailboxes__list[0].name: 'bob/../x' is not a mailbox name",
        ),
        (
            {"pyqmail_mailboxes__folders": ["Sent.2024"]},
            "pyqmail_mailboxes__folders[0]: 'Sent.2024' is not a folder name",
        ),
        (
            {"pyqmail_dovecot__checkpassword_concurrency": 257},
            "pyqmail_dovecot__checkpassword_concurrency: 257 is out of range: must be from 0"
            " to 256 (0 = twice the CPUs)",
        ),
    ],
)
def test_bad_imap_settings_fail_naming_the_variable(
    tmp_path: Path, extra: dict[str, Any], named: str
) -> None:
    done = preflight(tmp_path, **extra)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert named in " ".join(out.split()), out


def test_good_settings_and_another_address_pass(tmp_path: Path) -> None:
    # The same port on another address is no clash.
    done = preflight(
        tmp_path,
        pyqmail_dovecot__listen_ip="127.0.0.2",
        pyqmail_dovecot__ports={"imaps": 465},
        pyqmail_dovecot__listeners=["imaps", "imap", "pop3s", "pop3"],
    )
    assert done.returncode == 0, done.stdout + done.stderr
