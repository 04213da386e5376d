"""Writing every byte to a file, or an error: the one write loop of the queue, the state
files and the Maildir deliveries.

A write to a regular file can stop short: the disk, the quota or the file size limit
(RLIMIT_FSIZE) filled up part way. The rest is then written too, and that write fails
with the reason (ENOSPC, EDQUOT, EFBIG), so a caller learns that its data is not all there
instead of counting a torn file or record as written. A write that writes nothing at all
is an error as well, never a loop that spins.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (OSError, ValueError):  # pragma: no cover - Linux has it
    IOV_MAX = 1024


def _nothing_written(left: int) -> OSError:
    return OSError(f"no byte written of the {left} left")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write ``data`` whole to ``fd``, resuming after short writes."""
    view = memoryview(data).cast("B")  # counted in bytes, as os.write counts
    while view:
        written = os.write(fd, view)
        if not written:
            raise _nothing_written(len(view))
        view = view[written:]


def writev_all(fd: int, parts: Sequence[bytes]) -> None:
    """Write every buffer of ``parts`` in order, ``IOV_MAX`` of them per ``writev``,
    resuming after short writes (one system call for a whole segment of messages)."""
    bufs: list[bytes | memoryview] = list(parts)
    i = 0
    while i < len(bufs):
        done = os.writev(fd, bufs[i : i + IOV_MAX])
        if not done and any(bufs[i : i + IOV_MAX]):
            raise _nothing_written(sum(len(b) for b in bufs[i:]))
        while i < len(bufs) and done >= len(bufs[i]):
            done -= len(bufs[i])
            i += 1
        if done:
            bufs[i] = memoryview(bufs[i]).cast("B")[done:]
