# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What ``svstat`` says about a supervised directory: the one parser of its lines.

Shared by the Ansible side (``module_utils/pyqmail_svstat.py`` is a link to this file;
``module_utils/pyqmail_daemontools.py`` plans ``svc`` calls and waits on it) and by
``pyqmail-restart-stale`` (``tools/restartstale.py``), so it uses only the standard library.

``svstat`` (daemontools 0.76) prints one line per directory, always exit code 0::

    /etc/service/x: up (pid 1234) 56 seconds
    /etc/service/x: up (pid 1234) 56 seconds, normally down, paused, want down
    /etc/service/x: down 3 seconds, normally up, want up
    /etc/service/x: supervise not running
    /etc/service/x: unable to open supervise/ok: file does not exist
    /etc/service/x: unable to chdir: file does not exist

The seconds count from supervise's last change of state (start or stop of ``./run``), so a
service that keeps crashing shows ``up`` with a small, resetting count and a new pid each
time. ``want up`` / ``want down`` only appear when supervise has not yet reached the state
it was told to reach.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DAEMONTOOLS_DIRS", "Status", "SvstatError", "parse_svstat", "parse_svstat_line"]

# Where svc and svstat are looked for after $PATH: djb's own layout, then Debian's (apt's
# hooks and Ansible's modules may run with a short $PATH).
DAEMONTOOLS_DIRS = ("/command", "/usr/local/bin", "/usr/bin", "/bin")

_UP = re.compile(r"up \(pid (?P<pid>[0-9]+)\) (?P<seconds>[0-9]+) seconds(?P<flags>.*)")
_DOWN = re.compile(r"down (?P<seconds>[0-9]+) seconds(?P<flags>.*)")
_FLAGS = {"normally up", "normally down", "paused", "want up", "want down"}


class SvstatError(ValueError):
    """svstat printed something this parser does not understand."""


@dataclass(frozen=True)
class Status:
    """One directory as svstat reports it."""

    path: str
    supervised: bool
    up: bool = False
    pid: int | None = None
    seconds: int | None = None
    normally_up: bool | None = None
    want: str | None = None  # "up" / "down" while supervise has not reached it yet
    paused: bool = False
    error: str | None = None  # svstat's words when the directory is not supervised
    exists: bool = True

    @property
    def state(self) -> str:
        """``up``, ``down``, ``unsupervised`` or ``missing``."""
        if not self.exists:
            return "missing"
        if not self.supervised:
            return "unsupervised"
        return "up" if self.up else "down"


def parse_svstat_line(line: str, path: str | None = None) -> Status:
    """Parse one svstat line. ``path`` is the argument svstat was given (it may hold ': ')."""
    line = line.rstrip("\n")
    if path is not None:
        prefix = f"{path}: "
        if not line.startswith(prefix):
            raise SvstatError(f"svstat line {line!r} does not start with {prefix!r}")
        rest = line[len(prefix) :]
    else:
        path, sep, rest = line.partition(": ")
        if not sep:
            raise SvstatError(f"svstat line {line!r} has no 'DIR: ' prefix")
    if rest == "supervise not running":
        return Status(path=path, supervised=False, error=rest)
    if rest.startswith("unable to chdir: "):
        return Status(path=path, supervised=False, error=rest, exists=False)
    if rest.startswith("unable to "):
        # unable to open supervise/ok (no supervise yet), unable to read supervise/status ...
        return Status(path=path, supervised=False, error=rest)
    match = _UP.fullmatch(rest) or _DOWN.fullmatch(rest)
    if match is None:
        raise SvstatError(f"cannot parse svstat line {line!r}")
    flags: list[str] = []
    if match["flags"]:
        if not match["flags"].startswith(", "):
            raise SvstatError(f"cannot parse svstat line {line!r}")
        flags = match["flags"][2:].split(", ")
    unknown = [f for f in flags if f not in _FLAGS]
    if unknown:
        raise SvstatError(f"unknown svstat flag(s) {unknown} in {line!r}")
    up = match.re is _UP
    # svstat names the default only when it differs from the current state.
    normally_up = "normally down" not in flags if up else "normally up" in flags
    want = "up" if "want up" in flags else "down" if "want down" in flags else None
    return Status(
        path=path,
        supervised=True,
        up=up,
        pid=int(match["pid"]) if up else None,
        seconds=int(match["seconds"]),
        normally_up=normally_up,
        want=want,
        paused="paused" in flags,
    )


def parse_svstat(output: str, paths: Sequence[str]) -> list[Status]:
    """Parse the output of ``svstat PATH...``: one Status per path, in order."""
    lines = output.splitlines()
    if len(lines) != len(paths):
        raise SvstatError(f"svstat printed {len(lines)} lines for {len(paths)} directories")
    return [parse_svstat_line(line, path) for line, path in zip(lines, paths, strict=True)]
