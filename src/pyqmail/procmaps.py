"""Which running processes still execute code a package upgrade deleted or replaced.

dpkg replaces a file by renaming the new one over it: a process that had the old one mapped
keeps it (the kernel keeps the inode alive) and ``/proc/PID/maps`` shows the mapping's path
with `` (deleted)`` after it; ``/proc/PID/exe`` does the same for the program itself. That is
how Debian's ``needrestart`` finds the daemons a security update has not reached yet, and
these are its rules (liske/needrestart, the script ``needrestart``, the loop "read file
mappings (Linux 2.0+)", and ``ex/needrestart.conf``, ``$nrconf{blacklist_mappings}``):

- ``/proc/PID/exe`` ending in `` (deleted)``: the program itself was replaced.
- A ``maps`` line counts only if it maps a file (inode not 0, a path) with execute
  permission (``x``): code, not data. The Python files a daemon reads are not mapped at all;
  its C extensions, ``libssl``, ``libc`` and the interpreter are.
- Not device or anonymous memory that merely looks like a file: ``/SYSV<key>`` (SysV shared
  memory), ``/drm ...``, anything under ``/dev/`` (``/dev/shm``, ``/dev/zero``),
  ``/memfd:...`` and ``/[aio]``.
- Not a file under ``/tmp/``, ``/var/tmp/``, ``/run/`` or ``/var/run/``: a process's own
  temporary code (libffi's closures, JIT pages) that it deleted on purpose, nothing a
  package ships; nor GStreamer's ``orcexec.*`` JIT files wherever they are.

needrestart's other entries (plasmashell's ``/#<n>``, Java's JNA temporary libraries) are
desktop and Java leftovers that no service here maps, and are left out. needrestart also
compares a still existing path's inode with the mapping's (its "obsolete" check), through
``/proc/PID/map_files/``; for root that link leads to the mapped inode itself, so the two
always agree and the check never fires on a host like ours: it is not copied either. The
Linux-VServer spelling ``(deleted)/path`` does not occur on Debian's kernels.

The processes of a service are its supervised pid and every process forked from it, found
by their parent pids in ``/proc/*/stat`` (needrestart climbs from each process to its parent
instead; the supervised pid is known here, so the walk goes down). The master alone would
miss what matters most: pyqmail-smtpd's supervisor never imports ``ssl`` (``smtpd/prefork.py``),
its workers (its children: it is their subreaper) map ``libssl3``; Dovecot's master ``exec``s
its children, and an ``imap-login`` started before the upgrade keeps the old ``libssl3``
whatever the master maps.

Not covered (as needrestart's interpreter scan, ``Interp/Python.pm``, would): a pure-Python
dependency updated under a running daemon (python3-dnspython, python3-dkim, ...) maps nothing;
its ``.py`` files are read once, not mapped. A new pyqmail wheel restarts the daemons through
the role's handler.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

__all__ = ["Stale", "StaleError", "children_map", "deleted_code", "process_tree", "stale_code"]

DELETED = " (deleted)"
PROC = "/proc"

# Paths of deleted mappings that are not code a package shipped (see the module docstring).
_NOT_PACKAGED = re.compile(
    r"^/SYSV[0-9a-fA-F]{8}$"  # SysV shared memory
    r"|^/drm(\s|$)"  # graphics buffers
    r"|^/dev/"  # /dev/shm, /dev/zero
    r"|^/memfd:"  # memfd_create(2)
    r"|^/\[aio\]"  # aio(7) rings
    r"|^(/var)?/tmp/"  # a process's own temporary files
    r"|^(/var)?/run/"
    r"|/orcexec\.\w+$"  # GStreamer's Oil Runtime Compiler JIT files
)


class StaleError(Exception):
    """A process's exe or maps could not be read (not: the process is gone)."""


@dataclass(frozen=True)
class Stale:
    """One process that runs deleted code: which pid, its name, and the first such file."""

    pid: int
    name: str  # /proc/PID/comm
    path: str  # without " (deleted)"
    exe: bool  # the program itself, not a library it maps

    def __str__(self) -> str:
        what = "runs" if self.exe else "maps"
        return f"pid {self.pid} ({self.name}) {what} {self.path}, deleted"


def deleted_code(line: str) -> str | None:
    """The file of one ``/proc/PID/maps`` line when it is executable code since deleted and
    not one of the paths above that a package never ships; None otherwise."""
    fields = line.rstrip("\n").split(maxsplit=5)
    if len(fields) < 6:
        return None  # anonymous memory: no path
    _range, perms, _offset, _device, inode, path = fields
    if "x" not in perms or inode == "0" or not path.endswith(DELETED):
        return None
    path = path.removesuffix(DELETED)
    return None if _NOT_PACKAGED.search(path) else path


def children_map() -> dict[int, list[int]]:
    """Every process's children, from one pass over ``/proc`` (a caller looking at several
    trees reads it once)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents():
        children.setdefault(parent, []).append(child)
    return children


def process_tree(pid: int, children: Mapping[int, list[int]] | None = None) -> list[int]:
    """``pid`` and every process forked from it, parents first; [] when ``pid`` is gone.
    ``children``: a ``children_map()`` already read, else one is read now."""
    if children is None:
        children = children_map()
    if not os.path.isdir(os.path.join(PROC, str(pid))):
        return []
    tree, seen = [pid], {pid}
    for member in tree:  # grows while it is walked: breadth first
        for child in sorted(children.get(member, [])):
            if child not in seen:
                seen.add(child)
                tree.append(child)
    return tree


def _parents() -> Iterator[tuple[int, int]]:
    """(pid, parent pid) of every process; the name in ``stat`` may hold spaces and ')'."""
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(PROC, entry, "stat"), "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if len(fields) > 1:
            yield int(entry), int(fields[1])


def stale_code(pids: Iterable[int]) -> Stale | None:
    """The first of ``pids`` that runs deleted code, or None. A process that is gone is
    skipped (whatever replaces it starts from the new files); one whose ``exe`` or ``maps``
    cannot be read raises StaleError: not knowing is not "nothing to do"."""
    for pid in pids:
        found = _stale_pid(pid)
        if found is not None:
            return found
    return None


def _stale_pid(pid: int) -> Stale | None:
    where = os.path.join(PROC, str(pid))
    try:
        exe = os.readlink(os.path.join(where, "exe"))
        with open(os.path.join(where, "maps"), encoding="utf-8", errors="replace") as f:
            path = next((p for p in map(deleted_code, f) if p is not None), None)
    except (FileNotFoundError, ProcessLookupError):
        return None  # exited (or a kernel thread: no exe)
    except OSError as exc:
        raise StaleError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    if exe.endswith(DELETED):
        return Stale(pid, _name(where), exe.removesuffix(DELETED), exe=True)
    if path is not None:
        return Stale(pid, _name(where), path, exe=False)
    return None


def _name(where: str) -> str:
    try:
        with open(os.path.join(where, "comm"), encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"
