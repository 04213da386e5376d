"""Port 25 with rspamd: pyqmail-smtpd asking rspamd over HTTP against Postfix asking the same
rspamd through its proxy in milter mode, in one run (issue 18).

One rspamd (Debian's, started as tests/scanners.py starts it, with the pyqmail_scanners
role's local.d, hyperscan on and the full list of top-level domains) serves both: its normal
worker answers pyqmail-smtpd's ``/checkv2`` requests (``control/rspamd``), its proxy worker in
milter mode answers Postfix (``smtpd_milters``, ``milter_default_action = tempfail``) and
passes each message to the same normal worker. Four servers run, each as ``make bench`` runs
it (bench/servers.py): pyqmail and Postfix without a scanner, and each with rspamd. Each
round drives every workload against every server in turn (the order rotates), and the table
gives medians: messages per second with rspamd and the ratio pyqmail/Postfix, and how much of
a message's time the scan takes on each side (the 250-after-DATA latency with rspamd against
the same server without it, and the ``scan_secs`` pyqmail-smtpd logs per message).

    python bench/scan_load.py            # 3 rounds of 4 s runs
    python bench/scan_load.py --quick    # 1 round of 2 s: a smoke run, not a measurement

Needs root (the Postfix peer, rspamd's -u _rspamd) and Debian's rspamd and postfix.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.certs import CertFiles, make_certs
from bench.procstat import tree_cpu_seconds
from bench.servers import PostfixServer, PyqmailServer, Server, ServerError
from bench.smtpd_load import WORKLOADS, Run, median, percentiles, ratio, run_load
from tests.scanners import Rspamd

SCAN_WORKLOADS = (WORKLOADS[0], WORKLOADS[1])  # plain, 1 and 10 messages per session
_SCAN_SECS = re.compile(r" msg .*scan_secs=([\d.]+)")


class PyqmailScanned(PyqmailServer):
    """pyqmail-smtpd with control/rspamd naming rspamd's normal worker."""

    name = "pyqmail+rspamd"

    def __init__(self, base: Path, certs: CertFiles, rspamd: str) -> None:
        super().__init__(base, certs)
        self.rspamd = rspamd

    def prepare(self) -> None:
        super().prepare()
        control = self.root / "control"
        (control / "rspamd").write_text(self.rspamd + "\n")
        if self.user is not None:
            shutil.chown(control / "rspamd", self.user, None)

    def scan_secs(self) -> list[float]:
        """The scan time pyqmail-smtpd logged for each message."""
        text = self.log.read_text(errors="replace")
        return [float(m.group(1)) for m in _SCAN_SECS.finditer(text)]


class PostfixScanned(PostfixServer):
    """Postfix with rspamd's proxy as its milter, tempfail when it is not there (as pyqmail)."""

    name = "postfix+rspamd"

    def __init__(self, base: Path, certs: CertFiles, milter_port: int) -> None:
        super().__init__(base, certs)
        self.milter_port = milter_port

    def main_cf(self, spool: Path, data: Path) -> str:
        return super().main_cf(spool, data) + (
            f"smtpd_milters = inet:127.0.0.1:{self.milter_port}\n"
            "milter_default_action = tempfail\n"
            "milter_protocol = 6\n"
            "milter_mail_macros = i {mail_addr} {client_addr} {client_name} {auth_authen}\n"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--generators", type=int, default=2)
    p.add_argument("--warmup", type=int, default=200, help="messages per server first")
    p.add_argument(
        "--rspamd-workers",
        type=int,
        default=max(1, len(os.sched_getaffinity(0))),
        help="rspamd's normal workers, the same for both sides (default: one per core; "
        "rspamd's own default is one per core beyond two, so one on a 2-core host)",
    )
    p.add_argument("--quick", action="store_true", help="1 round of 2 s (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 40
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/scan_load.py needs root (Postfix, rspamd -u _rspamd)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="pyqmail-scanbench."))
    base.chmod(0o755)
    certs = make_certs(base / "tls")
    runs: dict[tuple[str, str], list[Run]] = {}
    rspamd_cpu: dict[str, list[float]] = {}
    servers: list[Server] = []
    scanner = Rspamd(fast_start=False, normal_workers=args.rspamd_workers, start_timeout=600)
    try:
        scanner.start()
        print(f"# rspamd up: {args.rspamd_workers} normal worker(s) on {scanner.address} for "
              f"both sides, milter proxy (1 worker) on {scanner.proxy_port}; load average "
              f"{load_average()}", flush=True)  # fmt: skip
        servers = [
            PyqmailServer(base, certs),
            PyqmailScanned(base, certs, scanner.address),
            PostfixServer(base, certs),
            PostfixScanned(base, certs, scanner.proxy_port),
        ]
        for server in servers:
            server.start()
            for workload in SCAN_WORKLOADS:
                run_load(server, certs, workload, sessions=args.sessions,
                         processes=args.generators, messages=args.warmup)  # fmt: skip
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
            for workload in SCAN_WORKLOADS:
                for server in order:
                    before = tree_cpu_seconds(scanner.proc.pid) if scanner.proc else 0.0
                    run = run_load(server, certs, workload, sessions=args.sessions,
                                   processes=args.generators, duration=args.duration)  # fmt: skip
                    after = tree_cpu_seconds(scanner.proc.pid) if scanner.proc else 0.0
                    runs.setdefault((workload.name, server.name), []).append(run)
                    if run.messages:
                        per = 1000 * (after - before) / run.messages
                        rspamd_cpu.setdefault(server.name, []).append(per)
                        rspamd_cpu.setdefault(f"{workload.name}/{server.name}", []).append(per)
                    print(f"# round {rnd + 1} {workload.name:<22} {server.name:<15} "
                          f"{run.rate:7.1f} msg/s  errors {run.errors}  "
                          f"load {load_average()}", flush=True)  # fmt: skip
        scan_secs = servers[1].scan_secs() if isinstance(servers[1], PyqmailScanned) else []
    except (ServerError, RuntimeError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        for server in servers:
            server.stop()
        scanner.__exit__(None, None, None)
        shutil.rmtree(base, ignore_errors=True)
    report(runs, rspamd_cpu, scan_secs, args.rounds)
    print(f"rspamd normal workers {args.rspamd_workers}; load average at the end {load_average()}")
    return 1 if any(r.errors for rs in runs.values() for r in rs) else 0


def load_average() -> str:
    """The 1-minute load average: on a shared host the figures mean little without it."""
    return Path("/proc/loadavg").read_text().split()[0]


def _cpu_ms(runs: list[Run]) -> float:
    """The server tree's CPU milliseconds per accepted message, over the runs."""
    messages = sum(r.messages for r in runs)
    return 1000 * sum(r.server_cpu for r in runs) / messages if messages else float("nan")


def _p50_ms(runs: list[Run]) -> float:
    pooled = [us for r in runs for us in r.latency_us]
    return statistics.median(pooled) / 1000 if pooled else float("nan")


def report(
    runs: dict[tuple[str, str], list[Run]],
    rspamd_cpu: dict[str, list[float]],
    scan_secs: list[float],
    rounds: int,
) -> None:
    """The table: throughput with rspamd, the ratio, and the scan's share of a message."""
    print(f"\nport 25 with rspamd: medians of {rounds} round(s), msg/s with a 250 after DATA")
    print(f"{'workload':<24}{'pyqmail':>10}{'postfix':>10}{'pyq/pfx':>9}"
          f"{'pyq alone':>11}{'pfx alone':>11}")  # fmt: skip
    for w in SCAN_WORKLOADS:

        def rate(name: str, workload: str = w.name) -> float:
            return median([r.rate for r in runs.get((workload, name), [])])

        pyq, pfx = rate("pyqmail+rspamd"), rate("postfix+rspamd")
        print(f"{w.name:<24}{pyq:10.1f}{pfx:10.1f}{ratio(pyq, pfx):>9}"
              f"{rate('pyqmail'):11.1f}{rate('postfix'):11.1f}")  # fmt: skip
    print("\n250 after DATA, p50 (ms): without rspamd -> with; the scan's share of the wait")
    for w in SCAN_WORKLOADS:
        line = f"{w.name:<24}"
        for side in ("pyqmail", "postfix"):
            alone = _p50_ms(runs.get((w.name, side), []))
            scanned = _p50_ms(runs.get((w.name, f"{side}+rspamd"), []))
            share = (scanned - alone) / scanned if scanned > 0 else float("nan")
            line += f"  {side} {alone:.2f} -> {scanned:.2f} ({share:.0%})"
        print(line)
    print("\nthe MTA's own CPU per message (ms): without rspamd -> with (the scan's client side)")
    for w in SCAN_WORKLOADS:
        line = f"{w.name:<24}"
        for side in ("pyqmail", "postfix"):
            alone = _cpu_ms(runs.get((w.name, side), []))
            scanned = _cpu_ms(runs.get((w.name, f"{side}+rspamd"), []))
            line += f"  {side} {alone:.2f} -> {scanned:.2f}"
        print(line)
    for side in ("pyqmail+rspamd", "postfix+rspamd"):
        cpu = median(rspamd_cpu.get(side, []))
        print(f"rspamd CPU per message serving {side:<15} {cpu:6.2f} ms")
    print("\nthe scan's share of a message's CPU, MTA + rspamd (ms): (MTA's rise + rspamd) of all")
    for w in SCAN_WORKLOADS:
        line = f"{w.name:<24}"
        for side in ("pyqmail", "postfix"):
            alone = _cpu_ms(runs.get((w.name, side), []))
            scanned = _cpu_ms(runs.get((w.name, f"{side}+rspamd"), []))
            scanner = median(rspamd_cpu.get(f"{w.name}/{side}+rspamd", []))
            total = scanned + scanner
            share = (scanned - alone + scanner) / total if total > 0 else float("nan")
            line += f"  {side} {scanned - alone + scanner:.2f} of {total:.2f} ms ({share:.0%})"
        print(line)
    if scan_secs:
        us = [int(s * 1e6) for s in scan_secs]
        print(f"pyqmail-smtpd's logged scan_secs: p50 / p99 {percentiles(us)} ms")


if __name__ == "__main__":
    sys.exit(main())
