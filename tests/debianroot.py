"""A Debian host's package state written under a directory, for the real dpkg-query and
apt-cache to read (``--admindir``, ``-o Dir=``) as they read a host's.

The preflight's Dovecot check (module_utils/pyqmail_dovecot.py) reads the installed
dovecot-core, else apt's candidate, else the release; a test cannot make this machine Debian
13, so it writes what a Debian 13 host has and points the readers' root at it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
# What Debian 13 (trixie) ships: the version is 2.4's, epoch and all.
TRIXIE_DOVECOT = "1:2.4.1+dfsg1-6"
TRIXIE_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 13 (trixie)"
NAME="Debian GNU/Linux"
VERSION_ID="13"
VERSION="13 (trixie)"
VERSION_CODENAME=trixie
DEBIAN_VERSION_FULL=13.1
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"""
# The three ways a Debian 13 host tells its Dovecot (write_host's arguments), each with what
# the preflight says it read.
DEBIAN_13_HOSTS = [
    (
        {"installed": TRIXIE_DOVECOT},
        f"has Dovecot {TRIXIE_DOVECOT} (installed: dpkg-query dovecot-core)",
    ),
    (
        {"candidate": TRIXIE_DOVECOT},
        f"would install Dovecot {TRIXIE_DOVECOT} (the candidate of apt-cache policy dovecot-core)",
    ),
    (
        {},
        "runs Debian 13, whose Dovecot is 2.4 (the release in /etc/os-release: dovecot-core "
        "is neither installed nor in the package lists)",
    ),
]


def architecture() -> str:
    """This machine's dpkg architecture: apt reads the lists of it alone."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def stanza(version: str, status: str = "") -> str:
    """dovecot-core's paragraph of a dpkg status file (``status``) or an apt list (none)."""
    fields = ["Package: dovecot-core"]
    if status:
        fields.append(f"Status: {status}")
    fields += [
        "Maintainer: Dovecot Maintainers <dovecot@packages.debian.org>",
        f"Architecture: {architecture()}",
        f"Version: {version}",
        "Description: secure POP3/IMAP server - core files",
    ]
    return "\n".join(fields) + "\n\n"


def write_host(
    root: Path,
    *,
    installed: str = "",
    candidate: str = "",
    suite: str = "trixie",
    os_release: str = TRIXIE_OS_RELEASE,
) -> Path:
    """A host under ``root``: dovecot-core ``installed`` (dpkg's status) and ``candidate``
    (apt's lists for ``suite`` of Debian's mirror), "" for neither; its os-release."""
    dpkg = root / "var" / "lib" / "dpkg"
    dpkg.mkdir(parents=True)
    (dpkg / "status").write_text(stanza(installed, "install ok installed") if installed else "")
    apt = root / "etc" / "apt"
    for sub in ("sources.list.d", "preferences.d", "apt.conf.d"):
        (apt / sub).mkdir(parents=True)
    (apt / "sources.list").write_text(f"deb {MIRROR} {suite} main\n")
    lists = root / "var" / "lib" / "apt" / "lists"
    lists.mkdir(parents=True)
    if candidate:
        name = f"deb.debian.org_debian_dists_{suite}_main_binary-{architecture()}_Packages"
        (lists / name).write_text(stanza(candidate))
    (root / "etc" / "os-release").write_text(os_release)
    return root


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time: equal before and after
    means nothing there was written."""
    return {
        str(path.relative_to(root)): (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in [root, *root.rglob("*")]
    }
