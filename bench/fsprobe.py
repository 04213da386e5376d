"""How much kernel CPU a file creation costs where the queues go, and waiting until it is low.

Every server in the benchmarks creates at least one file per message. On this VM's root
filesystem (ext4 without a journal) a creation normally costs about 0.02 ms, but for a minute
or two after many files were deleted in the same block group it costs 0.4-0.6 ms: ext4's
inode allocator skips recently freed inodes (``recently_deleted()`` under
``find_inode_bit()``), looking each one up in the buffer cache. The benchmarks' own cleanup
(tens of thousands of queue files) and the test suite cause exactly that. Such a tax is paid
by every server per message and says nothing about them; it only squeezes every ratio
towards 1, by an amount that depends on what ran before. So the benchmarks probe the cost in
their own directory before they start and wait (bounded) until it is back to normal,
and print the figure either way.

The probe's own files are left in place (the benchmark removes its whole directory at the
end): deleted, they would be "recently deleted" inodes at the front of the queues' block
group for the next minutes, and every file creation of the benchmark would step over them.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PROBE_FILES = 200
NORMAL_MS = 0.06  # per creation; a fresh block group measures 0.01-0.03 here
WAIT_LIMIT = 300.0  # seconds
WAIT_STEP = 10.0


_PROBES = itertools.count()


def create_cost_ms(where: Path, files: int = PROBE_FILES) -> float:
    """CPU milliseconds per empty-file creation directly in ``where`` (a directory of ours:
    the inode allocator starts from the directory's own block group). The empty files stay
    (see the module docstring); ``where`` must be removed by its owner."""
    probe = next(_PROBES)
    names = [where / f".fsprobe.{os.getpid()}.{probe}.{i}" for i in range(files)]
    start = time.thread_time()
    for name in names:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return 1000 * (time.thread_time() - start) / files


def worst_cost_ms(places: Sequence[Path]) -> tuple[float, Path]:
    return max((create_cost_ms(p), p) for p in places)


def settle(
    places: Sequence[Path],
    *,
    limit: float = WAIT_LIMIT,
    say: Callable[[str], None] = print,
) -> float:
    """Wait until creating a file in each of ``places`` costs less than NORMAL_MS (at most
    ``limit`` seconds); return the last (worst) cost measured, in ms."""
    deadline = time.monotonic() + limit
    cost, where = worst_cost_ms(places)
    if cost < NORMAL_MS:
        return cost
    say(
        f"# creating a file in {where} costs {cost:.3f} ms of CPU (normal: < {NORMAL_MS} ms): "
        f"files were deleted there recently; waiting up to {limit:.0f} s for it to pass"
    )
    while cost >= NORMAL_MS and time.monotonic() < deadline:
        time.sleep(WAIT_STEP)
        cost, where = worst_cost_ms(places)
    if cost >= NORMAL_MS:
        say(
            f"# still {cost:.3f} ms per file creation in {where}: ratios will be squeezed towards 1"
        )
    return cost
