"""pyqmail-restart-stale's parts that need no running service: finding daemontools' programs,
the directories svscan supervises, and svstat output it does not understand. The services
themselves are in tests/e2e/test_restart_stale.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.tools.restartstale import RestartError, program, service_dirs, svstat


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
