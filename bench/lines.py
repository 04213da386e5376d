"""JSON lines from a helper process's stdout pipe, read with a deadline.

The benchmarks drive their helpers (the load generators, the DKIM sink) through pipes, one
JSON object per line. They used to wait with ``select()`` on the pipe and then call the text
wrapper's ``readline()``, which went wrong two ways: ``select()`` cannot see a line already
sitting in the wrapper's buffer (two lines that arrived together: the second waits for the
timeout), and a generator's result line, which carries one latency per message (about 200 KB
for 30,000 messages), came back cut at a multiple of 64 KiB, the pipe's size, so a
30,000-message ``bench/e2e_throughput.py`` round failed on its JSON, although the generator
wrote it whole in one ``write``; ``os.read`` on the same pipe gave it whole. The cause was
not found (the same reads of a line that size from a test child are whole). This reader
keeps its own buffer over ``os.read``: it asks ``select()`` only when the buffer holds no
whole line, and a line is either whole or not returned at all.
"""

from __future__ import annotations

import json
import os
import select
import time
from typing import Any


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
