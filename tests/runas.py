"""Run code as another user without touching /etc/passwd: numeric ids nobody uses.

The privilege tests need the daemons' users as the role creates them (pyqmaild and
pyqmails sharing group pyqmail, pyqmaild alone in pyqmaila). Adding users to the host would
change it for every other test and process, so the tests take ids that no user or group
has. A child starts as root, imports what it runs, then drops to those ids (uid, gid and
supplementary groups, as ``--user`` does with ``initgroups``) before it does anything: the
interpreter may live where only root can look (pyenv under /root), as for the daemons'
own ``--user`` drop.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IS_ROOT = os.geteuid() == 0


def spare_ids(count: int, start: int = 61000) -> list[int]:
    """``count`` ids that are neither a user's nor a group's on this host."""
    taken = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    out: list[int] = []
    n = start
    while len(out) < count:
        if n not in taken:
            out.append(n)
        n += 1
    return out


@dataclass(frozen=True)
class Ident:
    """A process identity: uid, primary gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    def argv(self) -> list[str]:
        return [str(self.uid), str(self.gid), json.dumps(list(self.groups))]


def _script(before_drop: str, after_drop: str) -> str:
    """A child's program: read the identity from argv[1:4], run ``before_drop`` (imports,
    as root), drop to the identity, run ``after_drop``."""
    return "\n".join(
        [
            "import importlib, json, os, sys",
            "uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])",
            before_drop,
            "os.setgroups(groups)",
            "os.setgid(gid)",
            "os.setuid(uid)",
            after_drop,
        ]
    )


# argparse imports shutil only when it builds a parser (for the terminal width), which main()
# does after the drop; the test interpreter may live where the dropped ids cannot read (here
# under /root, mode 0700), so it is imported before. The daemons' own --user drop comes after
# their argument parsing, and hosts run Debian's /usr/bin/python3, which everyone can read.
_MAIN = _script(
    "import shutil\n"
    "main = importlib.import_module(sys.argv[4]).main\n"
    "for name in sys.argv[5].split(','):\n"
    "    if name:\n"
    "        importlib.import_module(name)",
    "sys.exit(main(sys.argv[6:]))",
)
_PROBE = _script(
    "import errno\nops = json.loads(sys.argv[4])",
    r"""
out = []
for op, path, other in ops:
    try:
        if op == "list":
            os.listdir(path)
        elif op == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif op == "stat":
            os.stat(path)
        elif op == "write":
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        elif op == "create":
            os.close(os.open(os.path.join(path, other), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        elif op == "unlink":
            os.unlink(path)
        elif op == "rename":
            os.rename(path, other)
        else:
            raise SystemExit(f"unknown probe {op}")
        out.append("ok")
    except OSError as exc:
        out.append(errno.errorcode.get(exc.errno, str(exc.errno)))
print(json.dumps(out))
""",
)


def daemon_command(
    who: Ident, module: str, args: list[str], preload: tuple[str, ...] = ()
) -> list[str]:
    """Run ``module.main(args)`` as ``who`` (start it as root); ``preload``: modules the
    program imports only after it parsed its arguments (pyqmail.smtpd.start), imported
    as root with ``module`` (for the same reason as shutil, below)."""
    return [sys.executable, "-c", _MAIN, *who.argv(), module, ",".join(preload), *args]


def probe(who: Ident, ops: list[tuple[str, Path | str, Path | str]]) -> list[str]:
    """Try each (operation, path, second path) as ``who``; per operation "ok" or the errno
    name (EACCES, EPERM, ...). Operations: list, read, stat, unlink, rename, write (open an
    existing file for writing), create (a new file named by the second path in the first)."""
    encoded = json.dumps([(op, str(a), str(b)) for op, a, b in ops])
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *who.argv(), encoded],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: list[str] = json.loads(done.stdout)
    return result


def run_as(who: Ident, code: str, *args: str, preload: str = "import pyqmail.queue.store") -> Any:
    """Run ``code`` (Python that prints JSON; its arguments are ``sys.argv[4:]``) as ``who``,
    after ``preload`` ran as root; return the parsed output."""
    done = subprocess.run(
        [sys.executable, "-c", _script(preload, code), *who.argv(), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chown_tree(top: Path, uid: int, gid: int) -> None:
    """Give ``top`` and everything under it to uid:gid (directories keep setgid)."""
    for path in [top, *top.rglob("*")]:
        os.chown(path, uid, gid, follow_symlinks=False)
