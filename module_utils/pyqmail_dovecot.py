"""The preflight check of the pyqmail_dovecot role that needs the host: which Dovecot it has or
would get (a row of CHECKS in pyqmail_inventory).

Why: Dovecot 2.4 (Debian 13's) reads no 2.3 configuration and has no checkpassword passdb,
through which every IMAP/POP3 login reaches pyqmail's users. The role's own check
(``roles/pyqmail_dovecot/tasks/version.yml``) runs in the Dovecot play, after the earlier plays
of site.yml have changed the host; the preflight runs before any of them, so it asks the host
here, with commands that only read, what is knowable without changing anything:

1. the installed ``dovecot-core`` (``dpkg-query``: dpkg's database), else
2. the version apt would install from the package lists already there (``apt-cache policy``;
   no ``apt update``, and no cache file written: ``Dir::Cache::pkgcache`` empty), else
3. the Debian release (``VERSION_ID`` of ``/etc/os-release``): 13 and later ship 2.4.

The role's check stays as the second line: after its ``apt update`` the candidate may differ.
Both compare the upstream version without the epoch: ``'1:2.4.1+dfsg1-6' is version('2.4',
'<')`` is true for Ansible's loose comparison (the epoch 1 is compared with the 2).

The commands run through ``run``, an argv-to-stdout callable (the action's: on the host;
tests': on this machine), under ``root``: ``/``, or a directory a test writes the host's
files into (dpkg's database, apt's configuration and lists, ``etc/os-release``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Problems = Iterator[str]
Run = Callable[[list[str]], str]

PACKAGE = "dovecot-core"
REFUSED = (2, 4)  # the first Dovecot whose configuration and passdbs differ
REFUSED_RELEASE = 13  # Debian 13 (trixie) ships Dovecot 2.4.1
C_LOCALE = ["env", "LC_ALL=C"]  # "Candidate:", not a translation
# Installed as the role pyqmail counts it (tasks/host.yml): the status's second letter is i,
# or a trigger is pending (W, t); not removed (c), never installed (n) or half-installed.
INSTALLED_RE = re.compile(r"^.[iWt]\S* *\|(\S+)$", re.MULTILINE)
CANDIDATE_RE = re.compile(r"^\s*Candidate:\s*(\S+)\s*$", re.MULTILINE)
UPSTREAM_RE = re.compile(r"(?:[0-9]+:)?([0-9]+(?:\.[0-9]+)*)")


@dataclass(frozen=True)
class Found:
    """The Dovecot a host has or would get: its upstream version, and what the host said
    (``has Dovecot 1:2.4.1+dfsg1-6 (installed: dpkg-query dovecot-core)``)."""

    upstream: tuple[int, ...]
    said: str

    @property
    def refused(self) -> bool:
        return self.upstream >= REFUSED


def upstream(version: str) -> tuple[int, ...] | None:
    """The leading numbers of a Debian version's upstream part, epoch and revision dropped:
    ``1:2.3.19.1+dfsg1-2.1+deb12u7`` is (2, 3, 19, 1); None when it starts with no number."""
    match = UPSTREAM_RE.match(version.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def installed_version(dpkg_output: str) -> str:
    """The installed version in ``dpkg-query``'s answer to ``dpkg_argv`` ("" when none)."""
    match = INSTALLED_RE.search(dpkg_output)
    return match.group(1) if match else ""


def candidate_version(policy: str) -> str:
    """The candidate of ``apt-cache policy``'s answer in the C locale ("" when none)."""
    match = CANDIDATE_RE.search(policy)
    return "" if not match or match.group(1) == "(none)" else match.group(1)


def debian_release(os_release: str) -> int | None:
    """The Debian major release of an os-release text; None for another distribution or a
    release without a number (testing and unstable have no VERSION_ID)."""
    fields: dict[str, str] = {}
    for line in os_release.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key not in fields:  # /etc/os-release is read first; it wins
            fields[key] = value.strip().strip("\"'")
    number = fields.get("VERSION_ID", "").partition(".")[0]
    return int(number) if fields.get("ID") == "debian" and number.isdigit() else None


def _under(root: str, path: str) -> str:
    return posixpath.join(root, path.lstrip("/"))


def dpkg_argv(root: str = "/") -> list[str]:
    """dpkg-query's status and version of the package: ``ii |1:2.3.19.1+dfsg1-2.1+deb12u7``."""
    admindir = [] if root == "/" else [f"--admindir={_under(root, '/var/lib/dpkg')}"]
    show = ["--show", "--showformat=${db:Status-Abbrev}|${Version}\n", PACKAGE]
    return [*C_LOCALE, "dpkg-query", *admindir, *show]


def policy_argv(root: str = "/") -> list[str]:
    """apt-cache policy from the lists already there, its cache files neither read nor
    written (a root run would otherwise rewrite a stale /var/cache/apt/pkgcache.bin)."""
    nocache = ["-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache="]
    under = [] if root == "/" else ["-o", f"Dir={root.rstrip('/')}/"]
    return [*C_LOCALE, "apt-cache", *under, *nocache, "policy", PACKAGE]


def os_release_argv(root: str = "/") -> list[str]:
    """Both os-release files (``/etc`` first, which wins; the other is its fallback)."""
    return ["cat", _under(root, "/etc/os-release"), _under(root, "/usr/lib/os-release")]


def find(run: Run, root: str = "/") -> Found | None:
    """The Dovecot the host has, else would install, else its release ships; None when none
    of these says (a release without a number, another distribution)."""
    version = installed_version(run(dpkg_argv(root)))
    numbers = upstream(version) if version else None
    if numbers:
        return Found(numbers, f"has Dovecot {version} (installed: dpkg-query {PACKAGE})")
    version = candidate_version(run(policy_argv(root)))
    numbers = upstream(version) if version else None
    if numbers:
        said = f"would install Dovecot {version} (the candidate of apt-cache policy {PACKAGE})"
        return Found(numbers, said)
    release = debian_release(run(os_release_argv(root)))
    if release is None:
        return None
    new = release >= REFUSED_RELEASE
    return Found(
        REFUSED if new else (2, 3),
        f"runs Debian {release}, whose Dovecot is {'2.4' if new else '2.3'} (the release in "
        f"/etc/os-release: {PACKAGE} is neither installed nor in the package lists)",
    )


def problem(host: str, found: Found) -> str:
    """The one line refusing ``found`` on ``host``, naming the way out ("" when it is fine)."""
    if not found.refused:
        return ""
    return (
        f"pyqmail_dovecot__enabled: {host} {found.said}; pyqmail_dovecot writes a Dovecot 2.3 "
        "configuration, and 2.4 reads none and has no checkpassword passdb, which the "
        "IMAP/POP3 logins use: set pyqmail_dovecot__enabled: false for this host, or run it "
        "on Debian 12"
    )


def check_dovecot_version(name: str, value: bool, values: Mapping[str, Any]) -> Problems:
    """pyqmail_dovecot__enabled on a host whose Dovecot is or would be 2.4 or later. Only
    where the preflight can ask the host (``host_run``, given by the action)."""
    del name
    run = values.get("host_run")
    if not value or run is None:
        return
    found = find(run, values.get("host_root") or "/")
    line = problem(str(values.get("inventory_hostname")), found) if found else ""
    if line:
        yield line
