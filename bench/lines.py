"""JSON lines from a helper process's stdout pipe, read with a deadline.

The benchmarks drive their helpers (the load generators, the DKIM sink) through pipes, one
JSON object per line. They used to wait with ``select()`` on the pipe and then call the text
wrapper's ``readline()``, which went wrong two ways: ``select()`` cannot see a line already
sitting in the wrapper's buffer (two lines that arrived together: the second waits for the
timeout), and a generator's result line, which carries one latency per message (about 200 KB
for 30,000 messages), came back cut at a multiple of 64 KiB, the pipe's size, so a
30,000-message ``bench/e2e_throughput.py`` round failed on its JSON. This reader keeps its
own buffer over ``os.read``: it asks ``select()`` only when the buffer holds no whole line,
and a line is either whole or not returned at all. The cut itself was the writer's (found
later, December 2026): once a uvloop loop has been closed, a write to a full pipe returns
after 64 KiB, and ``sys.stdout.write`` under ``PYTHONUNBUFFERED`` dropped the rest without
a word; the helpers now write their lines with ``os.write`` to the last byte
(``write_line``), and a line that still ends early is named as such by
``Generators.expect`` (how many bytes came after the last whole line).
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from typing import Any


def write_line(obj: dict[str, Any]) -> None:
    """One JSON line to the parent on stdout, written to the last byte (a helper's side).

    A line can outgrow the pipe (a generator's result), so the write blocks until the
    parent has read it. After a uvloop loop has been closed (the generator's run is over),
    such a blocked write returns early, after the first 64 KiB, although the pipe is
    blocking and no signal is caught; and with ``PYTHONUNBUFFERED`` set,
    ``sys.stdout.write`` drops the rest of a short write without a word. So ``os.write``
    is called until every byte is out."""
    sys.stdout.flush()
    fd = sys.stdout.fileno()
    os.set_blocking(fd, True)  # stdout may have been left non-blocking
    view = memoryview((json.dumps(obj) + "\n").encode())
    while view:
        view = view[os.write(fd, view) :]


class LineReader:
    """Whole lines from one pipe (its file descriptor; nothing else may read it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.eof = False

    def line(self, timeout: float) -> bytes | None:
        """The next line without its newline; None when ``timeout`` seconds pass first or
        the pipe ends (a last line without its newline is a helper that died mid-write,
        not a line)."""
        deadline = time.monotonic() + timeout
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line
            if self.eof:
                return None
            # a timeout that has run out still looks once at what the pipe holds
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 16)
            self.eof = not chunk
            self.buffer += chunk

    def json(self, timeout: float) -> dict[str, Any] | None:
        """The next line as a JSON object (None as for ``line``)."""
        line = self.line(timeout)
        return None if line is None else json.loads(line)
