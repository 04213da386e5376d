"""Our own svscan, for the tests that run services under real daemontools.

svscan runs in a process group of its own (ours alone to stop). At the end it goes first, so
that it restarts nothing; then every service (and log service) under ``supervised`` that has
a supervise directory is taken down and told to exit (``svc -dx``), waited for (``svok``),
and what is left of svscan's process group is killed, by PID; with ``stragglers_under``,
every process whose working directory is inside it too (a service's own children).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def processes_under(root: Path) -> list[int]:
    """Pids whose working directory is inside ``root`` (services started by our svscan)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{entry}/cwd")
                if cwd == str(root) or cwd.startswith(f"{root}/"):
                    pids.append(int(entry))
    return pids


@contextlib.contextmanager
def own_svscan(
    service_dir: Path,
    supervised: Path,
    log: Path,
    *,
    stragglers_under: Path | None = None,
    settle: float = 10,
) -> Iterator[subprocess.Popen[bytes]]:
    """svscan on ``service_dir``, its output in ``log``; ``supervised`` is the directory whose
    entries are the services to take down at the end (the supervise directories, or the
    service directory's links to them); ``settle`` how long they may take to stop."""
    with log.open("wb") as out:
        svscan = subprocess.Popen(
            ["svscan", str(service_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: ours alone to stop
        )
    try:
        yield svscan
    finally:
        svscan.terminate()
        svscan.wait(timeout=10)
        entries = sorted(supervised.iterdir()) if supervised.is_dir() else []
        dirs = [d for d in entries if (d / "supervise").is_dir()]
        dirs += [d / "log" for d in dirs if (d / "log" / "supervise").is_dir()]
        if dirs:
            subprocess.run(["svc", "-dx", *map(str, dirs)], check=False, capture_output=True)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and any(
            subprocess.run(["svok", str(d)], check=False).returncode == 0 for d in dirs
        ):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svscan.pid, signal.SIGKILL)
        for pid in processes_under(stragglers_under) if stragglers_under else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
