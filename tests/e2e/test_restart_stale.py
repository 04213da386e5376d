"""pyqmail-restart-stale under real daemontools: our own svscan on a temporary service directory.

Three services run a copy of a real program (``sleep``) from their directory: ``upgraded``
runs it as the supervised process, ``master`` is a shell that forks it as a worker (the
supervised pid itself maps nothing replaced), ``unchanged`` runs it too (with a multilog
log service) and is never touched. The test replaces the program of the first two as dpkg
does (a new file renamed over the old one) and runs the tool as apt's hook would: both are
restarted (new pids), ``unchanged`` and its log keep theirs, ``--dry-run`` restarts nothing.

svscan is stopped by PID at the end, after ``svc -dx`` of every service; anything still
running in the temporary tree is then killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyqmail.procmaps import process_tree

pytestmark = pytest.mark.skipif(
    shutil.which("svscan") is None, reason="daemontools not installed (scripts/install-system-deps)"
)

RUN = "#!/bin/sh\nexec 2>&1\nexec ./prog 1000\n"
# A master that forks a worker and stops it on TERM, as pyqmail-smtpd's supervisor does.
MASTER_RUN = """#!/bin/sh
exec 2>&1
./prog 1000 &
worker=$!
trap 'kill $worker; exit 0' TERM
wait
"""
LOG_RUN = "#!/bin/sh\nexec multilog t ./main\n"
SERVICES = ("master", "unchanged", "upgraded")


@dataclass
class Daemontools:
    root: Path
    service_dir: Path

    def pid(self, name: str) -> int | None:
        out = subprocess.run(
            ["svstat", str(self.service_dir / name)], capture_output=True, text=True, check=True
        ).stdout
        return int(out.split("(pid ")[1].split(")")[0]) if ": up (pid " in out else None

    def wait_up(self, name: str, other_than: int | None = None, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid(name)
            if pid is not None and pid != other_than:
                return pid
            time.sleep(0.1)
        raise AssertionError(f"{name} not up with a pid other than {other_than} in {timeout} s")

    def worker(self, master: int, timeout: float = 10) -> int:
        """The one process the master forked."""
        deadline = time.monotonic() + timeout
        while len(tree := process_tree(master)) < 2:
            assert time.monotonic() < deadline, f"master {master} forked no worker"
            time.sleep(0.1)
        return tree[1]

    def tool(self, *args: str, service_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyqmail.tools.restartstale", "--service-dir",
             str(service_dir or self.service_dir), *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


def _processes_under(root: Path) -> list[int]:
    """Pids whose working directory is inside ``root`` (services started by our svscan)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{entry}/cwd")
                if cwd == str(root) or cwd.startswith(f"{root}/"):
                    pids.append(int(entry))
    return pids


def _service(root: Path, name: str, run: str, *, log: bool = False) -> Path:
    path = root / "supervise" / name
    path.mkdir(parents=True)
    shutil.copy(shutil.which("sleep") or "/bin/sleep", path / "prog")
    (path / "run").write_text(run)
    (path / "run").chmod(0o755)
    if log:
        (path / "log").mkdir()
        (path / "log" / "run").write_text(LOG_RUN)
        (path / "log" / "run").chmod(0o755)
    return path


@pytest.fixture(scope="module")
def dt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemontools]:
    root = tmp_path_factory.mktemp("restart-stale")
    service_dir = root / "service"
    service_dir.mkdir()
    for name in SERVICES:
        run = MASTER_RUN if name == "master" else RUN
        (service_dir / name).symlink_to(_service(root, name, run, log=name == "unchanged"))
    with (root / "svscan.log").open("wb") as log:
        svscan = subprocess.Popen(
            ["svscan", str(service_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: ours alone to stop
        )
    dirs = [service_dir / n for n in SERVICES] + [service_dir / "unchanged" / "log"]
    try:
        yield Daemontools(root, service_dir)
    finally:
        svscan.terminate()
        svscan.wait(timeout=10)
        subprocess.run(["svc", "-dx", *map(str, dirs)], check=False, capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            subprocess.run(["svok", str(d)], check=False).returncode == 0 for d in dirs
        ):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(svscan.pid, signal.SIGKILL)
        for pid in _processes_under(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def replace(path: Path) -> None:
    """What dpkg does: the new file written beside, then renamed over the old one."""
    new = path.with_name(path.name + ".dpkg-new")
    shutil.copy(path, new)
    os.rename(new, path)


def test_restarts_only_the_services_running_replaced_code(dt: Daemontools) -> None:
    pids = {name: dt.wait_up(name) for name in SERVICES}
    log_pid = dt.wait_up("unchanged/log")
    worker = dt.worker(pids["master"])

    # Nothing replaced: nothing to say, nothing restarted.
    quiet = dt.tool()
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")

    for name in ("master", "upgraded"):
        replace(dt.root / "supervise" / name / "prog")

    dry = dt.tool("--dry-run")
    assert (dry.returncode, dry.stderr) == (0, "")
    assert dry.stdout.splitlines() == [
        f"would restart {dt.service_dir}/master: pid {worker} (prog) runs "
        f"{dt.root}/supervise/master/prog, deleted",
        f"would restart {dt.service_dir}/upgraded: pid {pids['upgraded']} (prog) runs "
        f"{dt.root}/supervise/upgraded/prog, deleted",
    ]
    time.sleep(1.5)  # a restart would have happened by now
    assert {name: dt.pid(name) for name in SERVICES} == pids

    done = dt.tool()
    assert (done.returncode, done.stderr) == (0, "")
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        f"restarted {dt.service_dir}/master",
        f"restarted {dt.service_dir}/upgraded",
    ]
    for name in ("master", "upgraded"):
        dt.wait_up(name, other_than=pids[name])
    assert dt.pid("unchanged") == pids["unchanged"]
    assert dt.pid("unchanged/log") == log_pid

    # The new processes run the new program: nothing left to do.
    time.sleep(0.5)  # the master's new worker
    again = dt.tool()
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")


def test_no_service_directory_is_an_error(dt: Daemontools) -> None:
    missing = dt.root / "no-such-dir"
    proc = dt.tool(service_dir=missing)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        f"pyqmail-restart-stale: no service directory {missing} (--service-dir); "
        "nothing restarted\n"
    )
