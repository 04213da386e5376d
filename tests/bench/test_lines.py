"""The benchmarks' reader of their helpers' JSON lines (bench/lines.py), on real pipes
written by real child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.lines import LineReader

BENCH = Path(__file__).resolve().parents[2] / "bench"

Start = Callable[..., tuple[subprocess.Popen[bytes], LineReader]]


@pytest.fixture
def helper() -> Iterator[Start]:
    """Starts ``python -c CODE`` with its stdout on a pipe and a reader on it; killed after."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        code: str, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], LineReader]:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        procs.append(proc)
        assert proc.stdout is not None
        return proc, LineReader(proc.stdout.fileno())

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_line_larger_than_the_pipe_written_in_pauses_comes_whole(helper: Start) -> None:
    """A load generator's result line (one latency per message) is several times the
    pipe's 64 KiB and its writer blocks while the reader is elsewhere. (The cut lines seen
    with select + readline did not come back in a test like this one: it checks the
    reader, it does not reproduce that failure.)"""
    code = (
        "import json, sys, time\n"
        "line = json.dumps({'event': 'result', 'latency_us': list(range(60000))}) + '\\n'\n"
        "for i in range(0, len(line), 50000):\n"
        "    sys.stdout.buffer.write(line[i:i + 50000].encode()); sys.stdout.flush()\n"
        "    time.sleep(0.05)\n"
    )
    _, reader = helper(code)
    time.sleep(0.3)  # the writer fills the pipe and blocks first
    msg = reader.json(10)
    assert msg is not None
    assert msg["latency_us"] == list(range(60000))
    start = time.monotonic()
    assert reader.line(20) is None  # then the pipe ends: no more lines, and no waiting
    assert reader.eof
    assert time.monotonic() - start < 10


def test_a_generators_result_line_comes_whole_after_its_uvloop_loop_closed(
    helper: Start,
) -> None:
    """The cause of the cut lines: once a uvloop loop has been closed, a write to a full
    pipe returns after 64 KiB, and ``sys.stdout.write`` under ``PYTHONUNBUFFERED`` dropped
    the rest (a 30,000-message round of bench/e2e_throughput.py failed with "its output
    ended, 65536 bytes after its last whole line"). The generators' ``write_line`` runs
    here as it does at the end of a run: after ``uvloop.run``, with the parent reading
    late."""
    code = (
        "import asyncio, os, sys, uvloop\n"
        f"sys.path.insert(0, {str(BENCH.parent)!r})\n"
        "from bench.lines import write_line\n"
        "uvloop.run(asyncio.sleep(0))\n"
        "write_line({'event': 'result', 'latency_us': list(range(60000))})\n"
    )
    proc, reader = helper(code, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    time.sleep(0.5)  # the writer fills the pipe and blocks first
    msg = reader.json(10)
    assert msg is not None, f"the line was cut: {len(reader.buffer)} bytes, then the end"
    assert msg["latency_us"] == list(range(60000))
    assert proc.wait(10) == 0


def test_two_lines_that_arrive_together_are_both_read_at_once(helper: Start) -> None:
    """select() on the pipe cannot see the second line once the first read took both;
    the reader answers it from its buffer, without waiting."""
    code = (
        "import sys, time\n"
        'sys.stdout.write(\'{"a": 1}\\n{"b": 2}\\n\'); sys.stdout.flush(); time.sleep(30)\n'
    )
    _, reader = helper(code)
    assert reader.json(10) == {"a": 1}
    start = time.monotonic()
    assert reader.json(5) == {"b": 2}
    assert time.monotonic() - start < 1


def test_a_line_cut_by_the_writers_death_is_not_a_line(helper: Start) -> None:
    code = 'import os, sys; sys.stdout.write(\'{"event": "res\'); sys.stdout.flush(); os._exit(0)'
    proc, reader = helper(code)
    proc.wait(10)
    start = time.monotonic()
    assert reader.line(20) is None
    assert reader.eof
    assert time.monotonic() - start < 10


def test_a_timeout_that_ran_out_still_reads_what_is_there(helper: Start) -> None:
    """The later generators of Generators.expect are read with what is left of one
    deadline: a line already in their pipe counts even when nothing is left."""
    proc, reader = helper('print(\'{"event": "ready"}\')')
    proc.wait(10)
    assert reader.json(0) == {"event": "ready"}


def test_no_line_within_the_timeout_is_none(helper: Start) -> None:
    _, reader = helper("import time; time.sleep(30)")
    start = time.monotonic()
    assert reader.json(0.3) is None
    assert 0.25 < time.monotonic() - start < 3


def test_a_line_that_is_not_json_raises(helper: Start) -> None:
    _, reader = helper("print('not json')")
    with pytest.raises(json.JSONDecodeError):
        reader.json(10)
