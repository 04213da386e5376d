"""Count the messages a queue directory holds without parsing them (the benchmark checks
that every message it sent was stored; a segment file holds several)."""

from __future__ import annotations

import os
from pathlib import Path

from pyqmail.queue.format import SEGMENT_MAGIC, encode_segment_trailer
from pyqmail.queue.store import Queue


def count(queue: Queue, sub: str) -> int:
    """How many messages ``sub`` holds, without reading them (a segment's count is in
    its trailer; a file that is not a complete segment counts as one)."""
    total = 0
    for name in queue.ids(sub):
        try:
            with Path(queue.path(sub, name)).open("rb") as f:
                if f.read(len(SEGMENT_MAGIC)) != SEGMENT_MAGIC:
                    total += 1
                    continue
                f.seek(-len(encode_segment_trailer(name, 0)), os.SEEK_END)
                tail = f.read()
        except FileNotFoundError:
            continue
        except OSError:
            total += 1
            continue
        digits = tail.rpartition(b" ")[2][:-1]
        total += int(digits) if tail.endswith(b"\n") and digits.isdigit() else 1
    return total
