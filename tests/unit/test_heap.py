"""Giving freed heap memory back (``pyqmail.heap``) and when a worker does it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from pyqmail import heap
from pyqmail.smtpd import server as servermod
from tests.conftest import IMPOSSIBLE_HERE

# A child fragments its heap: 600 chunks of 60 KiB (below glibc's mmap threshold, so they
# live in the heap), every tenth kept, so that the free ones are inside the heap and not
# at its top (which free() itself gives back). It prints its RSS before and after trim().
_FRAGMENT = """
import sys
sys.path[:0] = {path!r}
from pyqmail import heap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

chunks = [bytearray(60 * 1024) for _ in range(600)]
kept = chunks[::10]
del chunks
before = rss()
gave = heap.trim()
print(before, rss(), gave)
"""


def test_trim_gives_free_pages_inside_the_heap_back() -> None:
    if heap._malloc_trim is None:
        pytest.skip(f"{IMPOSSIBLE_HERE} no malloc_trim in this C library")
    code = _FRAGMENT.format(path=sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, gave = out.stdout.split()
    assert gave == "True"
    assert int(before) - int(after) > 20 * 1024 * 1024  # most of the 31 MiB freed


def test_a_worker_trims_once_after_sessions_end_and_not_at_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's once-a-second tick trims only if a session ended since the last one:
    after a burst once, at rest never (a trim at rest would find nothing, but it is a
    wake-up for nothing too)."""
    trims: list[int] = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(1) or True)
    srv = servermod.Server.__new__(servermod.Server)

    class Session:  # what left() reads of a session
        intake = object()

    session = Session()
    srv.sessions, srv.waiting, srv._committer, srv.idle = {session}, set(), None, None
    srv._ended, srv.parents, srv.keys = False, frozenset(), None

    async def run() -> None:
        srv._tick()  # as serve() starts it
        assert trims == []
        srv.left(session)  # type: ignore[arg-type]
        await asyncio.sleep(1.2)
        assert trims == [1]
        await asyncio.sleep(1.2)
        assert trims == [1]  # nothing ended meanwhile

    asyncio.run(run())
