"""Which Dovecot a host has or would get, as the preflight reads it (pyqmail_dovecot).

The texts are real: this machine's dpkg-query, apt-cache policy and /etc/os-release (Debian
12, Dovecot 2.3 installed), Debian 13's as its tools print them, and the real dpkg-query and
apt-cache reading a Debian 13 host written under a directory (tests/debianroot.py). The
readers are module_utils/pyqmail_dovecot.py's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.collection import module_utils
from tests.debianroot import DEBIAN_13_HOSTS, TRIXIE_DOVECOT, TRIXIE_OS_RELEASE, tree, write_host

dovecot: Any = module_utils("pyqmail_dovecot")

# apt-cache policy dovecot-core on Debian 13 before Dovecot is installed.
TRIXIE_POLICY = """\
dovecot-core:
  Installed: (none)
  Candidate: 1:2.4.1+dfsg1-6
  Version table:
     1:2.4.1+dfsg1-6 500
        500 http://deb.debian.org/debian trixie/main amd64 Packages
"""
UBUNTU_OS_RELEASE = 'NAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\nID_LIKE=debian\n'
SID_OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux trixie/sid"\nNAME="Debian GNU/Linux"\nID=debian\n'


def local_run(argv: list[str]) -> str:
    """The readers' commands on this machine, as the action runs them on a host."""
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def installed_here() -> str:
    """dovecot-core's version as dpkg has it on this machine."""
    out = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${db:Status-Abbrev}|${Version}", "dovecot-core"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if not out.startswith("ii"):
        pytest.skip("dovecot-core is not installed on this machine")
    return out.partition("|")[2]


@pytest.mark.parametrize(
    ("version", "numbers"),
    [
        ("1:2.3.19.1+dfsg1-2.1+deb12u1", (2, 3, 19, 1)),  # Debian 12's: the epoch is dropped
        ("1:2.4.1+dfsg1-6", (2, 4, 1)),  # Debian 13's: 1 is the epoch, not the major
        ("2.4~rc1-1", (2, 4)),  # a 2.4 release candidate is 2.4
        ("2.3.21", (2, 3, 21)),
        ("10:2.3.4-1", (2, 3, 4)),
        ("(none)", None),
        ("", None),
    ],
)
def test_the_upstream_version_without_epoch_and_revision(
    version: str, numbers: tuple[int, ...] | None
) -> None:
    assert dovecot.upstream(version) == numbers


def test_ansible_loose_version_would_read_the_epoch_as_the_major() -> None:
    """Why the epoch is dropped before comparing (as tasks/version.yml's regex does too)."""
    from ansible.plugins.test.core import version_compare

    assert version_compare("1:2.4.1+dfsg1-6", "2.4", "<")  # wrong: 1 < 2
    assert dovecot.Found(dovecot.upstream("1:2.4.1+dfsg1-6"), "").refused


def test_this_machines_dpkg_query_reads_the_installed_2_3() -> None:
    version = installed_here()
    out = local_run(dovecot.dpkg_argv())
    assert dovecot.installed_version(out) == version
    assert dovecot.upstream(version)[:2] == (2, 3)


def test_this_machines_apt_cache_policy_reads_its_candidate() -> None:
    version = installed_here()
    policy = local_run(dovecot.policy_argv())
    assert "Candidate:" in policy, policy
    # No package list update since the install: the candidate is the installed version.
    assert dovecot.upstream(dovecot.candidate_version(policy))[:2] == (2, 3)
    assert f"Installed: {version}" in policy


def test_this_machine_debian_12_with_dovecot_2_3_passes() -> None:
    version = installed_here()
    found = dovecot.find(local_run)
    assert found.said == f"has Dovecot {version} (installed: dpkg-query dovecot-core)"
    assert not found.refused
    assert dovecot.problem("localhost", found) == ""


def test_this_machines_os_release_is_debian_12() -> None:
    text = Path("/etc/os-release").read_text()
    if "ID=debian" not in text:
        pytest.skip("not Debian")
    assert dovecot.debian_release(text) == 12


@pytest.mark.parametrize(
    ("text", "release"),
    [
        (TRIXIE_OS_RELEASE, 13),
        ("ID=debian\nVERSION_ID=12\n", 12),
        (SID_OS_RELEASE, None),  # testing and unstable have no VERSION_ID
        (UBUNTU_OS_RELEASE, None),  # not Debian: its releases are not Debian's
        ("", None),
        # /etc/os-release first, /usr/lib/os-release after it: the first says
        ("ID=debian\nVERSION_ID=12\nID=debian\nVERSION_ID=13\n", 12),
    ],
)
def test_the_debian_release_of_os_release(text: str, release: int | None) -> None:
    assert dovecot.debian_release(text) == release


@pytest.mark.parametrize(
    ("text", "candidate"),
    [
        (TRIXIE_POLICY, TRIXIE_DOVECOT),
        ("dovecot-core:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n", ""),
        ("", ""),  # no package lists: apt-cache knows no dovecot-core
        # another language (the command sets LC_ALL=C): not read as a version
        ("dovecot-core:\n  Installiert: (keine)\n  Installationskandidat: 1:2.4.1\n", ""),
    ],
)
def test_the_candidate_of_apt_cache_policy(text: str, candidate: str) -> None:
    assert dovecot.candidate_version(text) == candidate


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("ii |1:2.4.1+dfsg1-6\n", "1:2.4.1+dfsg1-6"),
        ("iW |1:2.4.1+dfsg1-6\n", "1:2.4.1+dfsg1-6"),  # triggers awaited: installed
        ("rc |1:2.4.1+dfsg1-6\n", ""),  # removed, its configuration left
        ("iU |1:2.4.1+dfsg1-6\n", ""),  # unpacked, not configured: apt finishes it
        ("un |\n", ""),
        ("", ""),  # dpkg-query: no packages found matching dovecot-core
    ],
)
def test_the_installed_version_of_dpkg_query(text: str, version: str) -> None:
    assert dovecot.installed_version(text) == version


def answers(dpkg: str = "", policy: str = "", os_release: str = "") -> Any:
    """A host answering each reader's command with these texts; the commands it was asked."""
    asked: list[str] = []

    def run(argv: list[str]) -> str:
        command = argv[2] if argv[0] == "env" else argv[0]
        asked.append(command)
        return {"dpkg-query": dpkg, "apt-cache": policy, "cat": os_release}[command]

    run.asked = asked  # type: ignore[attr-defined]
    return run


def test_the_installed_version_comes_first_and_alone() -> None:
    run = answers(dpkg="ii |1:2.3.19.1+dfsg1-2.1+deb12u7\n", policy=TRIXIE_POLICY)
    found = dovecot.find(run)
    assert not found.refused  # installed 2.3 stays: apt installs what is missing only
    assert run.asked == ["dpkg-query"]


def test_the_candidate_when_nothing_is_installed() -> None:
    run = answers(policy=TRIXIE_POLICY, os_release="ID=debian\nVERSION_ID=12\n")
    found = dovecot.find(run)
    assert found.refused
    assert found.said == (
        "would install Dovecot 1:2.4.1+dfsg1-6 (the candidate of apt-cache policy dovecot-core)"
    )
    assert run.asked == ["dpkg-query", "apt-cache"]


def test_the_release_when_apt_knows_no_dovecot() -> None:
    found = dovecot.find(answers(os_release=TRIXIE_OS_RELEASE))
    assert found.refused
    line = dovecot.problem("mx1.example.org", found)
    assert line == (
        "pyqmail_dovecot__enabled: mx1.example.org runs Debian 13, whose Dovecot is 2.4 (the "
        "release in /etc/os-release: dovecot-core is neither installed nor in the package "
        "lists); pyqmail_dovecot writes a Dovecot 2.3 configuration, and 2.4 reads none and "
        "has no checkpassword passdb, which the IMAP/POP3 logins use: set "
        "pyqmail_dovecot__enabled: false for this host, or run it on Debian 12"
    )


@pytest.mark.parametrize("os_release", ["ID=debian\nVERSION_ID=12\n", SID_OS_RELEASE, ""])
def test_nothing_refused_without_a_2_4_anywhere(os_release: str) -> None:
    found = dovecot.find(answers(os_release=os_release))
    assert found is None or dovecot.problem("h", found) == ""


def test_the_check_reads_the_host_only_when_dovecot_is_on() -> None:
    run = answers(os_release=TRIXIE_OS_RELEASE)
    values = {"inventory_hostname": "h", "host_run": run}
    assert list(dovecot.check_dovecot_version("pyqmail_dovecot__enabled", False, values)) == []
    assert run.asked == []
    # In-process checks (no action, no host): nothing to read, nothing said.
    assert list(dovecot.check_dovecot_version("x", True, {"inventory_hostname": "h"})) == []
    [line] = dovecot.check_dovecot_version("pyqmail_dovecot__enabled", True, values)
    assert line.startswith("pyqmail_dovecot__enabled: h runs Debian 13, whose Dovecot is 2.4")


@pytest.mark.parametrize(("host", "said"), DEBIAN_13_HOSTS)
def test_the_real_tools_read_a_debian_13_host_and_write_nothing(
    tmp_path: Path, host: dict[str, str], said: str
) -> None:
    """dpkg-query and apt-cache themselves, on a Debian 13 host's files under a directory."""
    root = write_host(tmp_path / "host", **host)
    before = tree(root)
    found = dovecot.find(local_run, str(root))
    assert found.said.startswith(said)
    assert found.refused
    assert tree(root) == before


def test_a_root_changes_where_the_tools_read_not_what_they_are() -> None:
    assert dovecot.dpkg_argv() == [
        "env",
        "LC_ALL=C",
        "dpkg-query",
        "--show",
        "--showformat=${db:Status-Abbrev}|${Version}\n",
        "dovecot-core",
    ]
    assert dovecot.policy_argv()[2:] == [
        "apt-cache",
        "-o",
        "Dir::Cache::pkgcache=",
        "-o",
        "Dir::Cache::srcpkgcache=",
        "policy",
        "dovecot-core",
    ]
    assert "--admindir=/h/var/lib/dpkg" in dovecot.dpkg_argv("/h")
    assert "Dir=/h/" in dovecot.policy_argv("/h/")
    assert dovecot.os_release_argv() == ["cat", "/etc/os-release", "/usr/lib/os-release"]
