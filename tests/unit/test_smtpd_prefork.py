"""pyqmail.smtpd.prefork: what the supervisor imports, and how it tells an upgrade."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from pyqmail.smtpd import prefork
from tests.interpreter import fresh_stdout


def test_the_supervisor_imports_none_of_the_daemon() -> None:
    """The supervisor's whole program (entry + prefork) loads no ssl, hashlib, asyncio,
    typing, dataclasses or argparse: each of them cost it megabytes (prefork's docstring);
    nor the Python halves of signal, threading, ctypes, contextlib (0.5-0.8 MiB each)."""
    code = (
        "import sys, pyqmail.smtpd.entry, pyqmail.smtpd.prefork\n"
        "heavy = {'ssl', '_ssl', 'hashlib', '_hashlib', 'asyncio', 'typing', 'dataclasses',"
        " 'argparse', 'pathlib', 'signal', 'enum', 'threading', 'ctypes', 'contextlib',"
        " 'collections'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyqmail')))"
    )
    out = fresh_stdout(code)
    heavy, ours = out.splitlines()
    assert heavy == "[]"
    assert ours == str(
        sorted(
            [
                "pyqmail",
                "pyqmail.log",
                "pyqmail.smtpd",
                "pyqmail.smtpd.entry",
                "pyqmail.smtpd.prefork",
                "pyqmail.ticketkeys",
            ]
        )
    )


def test_become_subreaper_adopts_the_orphans_of_a_child() -> None:
    """prctl through ``_ctypes`` alone: a grandchild whose parent exits becomes the child
    of the process that called ``become_subreaper`` (the workers, once their spawner exits)."""
    code = (
        "import os, sys, time\n"
        "from pyqmail.smtpd import prefork\n"
        "prefork.become_subreaper()\n"
        "read, write = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.5)\n"
        "        os.write(write, str(os.getppid()).encode())\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print(os.getpid(), os.read(read, 100).decode())\n"
        "os.wait()\n"
    )
    out = fresh_stdout(code)
    pid, grandchild_parent = out.split()
    assert grandchild_parent == pid


def test_code_identity_changes_when_a_loaded_module_file_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawner compares the files of the pyqmail modules the supervisor loaded with what
    is on disk now: a replaced file (an upgrade: new inode, size or time) is a change."""
    source = tmp_path / "probe.py"
    source.write_text("X = 1\n")
    module = types.ModuleType("pyqmail._probe")
    module.__file__ = str(source)
    monkeypatch.setitem(sys.modules, "pyqmail._probe", module)
    before = prefork.code_identity()
    assert (str(source), *_stat(source)) in before
    assert prefork.code_identity() == before
    replacement = tmp_path / "probe.new"
    replacement.write_text("X = 22\n")
    os.replace(replacement, source)  # as pip installs a file
    assert prefork.code_identity() != before
    source.unlink()
    assert (str(source), 0, 0, 0) in prefork.code_identity()


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns
