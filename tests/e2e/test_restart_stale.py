"""pyqmail-restart-stale under real daemontools: our own svscan on a temporary service directory.

Three services run a copy of a real program (``sleep``) from their directory: ``upgraded``
runs it as the supervised process, ``master`` is a shell that forks it as a worker (the
supervised pid itself maps nothing replaced), ``unchanged`` runs it too (with a multilog
log service) and is never touched. The test replaces the program of the first two as dpkg
does (a new file renamed over the old one) and runs the tool as apt's hook would: both are
restarted (new pids), ``unchanged`` and its log keep theirs, ``--dry-run`` restarts nothing.
Services with a ``conftest`` beside ``run`` are restarted only when it passes.

The last test runs the real pyqmail-smtpd under supervise with a copy of libssl.so.3
(LD_LIBRARY_PATH): its supervisor never maps libssl, its workers do; deleting the copy gets
the service restarted through a worker's mapping.

svscan is stopped by PID at the end, after ``svc -dx`` of every service; anything still
running in the temporary tree is then killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import smtpd_command
from tests.svscan import own_svscan

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
        """The service's pid once it is up and, for a run script that ends in ``exec``, has
        exec'd its program: svstat says up from the fork, while the pid may still be
        /bin/sh reading ``run`` (under load, long enough for the tool to look at the shell
        instead of the program)."""
        run = (self.service_dir / name / "run").read_text().strip().splitlines()
        execs = run[-1].startswith("exec ")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid(name)
            if pid is not None and pid != other_than and not (execs and _in_run_script(pid)):
                return pid
            time.sleep(0.1)
        raise AssertionError(f"{name} not up with a pid other than {other_than} in {timeout} s")

    def worker(self, master: int, timeout: float = 10) -> int:
        """The one process the master forked."""
        deadline = time.monotonic() + timeout
        while not (children := _children(master)):
            assert time.monotonic() < deadline, f"master {master} forked no worker"
            time.sleep(0.1)
        return children[0]

    def tool(
        self, *args: str, service_dir: Path | None = None, wrapper: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*wrapper, sys.executable, "-m", "pyqmail.tools.restartstale", "--service-dir",
             str(service_dir or self.service_dir), *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip


def _in_run_script(pid: int) -> bool:
    """Whether ``pid`` still runs the shell of its ``run`` script (not yet exec'd)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return True  # gone or not yet readable: not ready either
    return Path(exe).name in {"sh", "dash", "bash"}


def _children(pid: int) -> list[int]:
    """The children of ``pid`` as the kernel lists them (not the code under test's walk)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return sorted(found)


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


@contextlib.contextmanager
def svscan(root: Path, service_dir: Path) -> Iterator[Daemontools]:
    """Our own svscan on ``service_dir``; at the end svc -dx of every service it started,
    then svscan's process group and anything still running under ``root``, by PID."""
    with own_svscan(service_dir, service_dir, root / "svscan.log", stragglers_under=root):
        yield Daemontools(root, service_dir)


@pytest.fixture(scope="module")
def dt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemontools]:
    root = tmp_path_factory.mktemp("restart-stale")
    service_dir = root / "service"
    service_dir.mkdir()
    for name in SERVICES:
        run = MASTER_RUN if name == "master" else RUN
        (service_dir / name).symlink_to(_service(root, name, run, log=name == "unchanged"))
    with svscan(root, service_dir) as daemontools:
        yield daemontools


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


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_unreadable_processes_are_reported_and_not_restarted(dt: Daemontools) -> None:
    """Root without CAP_SYS_PTRACE (a container's default) cannot read the maps of processes
    that have more: each service says so, exit 1, and nothing is restarted on a guess."""
    pids = {name: dt.wait_up(name) for name in SERVICES}
    proc = dt.tool(wrapper=("setpriv", "--bounding-set", "-sys_ptrace", "--"))
    assert (proc.returncode, proc.stdout) == (1, "")
    problems = proc.stderr.splitlines()
    assert len(problems) == len(SERVICES) + 1  # and unchanged/log
    for line in problems:
        assert line.startswith(f"pyqmail-restart-stale: {dt.service_dir}/")
        assert ": cannot read /proc/" in line
        assert line.endswith("; not restarted (reading other processes' maps needs root with "
                             "CAP_SYS_PTRACE, which a container may not grant)")  # fmt: skip
    time.sleep(1.5)
    assert {name: dt.pid(name) for name in SERVICES} == pids


def test_a_program_removed_not_replaced_is_reported_not_restarted(tmp_path: Path) -> None:
    """apt purge of a package whose daemon still runs supervised: its program is gone, not
    replaced. A restart would start nothing new (supervise would retry a missing program
    every second): the service is named with the file, exit 1, and it keeps running."""
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    (service_dir / "purged").symlink_to(_service(tmp_path, "purged", RUN))
    with svscan(tmp_path, service_dir) as daemontools:
        pid = daemontools.wait_up("purged")
        prog = tmp_path / "supervise" / "purged" / "prog"
        prog.unlink()
        proc = daemontools.tool()
        assert (proc.returncode, proc.stdout) == (1, "")
        assert proc.stderr == (
            f"pyqmail-restart-stale: {service_dir}/purged: pid {pid} (prog) runs {prog}, "
            f"deleted; not restarted: nothing new is at {prog} (removed, not upgraded: a "
            "restart would not start a new version; unlink the service if its package is gone)\n"
        )
        time.sleep(1.5)  # a restart would have happened by now
        assert daemontools.pid("purged") == pid


# A conftest that refuses, as doveconf 2.4 refuses a 2.3 configuration: exit status, stderr.
REFUSING = """#!/bin/sh
echo "doveconf: Fatal: Error in configuration file pyqmail.conf line 1: Unknown setting" >&2
echo "a second line, counted" >&2
exit 89
"""
# One that passes only in its service directory, beside its run script (as root, there).
ACCEPTING = "#!/bin/sh\ntest -f ./run && test -x ./prog\n"


def test_a_service_whose_conftest_refuses_is_reported_not_restarted(tmp_path: Path) -> None:
    """Three services whose program an upgrade replaced: ``refuses`` has a conftest that fails
    (the new program would not take the running configuration): it keeps its pid, is named
    with the check's exit status and first line, exit 1. ``accepts`` (conftest passes) and
    ``unchecked`` (none, as before conftests) are restarted. ``--dry-run`` runs the checks too
    and restarts nothing."""
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    names = ("accepts", "refuses", "unchecked")
    for name in names:
        (service_dir / name).symlink_to(_service(tmp_path, name, RUN))
    for name, script in (("accepts", ACCEPTING), ("refuses", REFUSING)):
        conftest = tmp_path / "supervise" / name / "conftest"
        conftest.write_text(script)
        conftest.chmod(0o755)
    with svscan(tmp_path, service_dir) as daemontools:
        pids = {name: daemontools.wait_up(name) for name in names}
        for name in names:
            replace(tmp_path / "supervise" / name / "prog")
        prog = tmp_path / "supervise" / "refuses" / "prog"
        refused = (
            f"pyqmail-restart-stale: {service_dir}/refuses: pid {pids['refuses']} (prog) runs "
            f"{prog}, deleted; not restarted: ./conftest failed (exit 89): doveconf: Fatal: Error"
            " in configuration file pyqmail.conf line 1: Unknown setting (+1 more line); it keeps"
            " running the old code\n"
        )

        dry = daemontools.tool("--dry-run")
        assert (dry.returncode, dry.stderr) == (1, refused)
        assert [line.split(":")[0] for line in dry.stdout.splitlines()] == [
            f"would restart {service_dir}/accepts",
            f"would restart {service_dir}/unchecked",
        ]
        time.sleep(1.5)  # a restart would have happened by now
        assert {name: daemontools.pid(name) for name in names} == pids

        done = daemontools.tool()
        assert (done.returncode, done.stderr) == (1, refused)
        assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
            f"restarted {service_dir}/accepts",
            f"restarted {service_dir}/unchecked",
        ]
        for name in ("accepts", "unchecked"):
            daemontools.wait_up(name, other_than=pids[name])
        time.sleep(1.5)  # a restart of refuses would have happened by now
        assert daemontools.pid("refuses") == pids["refuses"]

        # Its configuration fixed (the conftest passes now), the next run restarts it.
        (tmp_path / "supervise" / "refuses" / "conftest").write_text(ACCEPTING)
        fixed = daemontools.tool()
        assert (fixed.returncode, fixed.stderr) == (0, "")
        assert fixed.stdout.startswith(f"restarted {service_dir}/refuses: ")
        daemontools.wait_up("refuses", other_than=pids["refuses"])


def test_no_service_directory_is_an_error(dt: Daemontools) -> None:
    missing = dt.root / "no-such-dir"
    proc = dt.tool(service_dir=missing)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        f"pyqmail-restart-stale: no service directory {missing} (--service-dir); "
        "nothing restarted\n"
    )


def _libssl() -> Path:
    """The libssl3 this interpreter's ``_ssl`` module loads."""
    import _ssl

    out = subprocess.run(["ldd", _ssl.__file__], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if line.split()[0] == "libssl.so.3" and "=>" in line:
            return Path(line.split("=>")[1].split()[0]).resolve()
    pytest.skip("_ssl does not link libssl.so.3")


def _maps(pid: int, path: Path) -> bool:
    try:
        return f" {path} " in Path(f"/proc/{pid}/maps").read_text().replace("\n", " \n")
    except OSError:
        return False


def test_pyqmail_smtpd_is_restarted_when_only_its_workers_map_the_replaced_libssl(
    tmp_path: Path, qmail_root: Any
) -> None:
    """The real daemon: its supervisor (the supervised pid) never imports ``ssl``, its workers
    do. A libssl.so.3 copied outside the temporary trees (LD_LIBRARY_PATH) stands in for
    Debian's; deleting it is the upgrade. Only the process tree finds it."""
    code_dir = Path(tempfile.mkdtemp(prefix="pyqmail-libssl-", dir=_cache_dir()))
    try:
        code_dir.chmod(0o755)
        shutil.copy(_libssl(), code_dir / "libssl.so.3")
        service_dir = tmp_path / "service"
        service_dir.mkdir()
        src = Path(__import__("pyqmail").__file__).parents[1]
        argv = [*smtpd_command(), "--root", str(qmail_root.path), "--listen", "127.0.0.1:0",
                "--mode", "smtp", "--workers", "2"]  # fmt: skip
        if os.geteuid() == 0:
            argv += ["--user", "nobody"]
        sv = tmp_path / "supervise" / "qmail-smtpd"
        sv.mkdir(parents=True)
        (sv / "run").write_text(
            "#!/bin/sh\nexec 2>&1\n"
            f"PYTHONPATH={src} LD_LIBRARY_PATH={code_dir} exec {' '.join(argv)}\n"
        )
        (sv / "run").chmod(0o755)
        (service_dir / "qmail-smtpd").symlink_to(sv)
        lib = code_dir / "libssl.so.3"
        with svscan(tmp_path, service_dir) as daemontools:
            supervisor = daemontools.wait_up("qmail-smtpd", timeout=30)
            deadline = time.monotonic() + 30
            while not [p for p in _children(supervisor) if _maps(p, lib)]:
                assert time.monotonic() < deadline, "no worker mapped the copied libssl.so.3"
                time.sleep(0.2)
            assert not _maps(supervisor, lib)  # the supervisor alone would show nothing

            assert daemontools.tool().stdout == ""
            replace(lib)  # the upgrade: a new libssl.so.3 renamed over the old one
            done = daemontools.tool()
            assert (done.returncode, done.stderr) == (0, "")
            line, *more = done.stdout.splitlines()
            assert not more
            assert line.startswith(f"restarted {service_dir}/qmail-smtpd: pid ")
            assert line.endswith(f" maps {lib}, deleted")
            assert f"pid {supervisor} " not in line  # a worker's
            daemontools.wait_up("qmail-smtpd", other_than=supervisor, timeout=30)
    finally:
        shutil.rmtree(code_dir)


def _cache_dir() -> Path:
    """Outside /tmp, /var/tmp and /run, whose deleted files do not count."""
    base = Path.home() / ".cache"
    base.mkdir(exist_ok=True)
    return base
