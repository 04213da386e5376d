"""pyqmail.queue.writeall: every byte written, or an error that says why."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyqmail.queue import writeall
from tests.interpreter import fresh_stdout


def _file(tmp_path: Path) -> int:
    return os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def test_short_writes_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:5])))
    fd = _file(tmp_path)
    try:
        writeall.write_all(fd, b"0123456789" * 7)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"0123456789" * 7


@pytest.mark.timeout(20)  # the regression this guards against is a loop for ever
@pytest.mark.parametrize("call", ["write", "writev"])
def test_a_write_of_nothing_is_an_error_not_a_spin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """os.write returning 0 for data left: the old loops went round for ever."""
    monkeypatch.setattr(os, call, lambda fd, data: 0)
    fd = _file(tmp_path)
    try:
        with pytest.raises(OSError, match="no byte written of the 12 left"):
            if call == "write":
                writeall.write_all(fd, b"x" * 12)
            else:
                writeall.writev_all(fd, [b"x" * 4, b"", b"y" * 8])
    finally:
        os.close(fd)


def test_a_view_of_wider_items_is_counted_in_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write of a view whose items are 4 bytes wide still resumes at the right
    byte (counted in items, the rest was dropped)."""
    import array

    real = os.write
    monkeypatch.setattr(
        os, "write", lambda fd, data: real(fd, bytes(memoryview(data).cast("B")[:5]))
    )
    data = array.array("I", range(4))
    fd = _file(tmp_path)
    try:
        writeall.write_all(fd, memoryview(data))
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data.tobytes()


def test_empty_buffers_write_nothing_and_succeed(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    try:
        writeall.write_all(fd, b"")
        writeall.writev_all(fd, [])
        writeall.writev_all(fd, [b"", b"a", b""])
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"a"


FILL = """
import os, resource, sys
from pyqmail.queue.writeall import write_all, writev_all
resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    (write_all(fd, b"x" * 150) if sys.argv[2] == "write" else writev_all(fd, [b"x" * 60] * 3))
except OSError as exc:
    print("error", exc.errno, os.fstat(fd).st_size)
"""


@pytest.mark.parametrize("call", ["write", "writev"])
def test_a_file_that_fills_up_part_way_raises_the_reason(tmp_path: Path, call: str) -> None:
    """The first write stops at the limit (short, no error); the resumed one fails with
    EFBIG, which reaches the caller (Python ignores SIGXFSZ), as ENOSPC would on a disk
    that fills up."""
    out = fresh_stdout(FILL, str(tmp_path / "f"), call)
    assert out == f"error {errno.EFBIG} 100\n"
