"""Receive-side load benchmark: pyqmail-smtpd against Postfix and aiosmtpd, in one run.

Starts the three servers on 127.0.0.1 high ports (see bench/servers.py), then for each
round and each workload runs the load generator against each server in turn (A B C,
then the next workload, ...; the server order rotates each round), so the VM's CPU speed
swings hit every server alike; the table reports medians over rounds. Then it holds
1,000 idle connections to each server and reads their memory. See bench/README.md.

    python bench/smtpd_load.py            # default: 3 rounds of 4 s runs, ~4 minutes
    python bench/smtpd_load.py --quick    # ~30 s smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from math import isnan, nan
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (make bench): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import checks_peer, floor, fsprobe, resume
from bench.certs import CertFiles, make_certs
from bench.checks_peer import ChecksPeerError, ChecksWorld
from bench.floor import Floor
from bench.lines import LineReader
from bench.procstat import MachineShare, MachineTimes, PssSampler, tree_cpu_seconds, tree_pss_kib
from bench.servers import (
    AiosmtpdServer,
    PostfixServer,
    PyqmailServer,
    Server,
    ServerError,
)

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
SERVER_CLASSES: dict[str, type[Server]] = {
    "pyqmail": PyqmailServer,
    "postfix": PostfixServer,
    "aiosmtpd": AiosmtpdServer,
}


@dataclass(frozen=True)
class Workload:
    name: str
    starttls: bool
    per_session: int
    checks: bool = False  # SPF, DKIM, DMARC, a blocklist: bench/checks_peer.py's servers
    resume: bool = False  # clients resume their TLS sessions (bench/resume.py)
    pipelining: bool = False  # MAIL, RCPT and DATA in one write (RFC 2920), as MTAs send


WORKLOADS = (
    Workload("plain 1 msg/session", starttls=False, per_session=1),
    Workload("plain 10 msg/session", starttls=False, per_session=10),
    Workload("STARTTLS 1 msg/session", starttls=True, per_session=1),
    Workload("STARTTLS 10 msg/session", starttls=True, per_session=10),
    Workload("port 25 with every check on", starttls=False, per_session=1, checks=True),
    Workload("resumed STARTTLS 1 msg/session", starttls=True, per_session=1, resume=True),
    Workload("pipelined plain 1 msg/session", starttls=False, per_session=1, pipelining=True),
    Workload("pipelined STARTTLS 1 msg/session", starttls=True, per_session=1, pipelining=True),
)


@dataclass
class Run:
    """One timed run of one workload against one server."""

    rate: float  # messages per second that got 250 after DATA
    messages: int
    errors: int
    pss_kib: int  # peak summed PSS of the server's tree during the run
    procs: int  # processes in the tree at that peak
    server_cpu: float  # CPU seconds the server's tree used
    gen_cpu: float  # CPU seconds the generator processes used
    seconds: float
    samples: list[str] = field(default_factory=list)
    latency_us: list[int] = field(default_factory=list)  # end of DATA -> 250, per message
    handshakes: int = 0  # TLS handshakes (client side)
    resumed: int = 0  # of which resumed
    session_us: list[int] = field(default_factory=list)  # connect -> 221, per session
    late: int = 0  # paced sessions that started late (bench/fixed_rate.py)
    machine: MachineShare = field(default_factory=MachineShare)  # every core, during the run


class GeneratorError(Exception):
    """A load generator process failed or said something unexpected."""


class Generators:
    """A set of loadgen.py processes driven together through their stdin/stdout."""

    def __init__(self, argv_per_proc: list[list[str]]) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(LOADGEN), *argv, "--wait-go"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            for argv in argv_per_proc
        ]
        self.readers = []
        for proc in self.procs:
            assert proc.stdout is not None
            self.readers.append(LineReader(proc.stdout.fileno()))

    def expect(self, event: str, timeout: float) -> list[dict[str, Any]]:
        """The next JSON line of every generator, which must be ``event``."""
        out = []
        deadline = time.monotonic() + timeout
        for reader in self.readers:
            msg = reader.json(max(deadline - time.monotonic(), 0))
            if msg is None:
                ended = reader.eof
                states = self.states(wait=1.0 if ended else 0.0)
                self.kill()
                why = (
                    f"its output ended, {len(reader.buffer)} bytes after its last whole line"
                    if ended
                    else f"nothing within {timeout}s"
                )
                raise GeneratorError(f"load generator gave no {event!r}: {why} ({states})")
            if msg.get("event") != event:
                self.kill()
                raise GeneratorError(f"load generator said {msg!r}, expected {event!r}")
            out.append(msg)
        return out

    def states(self, wait: float) -> str:
        """Each generator's state, for an error: running, its exit status or its signal
        (``wait``: seconds to give one whose output just ended to exit)."""
        out = []
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
            code = proc.poll()
            if code is None:
                out.append(f"{proc.pid} running")
            elif code < 0:
                out.append(f"{proc.pid} killed by signal {-code}")
            else:
                out.append(f"{proc.pid} exited {code}")
        return ", ".join(out)

    def tell(self, word: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(word + "\n")
            proc.stdin.flush()

    def wait(self) -> None:
        for proc in self.procs:
            proc.wait(30)

    def kill(self) -> None:
        """Kill what is still running and close the pipes (safe to call twice)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


def split(total: int, parts: int) -> list[int]:
    """``total`` sessions over ``parts`` processes, as evenly as possible, no zeros."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(
    server: Server,
    certs: CertFiles,
    workload: Workload,
    *,
    sessions: int,
    processes: int,
    duration: float | None = None,
    messages: int | None = None,
    extra: list[str] | None = None,
) -> Run:
    """Drive ``workload`` against ``server`` with ``processes`` generators; measure it."""
    argv_per_proc = []
    shares = split(sessions, processes)
    msg_shares = split(messages, len(shares)) if messages is not None else None
    for i, share in enumerate(shares):
        argv = ["--port", str(server.port), "--sessions", str(share)]
        argv += ["--per-session", str(workload.per_session)]
        argv += ["--pipelining"] if workload.pipelining else []
        if workload.starttls:
            argv += ["--starttls", "--cafile", str(certs.ca)]
            argv += ["--resume"] if workload.resume else []
        argv += extra or []
        if msg_shares is not None:
            argv += ["--messages", str(msg_shares[i])]
        else:
            argv += ["--duration", str(duration)]
        argv_per_proc.append(argv)
    gens = Generators(argv_per_proc)
    try:
        gens.expect("ready", timeout=30)
        cpu0 = tree_cpu_seconds(server.pids)
        machine0 = MachineTimes.now()
        with PssSampler(server.pids) as pss:
            gens.tell("go")
            limit = (duration or 0) + 60 + (messages or 0) / 10
            results = gens.expect("result", timeout=limit)
        machine = MachineTimes.now().since(machine0)
        server_cpu = tree_cpu_seconds(server.pids) - cpu0
        gens.wait()
    finally:
        gens.kill()
    server.check_alive()
    seconds = max(float(r["elapsed"]) for r in results)
    count = sum(int(r["messages"]) for r in results)
    samples = [s for r in results for s in r["error_samples"]]
    handshakes, resumed = resume.share(results)
    return Run(
        rate=count / seconds if seconds > 0 else 0.0,
        messages=count,
        errors=sum(int(r["errors"]) for r in results),
        pss_kib=pss.peak_kib,
        procs=pss.peak_procs,
        server_cpu=server_cpu,
        gen_cpu=sum(float(r["cpu"]) for r in results),
        seconds=seconds,
        samples=samples,
        latency_us=[us for r in results for us in r.get("latency_us", [])],
        handshakes=handshakes,
        resumed=resumed,
        session_us=[us for r in results for us in r.get("session_us", [])],
        late=sum(int(r.get("late", 0)) for r in results),
        machine=machine,
    )


@dataclass(frozen=True)
class Idle:
    baseline_kib: int  # summed PSS just before the idle connections were opened
    peak_kib: int  # summed PSS while they were held
    procs: int
    held: int


def measure_idle(server: Server, connections: int, processes: int) -> Idle:
    """Hold ``connections`` idle sessions (after EHLO) and read the server's PSS."""
    argv_per_proc = [
        ["--port", str(server.port), "--idle", str(n)] for n in split(connections, processes)
    ]
    gens = Generators(argv_per_proc)
    try:
        gens.expect("ready", timeout=30)
        baseline, _ = tree_pss_kib(server.pid)
        gens.tell("go")
        held = gens.expect("holding", timeout=120)
        time.sleep(1.0)  # let the server settle (lazy allocations, forks finishing)
        peak, procs = 0, 0
        for _ in range(4):
            kib, n = tree_pss_kib(server.pid)
            if kib > peak:
                peak, procs = kib, n
            time.sleep(0.25)
        gens.tell("release")
        gens.expect("result", timeout=30)
        gens.wait()
    finally:
        gens.kill()
    server.check_alive()
    return Idle(baseline, peak, procs, sum(int(h["connections"]) for h in held))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 and a == a and b == b else "n/a"  # noqa: PLR0124 (NaN check)


def percentiles(us: list[int]) -> str:
    """p50 / p99 of microsecond samples, in ms."""
    if not us:
        return "n/a"
    ordered = sorted(us)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, (99 * len(ordered)) // 100)]
    return f"{p50 / 1000:.2f} / {p99 / 1000:.2f}"


def num(value: float, digits: int, width: int = 16) -> str:
    """A table cell; "-" where the server did not run the row (NaN)."""
    return f"{value:{width}.{digits}f}" if value == value else f"{'-':>{width}}"  # noqa: PLR0124


def run_median(
    runs: dict[tuple[str, str], list[Run]], workload: str, server: str, attr: str
) -> float:
    """The median of one figure of a server's runs of a workload (NaN: none ran)."""
    return median([getattr(r, attr) for r in runs.get((workload, server), [])])


def cpu_per_message(runs: dict[tuple[str, str], list[Run]], workload: str, server: str) -> float:
    """The median server CPU ms per message of a server's runs of a workload."""
    rs = runs.get((workload, server), [])
    return median([1000 * r.server_cpu / r.messages for r in rs if r.messages])


def irq_per_message(runs: dict[tuple[str, str], list[Run]], workload: str, server: str) -> float:
    """The median ms of interrupt work per message (all cores) during a server's runs of a
    workload: loopback TCP's receive side, which no process's CPU time counts."""
    rs = runs.get((workload, server), [])
    return median([1000 * r.machine.irq / r.messages for r in rs if r.messages and r.machine.total])


def machine_cell(runs: dict[tuple[str, str], list[Run]], workload: str, server: str) -> str:
    """ "idle % / irq %" of a server's runs of a workload (medians over the runs measured;
    "-" when the server did not run it, n/a when /proc/stat could not be read)."""
    rs = runs.get((workload, server), [])
    if not rs:
        return "-"
    measured = [r.machine for r in rs if r.machine.total > 0]
    idle_ = median([m.idle_share for m in measured])
    irq_ = median([m.irq_share for m in measured])
    return f"{percent(idle_)} / {percent(irq_)}"


def percent(share: float) -> str:
    return "n/a" if isnan(share) else f"{100 * share:.0f}%"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}" if kib == kib else "n/a"  # noqa: PLR0124 (NaN check)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per run (default 4)")
    p.add_argument("--sessions", type=int, default=20, help="parallel sessions (default 20)")
    p.add_argument("--generators", type=int, default=2, help="generator processes (default 2)")
    p.add_argument("--idle", type=int, default=1000, help="idle connections (default 1000)")
    p.add_argument("--workers", default="auto", help="pyqmail-smtpd --workers (default auto)")
    p.add_argument(
        "--user", default="nobody", help="pyqmail-smtpd --user when run as root (default nobody)"
    )
    p.add_argument(
        "--commitdelay",
        type=int,
        help="pyqmail's control/commitdelay in ms (default: not set, pyqmail's default)",
    )
    p.add_argument(
        "--servers",
        default="pyqmail,postfix,aiosmtpd",
        help="comma-separated subset of pyqmail,postfix,aiosmtpd",
    )
    p.add_argument("--warmup", type=int, default=100, help="untimed messages per server first")
    p.add_argument("--quick", action="store_true", help="~30 s smoke run: 1 round of 1 s runs")
    p.add_argument("--tmpdir", type=Path, help="where the queues go (default: system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--settle",
        type=float,
        default=fsprobe.WAIT_LIMIT,
        help="seconds to wait at most for cheap file creation (bench/fsprobe.py; 0: no wait)",
    )
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="do not measure the floor (bench/floor.py: loopback TCP, handshake, fsyncs)",
    )
    p.add_argument(
        "--workloads",
        help="comma-separated prefixes of workload names (default: all eight; "
        "the min ratio line needs them all)",
    )
    args = p.parse_args(argv)
    args.workload_list = list(WORKLOADS)
    if args.workloads:
        wanted = [w.strip().lower() for w in args.workloads.split(",") if w.strip()]
        chosen = [w for w in WORKLOADS if any(word_prefix(x, w.name) for x in wanted)]
        missing = [x for x in wanted if not any(word_prefix(x, w.name) for w in WORKLOADS)]
        if missing or not chosen:
            p.error(
                f"--workloads: {missing or 'empty list'} match no workload of "
                f"{[w.name for w in WORKLOADS]}"
            )
        args.workload_list = chosen
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 40
        args.idle = min(args.idle, 300)
        args.settle = 0.0
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVER_CLASSES]
    if unknown or not names:
        p.error(f"--servers: unknown {unknown or 'empty list'}; choose from {list(SERVER_CLASSES)}")
    args.server_names = names
    for name in ("rounds", "sessions", "generators"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.duration <= 0:
        p.error("--duration must be positive")
    if args.idle < 0:
        p.error("--idle must be 0 (skip) or more")
    if args.settle < 0:
        p.error("--settle must be 0 (no wait) or more")
    if args.commitdelay is not None and not 0 <= args.commitdelay <= 1000:
        p.error("--commitdelay must be 0 to 1000 (milliseconds, as control/commitdelay)")
    return args


def word_prefix(prefix: str, name: str) -> bool:
    """Whole words: "plain 1" is "plain 1 msg/session", not "plain 10 msg/session"."""
    name = name.lower()
    return name == prefix or name.startswith(prefix + " ")


CHECKS = next(w for w in WORKLOADS if w.checks)
CHECKS_PROOF = (
    "pyqmail's queued messages carry spf=pass dkim=pass dmarc=pass; Postfix's held ones "
    "policyd-spf's Received-SPF: Pass and OpenDKIM's and OpenDMARC's pass; both refuse "
    f"the client on {checks_peer.BLOCKLIST}"
)


def start_checks(args: argparse.Namespace, world: ChecksWorld) -> dict[str, Server]:
    """The checking pyqmail and Postfix (bench/checks_peer.py), when the row is chosen."""
    if not any(w.checks for w in args.workload_list):
        return {}
    checked = world.start(args.server_names)
    for name, server in checked.items():
        print(
            f"# started {name} with every check on, on 127.0.0.1:{server.port} "
            f"(pid {server.pid}); DNS {world.dns_address}",
            flush=True,
        )
    return checked


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="pyqmail-bench.", dir=args.tmpdir))
    base.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue under it
    certs = make_certs(base / "tls")
    servers: list[Server] = []
    world = ChecksWorld(base, certs, {"workers": args.workers, "user": args.user})
    runs: dict[tuple[str, str], list[Run]] = {}
    failed = False
    print(f"# pyqmail receive benchmark; {os.cpu_count()} CPUs, load average {load_avg()}")
    print(
        f"# temp dir {base}; {args.rounds} round(s) x {len(args.workload_list)} workloads x "
        f"{args.duration:g} s; {args.sessions} sessions from {args.generators} generator "
        f"processes; 4 KiB messages"
    )
    try:
        for name in args.server_names:
            cls = SERVER_CLASSES[name]
            server = (
                PyqmailServer(
                    base, certs, workers=args.workers, user=args.user, commitdelay=args.commitdelay
                )
                if cls is PyqmailServer
                else cls(base, certs)
            )
            server.start()
            servers.append(server)
            print(f"# started {name} on 127.0.0.1:{server.port} (pid {server.pid})", flush=True)
        checked = start_checks(args, world)
        fs_ms = fsprobe.settle([base, *(s.dir for s in servers)], limit=args.settle)
        print(f"# file creation where the queues are: {fs_ms:.3f} ms CPU (see bench/fsprobe.py)")
        lowest = None if args.no_floor else measure_floor(base, certs)
        for server in servers:  # warm up: spawn workers/processes, fill caches
            for workload in (WORKLOADS[0], WORKLOADS[2]):
                run_load(
                    server,
                    certs,
                    workload,
                    sessions=args.sessions,
                    processes=args.generators,
                    messages=args.warmup,
                )
        for server in checked.values():
            run_load(
                server,
                certs,
                CHECKS,
                sessions=args.sessions,
                processes=args.generators,
                messages=args.warmup,
                extra=world.loadgen_args(),
            )
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
            for workload in args.workload_list:
                for plain in order:
                    target = checked.get(plain.name) if workload.checks else plain
                    if target is None:  # aiosmtpd checks nothing: "-" in the table
                        continue
                    run = run_load(
                        target,
                        certs,
                        workload,
                        sessions=args.sessions,
                        processes=args.generators,
                        duration=args.duration,
                        extra=world.loadgen_args() if workload.checks else None,
                    )
                    runs.setdefault((workload.name, target.name), []).append(run)
                    flag = f"  ERRORS {run.errors}: {run.samples[:2]}" if run.errors else ""
                    failed |= bool(run.errors)
                    print(
                        f"# round {rnd + 1} {workload.name:<24} {target.name:<8} "
                        f"{run.rate:7.1f} msg/s  PSS {mib(run.pss_kib):>6} MiB "
                        f"({run.procs} procs)  server CPU {run.server_cpu:5.2f}s  "
                        f"generator CPU {run.gen_cpu:5.2f}s  machine: idle "
                        f"{percent(run.machine.idle_share)}, irq "
                        f"{percent(run.machine.irq_share)}{flag}",
                        flush=True,
                    )
        idle: dict[str, Idle] = {}
        if args.idle:
            for server in servers:
                idle[server.name] = res = measure_idle(server, args.idle, args.generators)
                kib, procs, held = res.peak_kib, res.procs, res.held
                print(
                    f"# idle {server.name:<8} {held} connections held: PSS {mib(kib)} MiB "
                    f"({procs} procs)",
                    flush=True,
                )
                failed |= held != args.idle
        for server in servers:
            print(f"# {server.name} queued {server.stored()} messages in all")
        for name, server in checked.items():
            print(f"# {name} with every check on queued {server.stored()} messages in all")
        if checked:
            world.verify()
            print(f"# checks row verified: {CHECKS_PROOF}")
    except (ServerError, ChecksPeerError, subprocess.SubprocessError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        for server in servers:
            server.stop()
        world.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print_table(args, [s.name for s in servers], runs, idle, lowest)
    if args.json:
        args.json.write_text(
            json.dumps(
                {f"{w} | {s}": [asdict(r) for r in rs] for (w, s), rs in runs.items()}
                | {f"idle | {s}": v.__dict__ for s, v in idle.items()}
                | ({"floor": _finite(asdict(lowest))} if lowest is not None else {}),
                indent=1,
            )
        )
    return 1 if failed else 0


def _finite(figures: dict[str, Any]) -> dict[str, Any]:
    """NaN (a figure not available) as null: bare NaN is not JSON."""
    return {k: None if isinstance(v, float) and isnan(v) else v for k, v in figures.items()}


def measure_floor(base: Path, certs: CertFiles) -> Floor | None:
    """The floor (bench/floor.py), measured once with the servers idle, in the benchmark's
    directory (the queues' file system), its files kept until the directory goes (see
    bench/fsprobe.py); printed as ``# floor:`` lines. A failure costs the floor section
    only, not the run."""
    try:
        lowest = floor.measure(base, certs, keep=True)
    except (OSError, ValueError) as exc:
        print(f"# floor: not measured: {exc}", flush=True)
        return None
    for line in floor.describe(lowest):
        print(f"# {line}", flush=True)
    return lowest


def floor_lines(
    workloads: list[Workload],
    names: list[str],
    runs: dict[tuple[str, str], list[Run]],
    lowest: Floor,
    cores: int,
) -> list[str]:
    """The table's floor section: per workload the server CPU floor per message, pyqmail's
    and Postfix's measured CPU per message and their distance from it; then the ceiling
    the floor implies here (a server at its floor, the generator's measured CPU per
    message of that workload, both on ``cores``) next to 2.0 x Postfix's msg/s."""

    def gen_ms(workload: str) -> float:
        values = [
            1000 * r.gen_cpu / r.messages
            for n in names
            for r in runs.get((workload, n), [])
            if r.messages and r.gen_cpu > 0
        ]
        return median(values)

    def label(w: Workload) -> str:
        return w.name + (" (*)" if w.checks else "")

    lines = [
        f"{'floor: server CPU per message (ms)':<40}{'floor':>8}{'pyqmail':>10}{'pyq/floor':>11}"
        f"{'postfix':>9}{'pfx/floor':>11}"
    ]
    floors = {
        w.name: floor.server_cpu_floor(lowest, w.starttls, w.per_session, w.resume, w.pipelining)
        for w in workloads
    }
    for w in workloads:
        low = floors[w.name]
        pyq, pfx = (
            cpu_per_message(runs, w.name, "pyqmail"),
            cpu_per_message(runs, w.name, "postfix"),
        )
        lines.append(
            f"{label(w):<40}{num(low, 3, 8)}{num(pyq, 2, 10)}{ratio(pyq, low):>11}"
            f"{num(pfx, 2, 9)}{ratio(pfx, low):>11}"
        )
    if any(w.checks for w in workloads):
        lines.append("(*) counted as plain 1 msg/session: its checks are work, not a floor")
    lines.append(
        f"commit, per batch not per message: CPU {lowest.commit_cpu_ms:.3f} ms, wall p50 "
        f"{lowest.commit_p50_ms:.2f} / p90 {lowest.commit_p90_ms:.2f} ms"
    )
    lines.append(
        f"250 after DATA floor (ms): pyqmail 2 fsyncs {floor.latency_floor(lowest, 2):.2f}, "
        f"postfix 1 fsync {floor.latency_floor(lowest, 1):.2f} (p50)"
    )
    lines.append(
        f"{f'ceiling here (msg/s, {cores} cores)':<40}{'gen ms':>8}{'at floor':>10}"
        f"{'2.0 x pfx':>11}{'pyqmail':>9}{'budget ms':>11}{'irq ms':>8}{'net ms':>8}"
        f"{'pyq ms':>8}"
    )
    for w in workloads:
        gen = gen_ms(w.name)
        top = nan if isnan(gen) else floor.ceiling(floors[w.name], gen, cores)
        goal, pyq = (
            2.0 * run_median(runs, w.name, "postfix", "rate"),
            run_median(runs, w.name, "pyqmail", "rate"),
        )
        budget = nan if isnan(gen) or isnan(goal) else floor.cpu_budget(goal, gen, cores)
        irq = irq_per_message(runs, w.name, "pyqmail")
        lines.append(
            f"{label(w):<40}{num(gen, 3, 8)}{num(top, 0, 10)}{num(goal, 1, 11)}{num(pyq, 1, 9)}"
            f"{num(budget, 2, 11)}{num(irq, 2, 8)}{num(budget - irq, 2, 8)}"
            f"{num(cpu_per_message(runs, w.name, 'pyqmail'), 2, 8)}"
        )
    lines.append(
        "budget ms: the server CPU per message that leaves room for 2.0 x pfx beside the"
        " generator, no core idle; irq ms: interrupt work per message in pyqmail's runs"
        " (loopback receive, charged to no process); net ms: budget - irq"
    )
    return lines


def resume_rows(
    workloads: list[Workload], names: list[str], runs: dict[tuple[str, str], list[Run]]
) -> list[tuple[str, str, int, int]]:
    """(workload, server, handshakes, resumed) of the resuming workloads, over the rounds."""
    return [
        (w.name, n, sum(r.handshakes for r in rs), sum(r.resumed for r in rs))
        for w in workloads
        if w.resume
        for n in names
        if (rs := runs.get((w.name, n), []))
    ]


def print_table(
    args: argparse.Namespace,
    names: list[str],
    runs: dict[tuple[str, str], list[Run]],
    idle: dict[str, Idle],
    lowest: Floor | None = None,
) -> None:
    def med(workload: str, server: str, attr: str) -> float:
        return run_median(runs, workload, server, attr)

    def cpu_ms(workload: str, server: str) -> float:
        return cpu_per_message(runs, workload, server)

    peers = [n for n in ("postfix", "aiosmtpd") if n in names and "pyqmail" in names]
    short = {"postfix": "pyq/pfx", "aiosmtpd": "pyq/aio"}
    print()
    print(f"medians of {args.rounds} round(s); msg/s = messages that got 250 after DATA")
    head = f"{'throughput (msg/s)':<32}" + "".join(f"{n:>16}" for n in names)
    print(head + "".join(f"{short[p]:>8}" for p in peers))
    ratios_pf: list[float] = []
    for w in args.workload_list:
        line = f"{w.name:<32}" + "".join(num(med(w.name, n, "rate"), 1) for n in names)
        for p in peers:
            a, b = med(w.name, "pyqmail", "rate"), med(w.name, p, "rate")
            line += f"{ratio(a, b):>8}"
            if p == "postfix" and b > 0:
                ratios_pf.append(a / b)
        print(line)
    print()
    # CPU per message is far steadier than msg/s on a shared VM whose speed swings;
    # the ratio is peer/pyqmail so that, like throughput, above 1 favours pyqmail.
    cpu_short = {"postfix": "pfx/pyq", "aiosmtpd": "aio/pyq"}
    head = f"{'server CPU per message (ms)':<32}" + "".join(f"{n:>16}" for n in names)
    print(head + "".join(f"{cpu_short[p]:>8}" for p in peers))
    for w in args.workload_list:
        line = f"{w.name:<32}" + "".join(num(cpu_ms(w.name, n), 2) for n in names)
        line += "".join(f"{ratio(cpu_ms(w.name, p), cpu_ms(w.name, 'pyqmail')):>8}" for p in peers)
        print(line)
    gen = [
        1000 * r.gen_cpu / r.messages
        for rs in runs.values()
        for r in rs
        if r.messages and r.gen_cpu > 0
    ]
    print(f"{'(load generator, all runs)':<32}{median(gen):16.2f}  median ms CPU/msg, same cores")
    print()
    # Process CPU times leave out interrupt work and say nothing of idle cores: the
    # machine's own counters, over each run (medians), fill both in.
    head = f"{'machine: idle % / irq %':<32}" + "".join(f"{n:>16}" for n in names)
    print(head)
    for w in args.workload_list:
        print(f"{w.name:<32}" + "".join(machine_cell(runs, w.name, n).rjust(16) for n in names))
    print()
    if lowest is not None:
        for text in floor_lines(
            args.workload_list, names, runs, lowest, len(os.sched_getaffinity(0))
        ):
            print(text)
        print()
    # What a client waits for its 250 after the end of DATA (pooled over the rounds): the
    # price of group commit (pyqmail's commitdelay) shows here, next to the peers'.
    head = f"{'250 after DATA, p50 / p99 (ms)':<32}" + "".join(f"{n:>16}" for n in names)
    print(head)
    for w in args.workload_list:
        line = f"{w.name:<32}"
        for n in names:
            pooled = [us for r in runs.get((w.name, n), []) for us in r.latency_us]
            line += f"{percentiles(pooled):>16}"
        print(line)
    for text in resume.share_lines(resume_rows(args.workload_list, names, runs)):
        print(text)
    print()
    print(
        f"{'memory (PSS, MiB)':<32}"
        + "".join(f"{n:>16}" for n in names)
        + "".join(f"{short[p]:>8}" for p in peers)
    )
    for w in args.workload_list:
        line = f"{'during ' + w.name:<32}"
        line += "".join(f"{mib(med(w.name, n, 'pss_kib')):>16}" for n in names)
        for p in peers:
            line += f"{ratio(med(w.name, 'pyqmail', 'pss_kib'), med(w.name, p, 'pss_kib')):>8}"
        print(line)
    peak = {
        n: max((r.pss_kib for (_, s), rs in runs.items() if s == n for r in rs), default=0)
        for n in names
    }
    line = f"{'peak over all runs':<32}" + "".join(f"{mib(peak[n]):>16}" for n in names)
    line += "".join(f"{ratio(peak['pyqmail'], peak[p]):>8}" for p in peers)
    print(line)
    if idle:
        for label, attr in (
            ("before the idle phase", "baseline_kib"),
            (f"with {args.idle} idle connections", "peak_kib"),
        ):
            values = {n: float(getattr(idle[n], attr)) if n in idle else nan for n in names}
            line = f"{label:<32}" + "".join(f"{mib(values[n]):>16}" for n in names)
            line += "".join(f"{ratio(values['pyqmail'], values[p]):>8}" for p in peers)
            print(line)
    print()
    if "postfix" not in peers:
        print("min ratio vs postfix: n/a (needs both pyqmail and postfix)")
    elif len(ratios_pf) < len(WORKLOADS):
        print(
            f"min ratio vs postfix: n/a (only {len(ratios_pf)} of {len(WORKLOADS)} workloads run)"
        )
    else:
        print(f"min ratio vs postfix: {min(ratios_pf):.2f}")


if __name__ == "__main__":
    sys.exit(main())
