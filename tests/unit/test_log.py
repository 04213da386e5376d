"""pyqmail.log: one line per event, atomic on the pipe, written once per loop pass."""

from __future__ import annotations

import asyncio
import select
import threading

import pytest

from pyqmail import log as logmod


def test_log_lines_of_one_loop_pass_go_out_in_whole_line_pipe_buf_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []
    monkeypatch.setattr(logmod, "_write_log", writes.append)
    buffer = logmod._LogBuffer()
    monkeypatch.setattr(logmod, "_log_buffer", buffer)

    async def main() -> None:
        buffer.hold(asyncio.get_running_loop)
        for n in range(200):  # ~40 bytes each: more than one PIPE_BUF in all
            logmod.log("msg", n=n, pad="x" * 20)
        assert writes == []  # held until the end of this pass
        await asyncio.sleep(0)
        first = len(writes)
        assert first >= 2
        threading.Thread(target=logmod.log, args=("from-thread",)).start()
        await asyncio.sleep(0.1)
        assert len(writes) == first + 1 and b"from-thread" in writes[-1]  # not held

    asyncio.run(main())
    buffer.hold(None)
    logmod.log("after", n=1)  # no loop: written at once
    assert b"after" in writes[-1]
    for data in writes:
        assert len(data) <= select.PIPE_BUF and data.endswith(b"\n")
    lines = b"".join(writes).splitlines()
    assert [line.split()[2] for line in lines[:200]] == [f"n={n}".encode() for n in range(200)]


def test_values_cannot_forge_fields_or_lines_and_long_lines_are_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client-chosen value (a HELO name, an AUTH user) stays one field of one line; a
    preformatted line (``emit``, pyqmail-send's wording) gets the same length cut."""
    writes: list[bytes] = []
    monkeypatch.setattr(logmod, "_write_log", writes.append)
    monkeypatch.setattr(logmod, "_log_buffer", logmod._LogBuffer())
    logmod.log("auth-fail", user="a b\nfake=1\x00", empty="", none=None)
    assert writes[-1].split(b" ", 1)[1] == b'auth-fail user=a\\x20b\\x0afake=1\\x00 empty=""\n'
    logmod.emit("status " + "x" * 5000)
    assert len(writes[-1]) == logmod.MAX_LINE - 10 + len(b"...(cut)\n") and writes[-1].endswith(
        b"...(cut)\n"
    )
