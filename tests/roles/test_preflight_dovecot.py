"""The preflight refuses a Dovecot that is or would be 2.4 before any play changes a host.

The real action ``pyqmail.mail.pyqmail_preflight`` runs through ansible-playbook on localhost
with ``pyqmail_dovecot__enabled: true``. This machine is Debian 12 with Dovecot 2.3: the role
pyqmail_preflight, as every play runs it (the host's own files), passes and writes nothing.
A Debian 13 host is the real dpkg-query and apt-cache reading its files under a directory the
test writes (the action's ``root``, tests/debianroot.py): Dovecot 2.4 installed, or apt's
candidate, or only the release; each is refused with one line naming the host, the version,
where it was read and the way out, in check mode too, and nothing under it is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.debianroot import DEBIAN_13_HOSTS, TRIXIE_DOVECOT, tree, write_host
from tests.roles.playbook import ROLES, run_role_tasks, task_result

PREFLIGHT = "The preflight of every pyqmail role"
ROLE = "pyqmail.mail.pyqmail_preflight"
ROLE_TASK = (
    "pyqmail.mail.pyqmail_preflight : "
    "Check the inventory of every pyqmail role (one line per problem)"
)
HOST: dict[str, Any] = {
    "pyqmail__me": "mx.example.test",
    "pyqmail__listen_ip": "127.0.0.1",
    "pyqmail_aliases__postmaster": "admin@mx.example.test",
    "pyqmail_dovecot__enabled": True,
    "pyqmail_mailboxes__list": [{"name": "alice", "password": "s3cret"}],
}
WAY_OUT = (
    "; pyqmail_dovecot writes a Dovecot 2.3 configuration, and 2.4 reads none and has no "
    "checkpassword passdb, which the IMAP/POP3 logins use: set pyqmail_dovecot__enabled: false "
    "for this host, or run it on Debian 12"
)


def preflight(tmp: Path, root: Path, *args: str, **extra: Any) -> dict[str, Any]:
    """The action alone on localhost, reading the host's files under ``root``; its result.
    ``role_path`` is what the role pyqmail_preflight's task has (defaults are templated with
    it: the artifacts directory, the source checkout)."""
    task = {
        "name": PREFLIGHT,
        "pyqmail.mail.pyqmail_preflight": {
            "roles": "{{ pyqmail__roles }}",
            "roles_dir": str(ROLES),
            "root": str(root),
        },
    }
    extra = {**HOST, "role_path": str(ROLES / "pyqmail_preflight"), **extra}
    out = run_role_tasks((), tmp / "play", extra, *args, must_pass=False, before=[task])
    return task_result(out, PREFLIGHT)


@pytest.mark.parametrize(("host", "said"), DEBIAN_13_HOSTS)
def test_a_debian_13_host_is_refused_in_one_line_before_anything_changes(
    tmp_path: Path, host: dict[str, str], said: str
) -> None:
    root = write_host(tmp_path / "host", **host)
    before = tree(root)
    result = preflight(tmp_path, root, "--check")
    assert result.get("failed"), result
    assert result["msg"] == f"pyqmail_dovecot__enabled: localhost {said}{WAY_OUT}"
    assert not result.get("changed")
    assert tree(root) == before


def test_the_way_out_passes_on_the_same_host(tmp_path: Path) -> None:
    root = write_host(tmp_path / "host", installed=TRIXIE_DOVECOT)
    result = preflight(tmp_path, root, pyqmail_dovecot__enabled=False)
    assert not result.get("failed"), result


def test_the_role_passes_on_this_debian_12_machine_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight as every play runs it: the role, the host's own files (Dovecot 2.3
    installed). dpkg-query is this machine's, behind a script that notes it was asked."""
    asked = tmp_path / "asked"
    shim = tmp_path / "bin" / "dpkg-query"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "$@" >> {asked}\nexec /usr/bin/dpkg-query "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:{os.environ['PATH']}")
    watched = [
        Path("/var/lib/dpkg/status"),
        Path("/var/lib/apt/lists"),
        Path("/var/cache/apt"),
        *Path("/var/cache/apt").glob("*.bin"),
    ]
    before = {path: stamp(path) for path in watched if path.exists()}
    role = {"name": "The role", "ansible.builtin.include_role": {"name": ROLE}}
    out = run_role_tasks((), tmp_path / "play", HOST, must_pass=False, before=[role])
    result = task_result(out, ROLE_TASK)
    assert not result.get("failed"), result
    assert not result.get("changed")
    assert result["msg"].endswith("roles checked"), result
    assert asked.read_text().split() == [
        "--show",
        "--showformat=${db:Status-Abbrev}|${Version}",
        "dovecot-core",
    ]
    assert {path: stamp(path) for path in watched if path.exists()} == before


def stamp(path: Path) -> tuple[int, int]:
    return path.stat().st_size, path.stat().st_mtime_ns
