"""pyqmail-sendmail's command line: --help, and refused options exit 64 with a message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pyqmail-sendmail"), *args],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_help_prints_usage_and_exits_0() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("pyqmail-sendmail: the sendmail-compatible injector")
    assert "-f ADDR" in proc.stdout
    assert "Exit codes" in proc.stdout
    assert proc.stderr == ""


def test_unknown_option_exits_64_naming_it() -> None:
    proc = run("--bogus")
    assert proc.returncode == 64
    assert proc.stderr == "pyqmail-sendmail: unsupported option '--bogus'\n"


def test_unsupported_mode_exits_64_naming_it() -> None:
    proc = run("-bs")
    assert proc.returncode == 64
    assert "mode '-bs' is not supported" in proc.stderr
