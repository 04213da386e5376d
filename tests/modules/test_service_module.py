"""pyqmail_service against real daemontools: our own svscan on a temporary service directory.

The svscan started here is stopped by PID at the end, after ``svc -dx`` of every service it
supervises; any process still running in the temporary tree is then killed by PID.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.modules.utils import (
    AnsibleExitJson,
    AnsibleFailJson,
    run_module,
    set_module_args,
    skip_where_system_python_has_pyqmail,
)
from tests.svscan import own_svscan

# library/ is on sys.path once tests.modules.utils is imported
pyqmail_service = importlib.import_module("pyqmail_service")

pytestmark = pytest.mark.skipif(
    shutil.which("svscan") is None, reason="daemontools not installed (scripts/install-system-deps)"
)

LOOP = """#!/bin/sh
# a small service: ticks every 0.2 s, writes a marker on HUP, dies on TERM
exec 2>&1
trap 'echo "got HUP"; echo hup >> ../hup-marker' HUP
echo "starting, pid $$"
while :; do
  echo tick
  sleep 0.2 &
  wait $!
done
"""
RUN = "#!/bin/sh\nexec 2>&1\nexec ./loop\n"
LOG_RUN = "#!/bin/sh\nexec multilog t s4096 n2 ./main\n"
CRASH = "#!/bin/sh\necho 'fatal: unable to bind 192.0.2.1:25: address not available'\nexit 111\n"


@dataclass
class Daemontools:
    root: Path
    service_dir: Path  # what svscan watches
    supervise: Path  # where the supervise directories live (src)
    svscan: subprocess.Popen[bytes]

    def svstat(self, path: Path) -> str:
        return subprocess.run(
            ["svstat", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()

    def pid(self, name: str) -> int | None:
        out = self.svstat(self.supervise / name)
        if ": up (pid " not in out:
            return None
        return int(out.split("(pid ")[1].split(")")[0])


@pytest.fixture(scope="module")
def dt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemontools]:
    root = tmp_path_factory.mktemp("daemontools")
    service_dir = root / "service"
    supervise = root / "supervise"
    service_dir.mkdir()
    supervise.mkdir()
    with own_svscan(service_dir, supervise, root / "svscan.log", stragglers_under=root) as svscan:
        yield Daemontools(root, service_dir, supervise, svscan)


def module(args: dict[str, Any], *, check: bool = False, diff: bool = False) -> dict[str, Any]:
    args = dict(args)
    if check:
        args["_ansible_check_mode"] = True
    if diff:
        args["_ansible_diff"] = True
    with set_module_args(args), pytest.raises(AnsibleExitJson) as info:
        pyqmail_service.main()
    return info.value.result


def module_fails(args: dict[str, Any]) -> dict[str, Any]:
    with set_module_args(args), pytest.raises(AnsibleFailJson) as info:
        pyqmail_service.main()
    return info.value.result


def base(dt: Daemontools, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "src": str(dt.supervise / name),
        "service_dir": str(dt.service_dir),
        "wait": 1,
        "timeout": 20,
        **extra,
    }


def snapshot(path: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every file and link under ``path`` with its mode and content (or link target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        if "supervise" in p.relative_to(path).parts or "main" in p.relative_to(path).parts:
            continue  # supervise's and multilog's own state
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[str(p)] = (st.st_mode, os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            out[str(p)] = (st.st_mode, p.read_bytes())
    return out


def _read(path: Path) -> str:
    """A log file's text so far ("" before multilog created it)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def prepare_loop(dt: Daemontools, name: str) -> None:
    """The loop script is a second file the run script execs; the module writes run/log_run."""
    src = dt.supervise / name
    src.mkdir()
    (src / "loop").write_text(LOOP)
    (src / "loop").chmod(0o755)


def test_lifecycle_in_process(dt: Daemontools) -> None:
    name = "loop"
    prepare_loop(dt, name)
    src = dt.supervise / name
    link = dt.service_dir / name
    args = base(dt, name, run=RUN, log_run=LOG_RUN)

    # check mode: reports the change, touches nothing
    before = snapshot(dt.root / "service") | snapshot(src)
    r = module({**args, "state": "up"}, check=True, diff=True)
    assert r["changed"] is True
    assert r["actions"][:3] == [f"wrote {src}/run", f"created {src}/log", f"wrote {src}/log/run"]
    assert r["actions"][3:] == ["linked"]  # supervise will start it: no svc -u needed
    assert r["diff"][0] == {
        "before_header": f"{src}/run",
        "after_header": f"{src}/run",
        "before": "",
        "after": RUN,
    }
    assert snapshot(dt.root / "service") | snapshot(src) == before
    assert not link.exists()

    # real run: written, linked, waited for svscan, up for 1 s
    start = time.monotonic()
    r = module({**args, "state": "up"})
    assert r["changed"] is True
    assert r["state"] == "up"
    assert r["uptime"] >= 1
    assert r["pid"] == dt.pid(name)
    assert r["log_state"] == "up"
    assert r["log_pid"] > 0
    assert time.monotonic() - start < 15
    assert os.readlink(link) == str(src)
    for script, content in (("run", RUN), ("log/run", LOG_RUN)):
        assert (src / script).read_text() == content
        assert stat.S_IMODE((src / script).stat().st_mode) == 0o755
    pid = r["pid"]

    # idempotent, also in check mode
    for check in (True, False):
        r = module({**args, "state": "up"}, check=check)
        assert (r["changed"], r["pid"], r["actions"]) == (False, pid, []), r
    assert dt.pid(name) == pid

    # restarted: check mode sends nothing; a real run gets a new pid, up for 1 s
    r = module({**args, "state": "restarted"}, check=True)
    assert (r["changed"], r["actions"]) == (True, ["svc -t"])
    time.sleep(0.3)
    assert dt.pid(name) == pid
    r = module({**args, "state": "restarted"})
    assert r["changed"] is True
    assert r["pid"] != pid
    assert r["uptime"] >= 1
    assert r["pid"] == dt.pid(name)
    pid = r["pid"]

    # reloaded: HUP reaches the script (it writes a marker) and the pid stays. First wait
    # for its "starting" line, logged after its trap is set: on a loaded machine a script
    # up for a second had not always run its first lines (a HUP then killed it).
    current = src / "log" / "main" / "current"
    deadline = time.monotonic() + 10
    while f"starting, pid {pid}" not in _read(current) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"starting, pid {pid}" in _read(current)
    marker = dt.supervise / "hup-marker"
    r = module({**args, "state": "reloaded"})
    assert (r["changed"], r["actions"], r["pid"]) == (True, ["svc -h"], pid)
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "hup\n"

    # down, twice; up again from check mode (nothing sent) then for real
    r = module({**args, "state": "down"})
    assert (r["changed"], r["state"], r["pid"]) == (True, "down", None)
    assert ": down " in dt.svstat(src)
    r = module({**args, "state": "down"})
    assert (r["changed"], r["actions"]) == (False, [])
    r = module({**args, "state": "up"}, check=True)
    assert (r["changed"], r["actions"]) == (True, ["svc -u"])
    time.sleep(0.3)
    assert ": down " in dt.svstat(src)
    r = module({**args, "state": "up"})
    assert (r["changed"], r["state"]) == (True, "up")
    pid = r["pid"]

    # a new run script: written with a diff, no restart by itself
    new_run = RUN.replace("exec 2>&1\n", "exec 2>&1\necho 'run v2'\n")
    r = module({**args, "run": new_run, "state": "up"}, diff=True)
    assert r["changed"] is True
    assert r["actions"] == [f"wrote {src}/run"]
    assert r["diff"][0]["before"] == RUN
    assert r["diff"][0]["after"] == new_run
    assert r["pid"] == pid

    # a mode-only change of a script is a change too
    (src / "run").chmod(0o700)
    r = module({**args, "run": new_run, "state": "up"})
    assert (r["changed"], r["actions"]) == (True, [f"chmod 0755 {src}/run"])
    assert stat.S_IMODE((src / "run").stat().st_mode) == 0o755

    # the down file
    r = module({**args, "run": new_run, "down": True, "state": "up"})
    assert (r["changed"], r["normally_up"]) == (True, False)
    assert (src / "down").exists()
    r = module({**args, "run": new_run, "down": False, "state": "up"})
    assert (r["changed"], r["normally_up"]) == (True, True)
    assert not (src / "down").exists()

    # the service's output went through multilog
    log = (src / "log" / "main" / "current").read_text()
    assert "tick" in log
    assert "got HUP" in log

    # absent: check mode keeps everything, then unlink and svc -dx both
    r = module({"name": name, "service_dir": str(dt.service_dir), "state": "absent"}, check=True)
    assert r["changed"] is True
    assert os.path.islink(link)
    assert dt.pid(name) == pid
    r = module({"name": name, "service_dir": str(dt.service_dir), "state": "absent"})
    assert r["changed"] is True
    assert r["actions"] == [f"unlinked {link}", f"svc -dx {src}", f"svc -dx {src}/log"]
    assert not os.path.lexists(link)
    assert dt.svstat(src).endswith("supervise not running")
    assert dt.svstat(src / "log").endswith("supervise not running")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        pytest.fail(f"service pid {pid} still running after absent")
    r = module(
        {"name": name, "service_dir": str(dt.service_dir), "src": str(src), "state": "absent"}
    )
    assert (r["changed"], r["state"]) == (False, "absent")


def test_crashing_service_fails_with_its_log(dt: Daemontools) -> None:
    """``wait`` is 4 s: a run script that exits at once can still take 2 s to get there on
    a loaded machine (CI's parallel tests), and then it looked up for the whole wait."""
    name = "crash"
    args = base(dt, name, run=CRASH, log_run=LOG_RUN, wait=4, timeout=12)
    r = module_fails(args)
    assert "keeps restarting" in r["msg"], r["msg"]
    assert "fatal: unable to bind 192.0.2.1:25" in r["msg"]
    assert any("fatal: unable to bind" in line for line in r["log_tail"])
    assert len(r["pids_seen"]) >= 2
    assert r["changed"] is True  # the files and the link were made before it failed
    module({"name": name, "service_dir": str(dt.service_dir), "state": "absent"})


def test_restart_looping_log_service_fails_with_its_problem(dt: Daemontools) -> None:
    """The service is up, its multilog is not: the task must fail, naming multilog's error."""
    name = "badlog"
    prepare_loop(dt, name)
    missing = dt.root / "no-such-dir" / "main"
    bad_log_run = f"#!/bin/sh\nexec multilog t {missing}\n"
    args = base(dt, name, run=RUN, log_run=bad_log_run, wait=2, timeout=7)
    r = module_fails(args)
    assert "its log service is not" in r["msg"], r["msg"]
    assert f"{dt.supervise / name}/log keeps restarting" in r["msg"]
    assert f"unable to open directory {missing}: file does not exist" in r["msg"]
    assert any("multilog: fatal" in line for line in r["log_tail"])
    assert len(r["pids_seen"]) >= 2
    assert r["state"] == "up"  # the service itself runs
    assert r["pid"] == dt.pid(name)
    # a fixed log/run (restarted by the caller, as the roles' handler does) passes
    r = module({**args, "log_run": LOG_RUN})
    assert r["actions"] == [f"wrote {dt.supervise / name}/log/run"]
    subprocess.run(["svc", "-t", str(dt.supervise / name / "log")], check=True)
    r = module({**args, "log_run": LOG_RUN})
    assert (r["changed"], r["state"], r["log_state"]) == (False, "up", "up"), r
    # a log service stopped by hand is started again by state=up
    subprocess.run(["svc", "-d", str(dt.supervise / name / "log")], check=True)
    deadline = time.monotonic() + 5
    while ": down " not in dt.svstat(dt.supervise / name / "log"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = module({**args, "log_run": LOG_RUN})
    assert r["actions"] == [f"svc -u {dt.supervise / name}/log"]
    assert r["log_state"] == "up"
    module({"name": name, "service_dir": str(dt.service_dir), "state": "absent"})


def test_reload_of_a_service_that_dies_on_hup_fails(dt: Daemontools) -> None:
    """svc -h keeps the pid, so its uptime says nothing; the module watches the pid itself.

    ``sleep`` has no HUP handler: the signal ends it and supervise starts a new one that
    stays up. The reload must fail (it was a restart), not pass on the old uptime.
    """
    name = "hupdies"
    args = base(dt, name, run="#!/bin/sh\nexec sleep 1000\n", wait=1, timeout=10)
    pid = module(args)["pid"]
    r = module_fails({**args, "state": "reloaded"})
    assert f"did not survive svc -h: pid {pid} ended" in r["msg"], r["msg"]
    assert r["pid"] != pid and r["state"] == "up"
    module({"name": name, "service_dir": str(dt.service_dir), "state": "absent"})


def test_crashing_service_without_log_shows_run_output(dt: Daemontools) -> None:
    name = "crash-nolog"
    args = base(dt, name, run=CRASH, wait=2, timeout=7)
    r = module_fails(args)
    assert "output of ./run run once" in r["msg"]
    assert r["log_tail"] == ["fatal: unable to bind 192.0.2.1:25: address not available"]
    module({"name": name, "service_dir": str(dt.service_dir), "state": "absent"})


def test_relink_stops_the_old_supervise(dt: Daemontools) -> None:
    name = "relink"
    old, new = dt.supervise / "relink-old", dt.supervise / "relink-new"
    for d in (old, new):
        prepare_loop(dt, d.name)
    r = module({**base(dt, "relink-old", run=RUN), "name": name})
    old_pid = r["pid"]
    r = module({**base(dt, "relink-new", run=RUN), "name": name})
    assert r["actions"][:2] == [f"wrote {new}/run", f"relinked (was {old})"]
    assert f"svc -dx {old}" in r["actions"]
    assert r["state"] == "up"
    assert r["pid"] != old_pid
    assert os.readlink(dt.service_dir / name) == str(new)
    assert dt.svstat(old).endswith("supervise not running")
    # a second name for the same directory: removing it must not stop the service
    alias = dt.service_dir / "relink-alias"
    alias.symlink_to(new)
    r = module(
        {
            "name": "relink-alias",
            "src": str(new),
            "service_dir": str(dt.service_dir),
            "state": "absent",
        }
    )
    assert r["actions"] == [
        f"unlinked {alias}",
        f"left {new} running: also linked as {dt.service_dir / name}",
    ]
    assert dt.svstat(new).startswith(f"{new}: up ")
    module({"name": name, "service_dir": str(dt.service_dir), "state": "absent"})


def test_through_ansible(dt: Daemontools) -> None:
    name = "via-ansible"
    prepare_loop(dt, name)
    args = base(dt, name, run=RUN, log_run=LOG_RUN, state="up")
    r = run_module("pyqmail_service", args, check=True, diff=True)
    assert r["changed"] is True, r
    assert not os.path.lexists(dt.service_dir / name)
    r = run_module("pyqmail_service", args, diff=True)
    assert (r["changed"], r["state"]) == (True, "up"), r
    pid = r["pid"]
    assert pid == dt.pid(name)
    r = run_module("pyqmail_service", args, check=True, diff=True)
    assert r["changed"] is False, r
    r = run_module("pyqmail_service", args)
    assert (r["changed"], r["pid"]) == (False, pid), r
    assert json.dumps(r)  # a plain, serialisable result
    # restarted/absent/bad arguments are covered in-process; clean up the same way
    r = module({**args, "state": "absent"})
    assert r["changed"] is True
    assert not os.path.lexists(dt.service_dir / name)


def test_not_supervised_fails_clearly(tmp_path: Path) -> None:
    """A service directory no svscan watches: the module says so instead of hanging."""
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    src = tmp_path / "sv"
    args = {
        "name": "lonely",
        "src": str(src),
        "service_dir": str(service_dir),
        "run": RUN,
        "wait": 0,
        "timeout": 1.5,
    }
    r = module_fails(args)
    assert "is not supervised after 1.5 s" in r["msg"]
    assert "is svscan running" in r["msg"]
    # state present only links
    r = module({**args, "state": "present"})
    assert (r["changed"], r["state"]) == (False, "unsupervised")
    assert os.readlink(service_dir / "lonely") == str(src)
    # check mode predicts what supervise will do once svscan starts it
    r = module({**args, "state": "restarted"}, check=True)
    assert (r["changed"], r["actions"]) == (True, ["svc -t"])
    r = module({**args, "state": "up", "down": True}, check=True)
    assert r["actions"] == [f"created {src}/down", "svc -u"]
    r = module({**args, "state": "down"}, check=True)
    assert r["actions"] == ["svc -d"]
    assert not (src / "down").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"name": ".hidden"}, "must be a plain file name"),
        ({"name": "a/b"}, "must be a plain file name"),
        ({"name": ""}, "must be a plain file name"),
        ({"src": "relative/dir"}, "must be an absolute path"),
        ({"src": None}, "src is required with state=up"),
        ({"wait": 5, "timeout": 5}, "timeout (5) must be larger than wait (5)"),
        ({"wait": -1}, "wait must be >= 0"),
        ({"service_dir": "/nonexistent/service"}, "is not a directory"),
        ({"state": "started"}, "value of state must be one of"),
        ({"run": None}, "does not exist; create it or give run"),
        ({"run": "exec sleep 1\n"}, "run must start with '#!'"),
        ({"log_run": "multilog t ./main"}, "log_run must start with '#!'"),
    ],
)
def test_bad_arguments(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    args = {
        "name": "x",
        "src": str(tmp_path / "sv"),
        "service_dir": str(service_dir),
        "run": RUN,
        **override,
    }
    args = {k: v for k, v in args.items() if v is not None}
    r = module_fails(args)
    assert message in r["msg"]
    assert not (tmp_path / "sv").exists()
    assert list(service_dir.iterdir()) == []


def test_refuses_to_replace_a_real_directory(tmp_path: Path) -> None:
    service_dir = tmp_path / "service"
    (service_dir / "x").mkdir(parents=True)
    args = {"name": "x", "src": str(tmp_path / "sv"), "service_dir": str(service_dir)}
    r = module_fails({**args, "run": RUN, "state": "present"})
    assert "exists and is not a symlink" in r["msg"]
    r = module_fails({**args, "state": "absent"})
    assert "exists and is not a symlink" in r["msg"]


def test_runs_where_pyqmail_is_not_installed(tmp_path: Path) -> None:
    """With /usr/bin/python3 (no pyqmail package) the svstat parser comes from the collection's
    module_utils pyqmail_svstat (a link to src/pyqmail/svstat.py), which Ansible ships only
    if it saw the fallback import in pyqmail_daemontools."""
    skip_where_system_python_has_pyqmail()
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    task = {"name": "lonely", "src": str(tmp_path / "sv"), "service_dir": str(service_dir),
            "run": RUN, "state": "present"}  # fmt: skip
    result = run_module("pyqmail_service", task, system_python=True)
    assert (result["changed"], result["state"]) == (True, "unsupervised"), result
