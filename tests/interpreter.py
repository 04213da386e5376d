"""Code run by a fresh interpreter, for what a process does from its start (which modules it
imports, what a daemon's first lines set up): the test process itself has long passed that."""

from __future__ import annotations

import subprocess
import sys


def fresh_stdout(code: str, *args: str, timeout: float = 60) -> str:
    """The standard output of ``python -c code args...`` (this interpreter, this
    environment); CalledProcessError, with its stderr, if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    return done.stdout
