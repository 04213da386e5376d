"""Latency at the same offered load: pyqmail-smtpd and Postfix, sessions on a schedule.

Why a benchmark of its own: ``smtpd_load.py`` is a closed loop (20 sessions, each starts
the next as soon as one ends), which measures throughput well but not latency fairly. The
faster server gets more work queued on it at every moment (its clients come back sooner),
and the load generator, on the same cores, spends more CPU on the faster server's
handshakes, which delays its own timestamps. Here both servers get the same offered load:
each workload's rate is first measured closed-loop against Postfix, the slower peer, then
both servers are driven open loop at ``--share`` of it (``loadgen --rate``: one session
every 1/rate seconds, at most ``--sessions`` at once; a session that had to wait for a
free slot is counted ``late``, which means the server could not keep up). The table gives,
per server, the p50 / p99 of the 250 after DATA and of whole sessions (connect to the
221 after QUIT), and pyqmail's over Postfix's.

    python bench/fixed_rate.py                 # 2 rounds, 5 workloads, ~3 minutes
    python bench/fixed_rate.py --share 0.8 --workloads "STARTTLS 1"
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fsprobe
from bench.certs import CertFiles, make_certs
from bench.servers import PostfixServer, PyqmailServer, Server, ServerError
from bench.smtpd_load import WORKLOADS, Run, Workload, run_load, word_prefix

PEER = "postfix"  # the rate is a share of what this server does closed-loop


def quantiles(us: list[int]) -> tuple[float, float]:
    """p50 and p99 of microsecond samples, in ms (NaN without samples)."""
    if not us:
        return float("nan"), float("nan")
    ordered = sorted(us)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, (99 * len(ordered)) // 100)]
    return p50 / 1000, p99 / 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--share", type=float, default=0.6, help="of Postfix's closed-loop rate")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
    p.add_argument("--sessions", type=int, default=20, help="at most this many at once")
    p.add_argument("--generators", type=int, default=2, help="generator processes (default 2)")
    p.add_argument("--workers", default="auto", help="pyqmail-smtpd --workers (default auto)")
    p.add_argument("--user", default="nobody", help="pyqmail-smtpd --user when run as root")
    p.add_argument("--commitdelay", type=int, help="pyqmail's control/commitdelay in ms")
    p.add_argument(
        "--workloads",
        default="plain 1,plain 10,STARTTLS 1,STARTTLS 10,resumed,pipelined",
        help="comma-separated prefixes of smtpd_load.py's workload names (not the checks row)",
    )
    args = p.parse_args(argv)
    if not 0 < args.share <= 1:
        p.error("--share must be above 0 and at most 1 (a share of Postfix's rate)")
    for name in ("rounds", "sessions", "generators"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration <= 0:
        p.error("--duration must be positive")
    wanted = [w.strip().lower() for w in args.workloads.split(",") if w.strip()]
    plain = [w for w in WORKLOADS if not w.checks]
    args.workload_list = [w for w in plain if any(word_prefix(x, w.name) for x in wanted)]
    missing = [x for x in wanted if not any(word_prefix(x, w.name) for w in plain)]
    if missing or not args.workload_list:
        p.error(f"--workloads: {missing or 'empty list'} match none of {[w.name for w in plain]}")
    return args


def offered_rate(args: argparse.Namespace, peer: Server, certs: CertFiles, w: Workload) -> float:
    """Sessions per second to offer: ``--share`` of the peer's closed-loop rate."""
    run = run_load(
        peer,
        certs,
        w,
        sessions=args.sessions,
        processes=args.generators,
        duration=args.duration,
    )
    if run.errors or not run.messages:
        raise ServerError(f"{PEER} failed the calibration run of {w.name}: {run.samples[:2]}")
    share: float = args.share
    return share * run.rate / w.per_session


def paced(
    args: argparse.Namespace, server: Server, certs: CertFiles, w: Workload, rate: float
) -> Run:
    """One open-loop run at ``rate`` sessions per second, split over the generators."""
    return run_load(
        server,
        certs,
        w,
        sessions=args.sessions,
        processes=args.generators,
        duration=args.duration,
        extra=["--rate", f"{rate / args.generators:.3f}"],
    )


def row(w: Workload, rate: float, runs: dict[str, list[Run]], names: list[str]) -> list[str]:
    """The table's lines for one workload: each server, then the ratios."""
    lines = [f"{w.name} at {rate:.0f} sessions/s ({rate * w.per_session:.0f} msg/s offered)"]
    q: dict[str, tuple[float, float, float, float]] = {}
    for name in names:
        rs = runs[name]
        data = quantiles([us for r in rs for us in r.latency_us])
        whole = quantiles([us for r in rs for us in r.session_us])
        q[name] = (*data, *whole)
        achieved = sum(r.messages for r in rs) / sum(r.seconds for r in rs)
        late = sum(r.late for r in rs)
        errors = sum(r.errors for r in rs)
        lines.append(
            f"  {name:<8} {achieved:7.1f} msg/s  250 after DATA p50 {data[0]:6.2f} p99 "
            f"{data[1]:6.2f} ms  session p50 {whole[0]:6.2f} p99 {whole[1]:6.2f} ms  "
            f"late {late}  errors {errors}"
        )
    if "pyqmail" in q and PEER in q:
        a, b = q["pyqmail"], q[PEER]
        r = [x / y if y > 0 else float("nan") for x, y in zip(a, b, strict=True)]
        lines.append(
            f"  pyqmail/{PEER}: 250 after DATA p50 {r[0]:.2f} p99 {r[1]:.2f}, "
            f"session p50 {r[2]:.2f} p99 {r[3]:.2f} (below 1: pyqmail answers sooner)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="pyqmail-fixed-rate."))
    base.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue under it
    certs = make_certs(base / "tls")
    servers: list[PyqmailServer | PostfixServer] = []
    lines: list[str] = []
    failed = False
    try:
        pyq = PyqmailServer(
            base, certs, workers=args.workers, user=args.user, commitdelay=args.commitdelay
        )
        for server in (pyq, PostfixServer(base, certs)):
            server.start()
            servers.append(server)
        fsprobe.settle([base, *(s.dir for s in servers)])
        for server in servers:  # warm up: spawn workers/processes, fill caches
            for w in (WORKLOADS[0], WORKLOADS[2]):
                run_load(
                    server,
                    certs,
                    w,
                    sessions=args.sessions,
                    processes=args.generators,
                    messages=100,
                )
        peer = servers[1]
        names = [s.name for s in servers]
        for w in args.workload_list:
            rate = offered_rate(args, peer, certs, w)
            runs: dict[str, list[Run]] = {name: [] for name in names}
            for rnd in range(args.rounds):
                for server in servers[rnd % 2 :] + servers[: rnd % 2]:
                    run = paced(args, server, certs, w, rate)
                    runs[server.name].append(run)
                    failed |= bool(run.errors)
                    print(
                        f"# round {rnd + 1} {w.name:<32} {server.name:<8} {run.rate:7.1f} msg/s "
                        f"late {run.late} errors {run.errors}",
                        flush=True,
                    )
            lines += row(w, rate, runs, names)
    except (ServerError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(
        f"\nSame offered load: {args.share:g} of Postfix's closed-loop rate; "
        f"{args.rounds} round(s) of {args.duration:g} s; at most {args.sessions} sessions"
    )
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
