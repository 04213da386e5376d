"""End-to-end benchmark: accepted over SMTP -> delivered into a Maildir, pyqmail vs Postfix.

Each run starts a fresh server on 127.0.0.1 (fresh queue, empty Maildir), lets 20
parallel SMTP sessions (the load generator of ``bench/loadgen.py``, split over 2 processes)
send ``--messages`` 4 KiB messages to ``user@bench.test``, and stops the clock when the
last message file is in the mailbox's ``Maildir/new/``. Rate = messages / that time.
Durable at each step on both sides: the queue file is fsynced before the 250, the Maildir
file is fsynced before the queue entry is removed.

- pyqmail: ``pyqmail-smtpd --workers auto`` + ``pyqmail-send`` (concurrencylocal 10, its
  default), mailbox ``user`` in ``users/mailboxes`` -> ``homes/user/Maildir/``.
- Postfix (Debian's): the private instance of ``bench/servers.py`` (own config and queue
  directories, ``master -d`` on a high port, never the system one) with delivery enabled:
  ``bench.test`` is a virtual mailbox domain delivered by virtual(8) into
  ``vmail/user/Maildir/`` (Postfix's defaults otherwise: 20 parallel deliveries).

Both run as ``nobody`` for delivery when started as root; Postfix needs root. The servers
alternate within each round and the order rotates between rounds (this VM's CPU speed
swings); the summary uses the median rate over rounds. That row's ratio line is
``e2e ratio vs postfix: X.XX`` (pyqmail median / Postfix median).

Then the outbound row (``bench/e2e_outbound.py``, ``--rows dkim``): the same client
submits mail from the signing domain for a remote one, each server signs it with an RSA and
an Ed25519 DKIM key (pyqmail-send; Postfix through OpenDKIM) and relays it to a sink that
checks both signatures; the last line is ``dkim outbound ratio vs postfix+opendkim: X.XX``,
or ``n/a (pyqmail not signing yet)`` when pyqmail's messages arrive unsigned.

    python bench/e2e_throughput.py                 # both rows, 5 rounds of 2,000 messages
    python bench/e2e_throughput.py --quick         # 1 round of 200
    python bench/e2e_throughput.py --rows dkim     # the outbound signed row only
"""

from __future__ import annotations

import argparse
import math
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (make bench-e2e): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fsprobe
from bench.certs import CertFiles, make_certs
from bench.procstat import tree_cpu_seconds
from bench.servers import PostfixServer, PyqmailServer, ServerError
from bench.smtpd_load import Generators, split

MAILBOX = "user"
ROWS = ("inbound", "dkim")


class PyqmailE2E(PyqmailServer):
    """pyqmail-smtpd plus pyqmail-send delivering into one virtual mailbox."""

    def __init__(self, base: Path, certs: CertFiles) -> None:
        super().__init__(base, certs)
        self.home = self.root / "homes" / MAILBOX
        self.send: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.root / "alias").mkdir(exist_ok=True)
        (self.root / "users").mkdir(exist_ok=True)
        (self.root / "users" / "mailboxes").write_text(f"{MAILBOX}:{self.home}\n")
        super().prepare()  # control files, queue; chowns the whole root to the user

    def start(self, timeout: float = 20) -> None:
        super().start(timeout)
        exe = Path(sys.executable).parent / "pyqmail-send"
        user = self.user or pwd.getpwuid(os.getuid()).pw_name
        with (self.dir / "send.log").open("ab") as log:
            self.send = subprocess.Popen(
                [str(exe), "--root", str(self.root), "--user", user],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while b"started" not in (self.dir / "send.log").read_bytes():
            if self.send.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"pyqmail-send did not start; see {self.dir / 'send.log'}")
            time.sleep(0.05)

    def deferrals(self) -> list[str]:
        """pyqmail-send's "result=deferred" lines of this run: a deferred local delivery
        waits for qmail's first retry (100 s), so a round that took that long says why."""
        log = (self.dir / "send.log").read_text(errors="replace")
        return [line for line in log.splitlines() if "result=deferred" in line]

    def delivered(self) -> int:
        new = self.home / "Maildir" / "new"
        return len(os.listdir(new)) if new.is_dir() else 0

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid) + self.delivery_cpu()

    def delivery_cpu(self) -> float:
        return tree_cpu_seconds(self.send.pid) if self.send is not None else 0.0

    def stop(self, timeout: float = 15) -> None:
        if self.send is not None:
            if self.send.poll() is None:
                self.send.terminate()
                try:
                    self.send.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.send.kill()
                    self.send.wait()
            self.send = None
        super().stop(timeout)


class PostfixE2E(PostfixServer):
    """The private Postfix instance, delivering with virtual(8) into a Maildir."""

    def prepare(self) -> None:
        super().prepare()
        owner = pwd.getpwnam("nobody")
        vmail = self.dir / "vmail"
        (vmail / MAILBOX).mkdir(parents=True, exist_ok=True)
        for path in (vmail, vmail / MAILBOX):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        self.maildir = vmail / MAILBOX / "Maildir"

    def main_cf(self, spool: Path, data: Path) -> str:
        owner = pwd.getpwnam("nobody")
        keep = [
            line
            for line in super().main_cf(spool, data).splitlines()
            if not line.startswith(("smtpd_data_restrictions", "mydestination", "# Keep"))
        ]
        keep += [
            "mydestination =",
            "virtual_mailbox_domains = bench.test",
            f"virtual_mailbox_base = {self.dir / 'vmail'}",
            f"virtual_mailbox_maps = static:{MAILBOX}/Maildir/",
            f"virtual_uid_maps = static:{owner.pw_uid}",
            f"virtual_gid_maps = static:{owner.pw_gid}",
            "virtual_minimum_uid = 1",
        ]
        return "\n".join(keep) + "\n"

    def master_cf(self) -> str:
        return super().master_cf() + "virtual unix - n n - - virtual\n"

    def delivered(self) -> int:
        new = self.maildir / "new"
        return len(os.listdir(new)) if new.is_dir() else 0

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)

    def delivery_cpu(self) -> float:
        """qmgr + virtual (children of master; exited ones are counted by master's reaping)."""
        return float("nan")


E2EServer = PyqmailE2E | PostfixE2E
CLASSES: dict[str, type[PyqmailE2E] | type[PostfixE2E]] = {
    "pyqmail": PyqmailE2E,
    "postfix": PostfixE2E,
}


@dataclass(frozen=True)
class Result:
    rate: float
    accepted_rate: float
    seconds: float
    cpu_per_msg_ms: float
    delivery_cpu_ms: float


def run_once(
    server: E2EServer, certs: CertFiles, args: argparse.Namespace, extra: Sequence[str] = ()
) -> Result:
    """One timed run; ``extra`` goes to every load generator (the outbound row's addresses)."""
    argv_per_proc = []
    shares = split(args.sessions, args.generators)
    for n, share in zip(split(args.messages, len(shares)), shares, strict=True):
        argv = ["--port", str(server.port), "--sessions", str(share)]
        argv += ["--per-session", str(args.per_session), "--messages", str(n), *extra]
        if args.starttls:
            argv += ["--starttls", "--cafile", str(certs.ca)]
        argv_per_proc.append(argv)
    gens = Generators(argv_per_proc)
    try:
        gens.expect("ready", timeout=30)
        cpu0, dcpu0 = server.cpu(), server.delivery_cpu()
        start = time.monotonic()
        gens.tell("go")
        results = gens.expect("result", timeout=120 + args.messages / 5)
        accepted_at = time.monotonic()
        gens.wait()
    finally:
        gens.kill()
    errors = sum(int(r["errors"]) for r in results)
    accepted = sum(int(r["messages"]) for r in results)
    if errors or accepted != args.messages:
        samples = [s for r in results for s in r["error_samples"]]
        raise ServerError(f"{server.name}: {accepted} accepted, {errors} errors: {samples}")
    deadline = time.monotonic() + 120 + args.messages / 5
    while server.delivered() < args.messages:
        server.check_alive()
        if time.monotonic() > deadline:
            raise ServerError(
                f"{server.name}: only {server.delivered()}/{args.messages} delivered in time"
            )
        time.sleep(0.01)
    done = time.monotonic() - start
    cpu = server.cpu() - cpu0
    dcpu = server.delivery_cpu() - dcpu0
    if server.delivered() != args.messages:
        raise ServerError(f"{server.name}: {server.delivered()} files for {args.messages} sent")
    return Result(
        args.messages / done,
        args.messages / (accepted_at - start),
        done,
        cpu * 1000 / args.messages,
        dcpu * 1000 / args.messages,
    )


def run_line(rnd: int, name: str, res: Result) -> str:
    """One run's line: rates, duration, server CPU per message (and delivery's, if known)."""
    delivery = res.delivery_cpu_ms
    return (
        f"round {rnd + 1} {name:8} {res.rate:7.1f} msg/s delivered "
        f"({res.accepted_rate:7.1f} accepted)  {res.seconds:5.2f} s  "
        f"server CPU {res.cpu_per_msg_ms:5.2f} ms/msg"
        + ("" if math.isnan(delivery) else f" (delivery {delivery:4.2f})")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="pyqmail,postfix")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=2000, help="messages per run")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP senders")
    p.add_argument("--per-session", type=int, default=1, help="messages per SMTP session")
    p.add_argument("--generators", type=int, default=2, help="load generator processes")
    p.add_argument("--starttls", action="store_true", help="senders use STARTTLS")
    p.add_argument("--quick", action="store_true", help="1 round of 200 messages")
    p.add_argument(
        "--rows",
        default=",".join(ROWS),
        help="which rows: inbound (SMTP in -> Maildir), dkim (outbound, signed; "
        "bench/e2e_outbound.py); default both",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--settle",
        type=float,
        default=fsprobe.WAIT_LIMIT,
        help="seconds to wait at most for cheap file creation (bench/fsprobe.py; 0: no wait)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.messages, args.settle = 1, 200, 0.0
    if args.settle < 0:
        p.error("--settle must be 0 (no wait) or more")
    args.names = [n.strip() for n in args.servers.split(",") if n.strip()]
    for name in args.names:
        if name not in CLASSES:
            p.error(f"--servers: unknown server {name!r} (known: {', '.join(CLASSES)})")
    if args.messages < args.sessions:
        p.error("--messages must be at least --sessions")
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.row_list or any(r not in ROWS for r in args.row_list):
        p.error(f"--rows: expected some of {', '.join(ROWS)}, got {args.rows!r}")
    return args


def run_inbound(args: argparse.Namespace, base: Path, certs: CertFiles) -> dict[str, list[Result]]:
    """The inbound row: ``args.rounds`` rounds, servers alternating, order rotating."""
    results: dict[str, list[Result]] = {name: [] for name in args.names}
    for rnd in range(args.rounds):
        order = args.names[rnd % len(args.names) :] + args.names[: rnd % len(args.names)]
        for name in order:
            server = CLASSES[name](base / f"r{rnd}", certs)
            server.start()
            try:
                res = run_once(server, certs, args)
                deferred = server.deferrals() if isinstance(server, PyqmailE2E) else []
            finally:
                server.stop()
            results[name].append(res)
            print(run_line(rnd, name, res), flush=True)
            if deferred:
                print(
                    f"# round {rnd + 1} {name}: {len(deferred)} deferred, the first: {deferred[0]}",
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import e2e_outbound  # it builds on this module's servers

    base = Path(tempfile.mkdtemp(prefix="pyqmail-e2e-bench-"))
    base.chmod(0o755)
    results: dict[str, list[Result]] = {}
    outbound = None
    try:
        certs = make_certs(base / "certs")
        fs_ms = fsprobe.settle([base], limit=args.settle)
        print(f"# file creation where the queues are: {fs_ms:.3f} ms CPU (see bench/fsprobe.py)")
        if "inbound" in args.row_list:
            results = run_inbound(args, base, certs)
        if "dkim" in args.row_list:
            outbound = e2e_outbound.run_row(args, base, certs)
    except (ServerError, e2e_outbound.DkimPeerError) as exc:
        print(f"e2e benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if results:
        print_inbound(results, args)
    if outbound is not None:
        e2e_outbound.print_summary(outbound, args)
    return 0


def print_inbound(results: dict[str, list[Result]], args: argparse.Namespace) -> None:
    """The inbound row's medians and its ratio line."""
    print(
        f"\n{args.messages} messages x {args.rounds} rounds, {args.sessions} senders, "
        f"{args.per_session} msg/session, {'STARTTLS' if args.starttls else 'plain'}; medians:"
    )
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r.rate for r in runs)
        cpu = statistics.median(r.cpu_per_msg_ms for r in runs)
        print(f"  {name:8} {medians[name]:7.1f} msg/s end to end, {cpu:5.2f} ms CPU/msg")
    if "pyqmail" in medians and "postfix" in medians and medians["postfix"] > 0:
        print(f"e2e ratio vs postfix: {medians['pyqmail'] / medians['postfix']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
