"""Greylisting test helpers (``pyqmail.checks.greylist``): the settings and the clock the
tests decide with, and workers deciding at once in processes of their own (as pyqmail-smtpd's
workers share one SQLite file: a test process alone would never see their races)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pyqmail.checks.greylist import Settings

GREY = Settings(delay=300, lifetime=3600)
T0 = 1_000_000.0


def at_once(script: str, root: Path, workers: int = 2, timeout: float = 60) -> list[str]:
    """The standard output of each of ``workers`` interpreters running ``script`` with
    ``root`` as its argument. The script reads a line from its standard input before its
    work: that line is written to every worker once all are started, so their work overlaps.
    A worker that fails fails the test, with its standard error."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [proc.communicate(timeout=timeout) for proc in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    return [out for out, _ in results]
