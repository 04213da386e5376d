"""pyqmail-restart-stale's parts that need no running service: finding daemontools' programs,
the directories svscan supervises, svstat output it does not understand, and what a service's
conftest answers (real scripts). The services themselves are in
tests/e2e/test_restart_stale.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pyqmail.tools.restartstale import RestartError, conftest, program, service_dirs, svstat


def test_a_missing_program_is_named() -> None:
    with pytest.raises(RestartError, match=r"^no-such-svc not found in \$PATH or /command, "):
        program("no-such-svc")


def test_service_dirs_are_what_svscan_supervises(tmp_path: Path) -> None:
    for name in ("b", "a", ".hidden"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "log").mkdir()
    (tmp_path / "README").write_text("not a service\n")
    (tmp_path / "c").symlink_to(tmp_path / "b")
    assert service_dirs(str(tmp_path)) == [
        f"{tmp_path}/a", f"{tmp_path}/a/log", f"{tmp_path}/b", f"{tmp_path}/c",
    ]  # fmt: skip


def test_an_unlistable_service_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RestartError, match=r"cannot list the service directory .*/nope: No such"):
        service_dirs(str(tmp_path / "nope"))


def test_svstat_output_not_understood_is_an_error(tmp_path: Path) -> None:
    """``echo`` stands in for an svstat that prints something else: nothing is guessed."""
    with pytest.raises(RestartError, match=r"cannot parse svstat line|does not start with"):
        svstat("/bin/echo", [str(tmp_path / "x")])


def _conftest(tmp_path: Path, script: str, mode: int = 0o755) -> str:
    (tmp_path / "conftest").write_text(script)
    (tmp_path / "conftest").chmod(mode)
    return str(tmp_path)


def test_no_conftest_is_no_objection(tmp_path: Path) -> None:
    assert conftest(str(tmp_path)) is None


def test_a_conftest_that_passes_is_no_objection(tmp_path: Path) -> None:
    assert conftest(_conftest(tmp_path, "#!/bin/sh\necho syntax OK\n")) is None


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("cfg; deprecated option used\nfailed to load config: ucl parser error", "failed to load"),
        ("WARNING: old option\nERROR: Parse error at line 3", "ERROR: Parse error"),
        ('Traceback (most recent call last):\n  File "x", line 1\nMemoryError', "MemoryError"),
        ("a warning\nanother one", "a warning"),
    ],
)
def test_the_report_gives_the_line_that_names_the_error(
    tmp_path: Path, output: str, reason: str
) -> None:
    """A checker that warns before its error (rspamadm, clamd, a Python traceback): the
    report's line is the error, the first line when none names one."""
    script = f"#!/bin/sh\ncat >&2 <<'EOF'\n{output}\nEOF\nexit 1\n"
    said = conftest(_conftest(tmp_path, script))
    assert said is not None
    assert said.startswith(f"./conftest failed (exit 1): {reason}"), said
    assert said.endswith(" more line)" if output.count("\n") == 1 else " more lines)"), said


def test_a_failed_conftest_says_its_status_and_first_line(tmp_path: Path) -> None:
    """stderr's first line and how many more; stdout's when stderr has none (a checker that
    reports there)."""
    path = _conftest(tmp_path, "#!/bin/sh\necho '' >&2\necho '  bad line 3  ' >&2\nexit 3\n")
    assert conftest(path) == "./conftest failed (exit 3): bad line 3"
    _conftest(tmp_path, "#!/bin/sh\necho 'syntax OK'\necho warning >&2\necho error >&2\nexit 1\n")
    assert conftest(path) == "./conftest failed (exit 1): error (+1 more line)"
    _conftest(tmp_path, "#!/bin/sh\nprintf 'a\\nb\\nc\\n' >&2\nexit 1\n")
    assert conftest(path) == "./conftest failed (exit 1): a (+2 more lines)"
    _conftest(tmp_path, "#!/bin/sh\necho 'syntax error'\nexit 1\n")
    assert conftest(path) == "./conftest failed (exit 1): syntax error"
    _conftest(tmp_path, "#!/bin/sh\nexit 1\n")
    assert conftest(path) == "./conftest failed (exit 1)"
    _conftest(tmp_path, "#!/bin/sh\nkill -ABRT $$\n")
    assert conftest(path) == f"./conftest failed (killed by signal {signal.SIGABRT.value})"


def test_a_conftest_that_cannot_run_is_an_objection(tmp_path: Path) -> None:
    """Not executable: the restart would go ahead unchecked, so it does not."""
    path = _conftest(tmp_path, "#!/bin/sh\nexit 0\n", mode=0o644)  # no x bit: not even root
    assert conftest(path) == "cannot run ./conftest: Permission denied"


def test_a_conftest_that_hangs_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """The check and its children (its process group) are killed at the timeout, nothing else
    is waited for."""
    path = _conftest(tmp_path, "#!/bin/sh\nsleep 300 &\necho $! > child\nexec sleep 300\n")
    started = time.monotonic()
    assert conftest(path, timeout=1) == "./conftest still running after 1 s, killed"
    assert time.monotonic() - started < 10
    child = int((tmp_path / "child").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and _state(child) != "Z":
        assert time.monotonic() < deadline, f"the check's child {child} still runs"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
