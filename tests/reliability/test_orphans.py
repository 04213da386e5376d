"""A SIGKILLed pyqmail-smtpd parent must not leave its workers serving unsupervised.

Under supervise, the parent is the supervised process. If it dies by SIGKILL (OOM killer,
an admin's kill -9), supervise starts a new parent that binds the same port with
SO_REUSEPORT; workers of the dead parent that keep running would go on accepting
connections with the old configuration, never get TERM from ``svc -d`` and never be
counted against the connection limits of the new generation.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.e2e.conftest import StartDaemon


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_exit_when_parent_is_killed(smtpd: StartDaemon) -> None:
    daemon = smtpd(workers=2)
    workers = daemon.worker_pids() - {daemon.pid}
    assert len(workers) == 2
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # our own children's children: clean up by PID
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} still running 5 s after the parent died"
