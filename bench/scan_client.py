"""The rspamd client's own CPU per scan: ``pyqmail.scan.stage.run`` against a real rspamd, over
its TCP address and over a Unix socket of the same normal workers, alternating.

Why apart from bench/scan_load.py: there the client's cost is lost in the MTA's and rspamd's;
here one process does nothing but scan (``--concurrency`` at once, as a worker's sessions
would), so its CPU time per scan (user and system, from getrusage) is the client's. rspamd
starts as the tests start it (``tests/scanners.py``: hyperscan off, a short list of
top-level domains), which changes rspamd's time, not the client's.

    python bench/scan_client.py                  # 3 rounds of 500 scans each way
    python bench/scan_client.py --rounds 1 --scans 200

Needs Debian's rspamd; as root it runs as _rspamd (as the tests' rspamd does).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyqmail.scan import rspamd, stage
from pyqmail.scan.settings import ScanSettings, parse_address
from tests.scanners import Rspamd

ENV = rspamd.Envelope(
    "127.0.0.7", "loadgen.client.test", "alice@sender.example", ("user@bench.test",), None, "Q1"
)
MESSAGE = (
    b"From: alice@sender.example\r\nTo: user@bench.test\r\nSubject: hello\r\n"
    b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <x@sender.example>\r\n\r\n"
    + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n"
    * 70
)  # about 4 KiB, as the load generator's


async def scans(address: str, count: int, concurrency: int) -> tuple[float, float, float]:
    """``count`` scans, ``concurrency`` at once, after a warm-up: user and system CPU
    milliseconds per scan, and scans per second."""
    settings = ScanSettings(rspamd=parse_address(address, "--address"))
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            outcome = await stage.run(settings, ENV, MESSAGE)
            if outcome.verdict.action != "accept":
                raise RuntimeError(f"scan failed: {outcome.verdict.log}")

    await asyncio.gather(*(one() for _ in range(30)))
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    after, took = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    user = 1000 * (after.ru_utime - before.ru_utime) / count
    system = 1000 * (after.ru_stime - before.ru_stime) / count
    return user, system, count / took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scans", type=int, default=500, help="scans per round and way")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rspamd-workers", type=int, default=2)
    args = p.parse_args(argv)
    server = Rspamd(normal_workers=args.rspamd_workers)
    server._configure()  # written first, then one more bind_socket: the Unix socket
    sock = server.dir / "run" / "normal.sock"
    with (server.dir / "conf" / "override.d" / "worker-normal.inc").open("a") as normal:
        normal.write(f'bind_socket = "{sock} mode=0666";\n')
    results: dict[str, list[tuple[float, float, float]]] = {"tcp": [], "unix": []}
    with server:
        for rnd in range(args.rounds):
            for way, address in (("tcp", server.address), ("unix", str(sock))):
                user, system, rate = asyncio.run(scans(address, args.scans, args.concurrency))
                results[way].append((user, system, rate))
                load = Path("/proc/loadavg").read_text().split()[0]
                print(f"# round {rnd + 1} {way:<4} user {user:.3f} + system {system:.3f} ms "
                      f"per scan, {rate:.0f} scans/s, load {load}", flush=True)  # fmt: skip
    for way, rows in results.items():
        cpu = statistics.median(u + s for u, s, _ in rows)
        rate = statistics.median(r for _, _, r in rows)
        print(f"{way:<4} client CPU per scan, median {cpu:.3f} ms; {rate:.0f} scans/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
