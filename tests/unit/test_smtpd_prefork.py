"""pyqmail.smtpd.prefork: what the supervisor imports, and how it tells an upgrade."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pyqmail.smtpd import prefork


def test_the_supervisor_imports_none_of_the_daemon() -> None:
    """The supervisor's whole program (entry + prefork) loads no ssl, hashlib, asyncio,
    typing, dataclasses or argparse: each of them cost it megabytes (prefork's docstring)."""
    code = (
        "import sys, pyqmail.smtpd.entry, pyqmail.smtpd.prefork\n"
        "heavy = {'ssl', '_ssl', 'hashlib', '_hashlib', 'asyncio', 'typing', 'dataclasses',"
        " 'argparse', 'pathlib'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyqmail')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    heavy, ours = done.stdout.splitlines()
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
