"""Where pyqmail-smtpd spends its CPU under one benchmark workload (py-spy, sampling).

Starts pyqmail-smtpd as the benchmark does, drives one workload at it for a while and
samples every worker with py-spy (``pip install py-spy``; not needed by the benchmark
itself), then prints the functions with the most samples: "self" (the function itself
was running) and "total" (it was on the stack). The raw collapsed stacks are kept for
flame graphs (``--raw FILE``).

    python bench/profile_smtpd.py --workload "STARTTLS 10" --duration 10
    python bench/profile_smtpd.py --workload "port 25" --duration 10   # the checks row
    python bench/profile_smtpd.py --workload "plain 1" --rspamd          # the rspamd row
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.certs import make_certs
from bench.checks_peer import ChecksWorld
from bench.scan_load import PyqmailScanned
from bench.servers import PyqmailServer, Server
from bench.smtpd_load import WORKLOADS, Run, run_load, word_prefix
from tests.scanners import Rspamd


def summarize(raw: str, top: int) -> str:
    """Top functions by self and total samples, from py-spy's collapsed-stack output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    out = [f"{samples} samples"]
    for title, counter in (("self", own), ("total (on the stack)", total)):
        out.append(f"\n--- top {top} by {title} ---")
        out.extend(f"{100 * n / samples:6.1f}%  {frame}" for frame, n in counter.most_common(top))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workload", default="plain 10", help='first words of a workload name ("plain 1")'
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    p.add_argument("--workers", default="auto")
    p.add_argument("--user", default="nobody")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument(
        "--gil", action="store_true", help="py-spy --gil: only samples holding the GIL (CPU)"
    )
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--tmpdir", help="where the queue goes (default: system temp dir)")
    p.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    p.add_argument(
        "--rspamd",
        type=int,
        metavar="WORKERS",
        nargs="?",
        const=2,
        help="scan with a real rspamd of WORKERS normal workers (bench/scan_load.py's row)",
    )
    args = p.parse_args(argv)
    matches = [w for w in WORKLOADS if word_prefix(args.workload.strip().lower(), w.name)]
    if len(matches) != 1:
        p.error(f"--workload {args.workload!r}: matches {[w.name for w in matches]}")
    workload = matches[0]
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        p.error("py-spy not found: pip install py-spy")

    base = Path(tempfile.mkdtemp(prefix="pyqmail-profile.", dir=args.tmpdir))
    base.chmod(0o755)
    raw = args.raw or base / "stacks.txt"
    certs = make_certs(base / "tls")
    world = ChecksWorld(base, certs, {"workers": args.workers, "user": args.user})
    extra = world.loadgen_args() if workload.checks else None
    server: Server = PyqmailServer(base, certs, workers=args.workers, user=args.user)
    scanner = Rspamd(fast_start=False, normal_workers=args.rspamd, start_timeout=600)
    try:
        if args.rspamd is not None:
            scanner.start()
            server = PyqmailScanned(base, certs, scanner.address)
            server.workers = args.workers
        if workload.checks:  # the checking pyqmail, its knotd and signed message
            server = world.start(["pyqmail"])["pyqmail"]
        else:
            server.start()
        load = {"sessions": args.sessions, "processes": 2, "extra": extra}
        run_load(server, certs, workload, messages=200, **load)
        cmd = [pyspy, "record", "-p", str(server.pid), "--subprocesses", "--nonblocking"]
        cmd += ["-f", "raw", "-o", str(raw), "-d", str(int(args.duration) + 1), "-r", "200"]
        if args.native:
            cmd.append("--native")
        if args.gil:
            cmd.append("--gil")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let py-spy attach to every worker
        result: list[Run] = []
        loader = threading.Thread(
            target=lambda: result.append(
                run_load(server, certs, workload, duration=args.duration, **load)
            )
        )
        loader.start()
        loader.join()
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0 or not raw.exists():
            print(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')}")
            return 1
        run = result[0]
        print(
            f"{workload.name}: {run.rate:.1f} msg/s under py-spy, server CPU "
            f"{1000 * run.server_cpu / max(run.messages, 1):.2f} ms/msg, {run.errors} errors"
        )
        print(summarize(raw.read_text(), args.top))
    finally:
        server.stop()
        world.stop()
        scanner.__exit__(None, None, None)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
