"""The floor: what cannot go faster here, measured on this machine in a second or two.

A server's CPU per message in the receive benchmark (bench/smtpd_load.py) includes parts
no server can avoid on a given machine: the kernel's loopback TCP (connections, and every
request and reply of a dialogue that does not pipeline), the TLS handshake's public-key
operations, and the fsyncs that make a message durable before its 250. This module
measures those parts in isolation, so the benchmark can say how far each workload is
from them (``pyq/floor``) and what throughput a server at its floor could reach on the
same cores as the load generator (the ceiling), next to the issue's goal of 2.0 times
Postfix's.

    python bench/floor.py          # the parts, and the floor of each workload

What is measured, and how:

- **Loopback TCP**, CPU of both ends together: a server end in this process and a client
  end in a forked one (blocking sockets, TCP_NODELAY as servers set it), each counting
  its user and system time (``time.process_time``), so the kernel work of both ends (the
  receive side runs in the sender's system call on loopback) and the wake-up of the peer
  asleep in its read are counted, as /proc counts a server's. Per connection (socket,
  connect, accept, close of both ends), per short request/reply round trip, and per
  4,096-byte body one way with a short reply. Medians of a few batches, both ends pinned
  to one core (the least a wake-up costs); the round trip across two cores is measured
  too and shown beside it.
- **The TLS 1.3 handshake, server CPU only** (``time.thread_time`` around the server's
  calls, over memory BIOs in one thread): the bench certificate (ECDSA P-256), a server
  context built as pyqmail-smtpd builds it (``pyqmail.tls.server_context`` on qmail's
  servercert.pem, then ``pyqmail.tickets.enable`` with keys of its own, as each listener
  does; OpenSSL's own ticket keys if that cannot be installed), full and resumed.
- **The commit's fsyncs**, in the caller's directory (the benchmark's, on the queues'
  file system): create a 4 KiB file, write, fsync, rename into ``new/``, fsync ``new/``
  (pyqmail's protocol, once per batch of messages); and the file's fsync alone (Postfix
  fsyncs its queue file, not the directory).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.certs import CertFiles, make_certs
from pyqmail import tickets, tls
from pyqmail.queue.dirsync import fsync_dir

BATCHES = 5  # timed batches per loopback figure (after one untimed): the median is kept
CONNECTIONS = 200  # per batch
ROUND_TRIPS = 500  # per batch
BODIES = 300  # per batch
HANDSHAKES = 40  # full ones, then as many resumed ones
COMMITS = 50
LOOPBACK_DEADLINE = 60.0  # seconds one loopback figure may take (a failed end: an error)
BODY = 4096  # the benchmark's message size
REQUEST = b"RCPT TO:<a@b.test>\r\n"  # ~20 bytes, as the dialogue's commands
REPLY = b"250 2.1.5 Ok here\r\n"  # ~20 bytes, as its replies

# The count server_cpu_floor uses (see its docstring), in loopback round trips.
SESSION_ROUND_TRIPS = 2.5  # greeting (one way: half), EHLO, QUIT
MESSAGE_ROUND_TRIPS = 3.0  # MAIL, RCPT, DATA; then the body and its 250 (a body figure)
PIPELINED_ROUND_TRIPS = 1.0  # MAIL, RCPT and DATA in one write, their replies in one
STARTTLS_ROUND_TRIPS = 4.0  # STARTTLS, the handshake's two, the second EHLO
SERVER_SHARE = 0.5  # of a both-ends loopback figure, the server's part

_RUNS = itertools.count()


@dataclass(frozen=True)
class Floor:
    """The parts that cannot go faster here, in milliseconds (NaN: not available)."""

    # Loopback, CPU of both ends, each in its process, both pinned to one core (the least
    # a wake-up costs: no interrupt to another core):
    connect_ms: float  # socket, connect, accept, close of both
    round_trip_ms: float  # a ~20-byte request and a ~20-byte reply
    body_ms: float  # 4,096 bytes one way, a ~20-byte reply back
    handshake_ms: float  # server CPU of a full TLS 1.3 handshake, ticket included
    resumed_ms: float  # server CPU of a resumed one (NaN if the session did not resume)
    commit_p50_ms: float  # wall: create, write, fsync, rename into new/, fsync new/
    commit_p90_ms: float
    commit_cpu_ms: float  # CPU of one such commit (median)
    fsync_p50_ms: float  # wall: create, write, fsync the file only (Postfix's queue file)
    tickets: str  # whose ticket keys the handshake figures used
    # The same round trip with the ends on two cores (each wake-up an interrupt to the
    # other core: what a server pays when its client runs beside it); NaN on one core.
    round_trip_cross_ms: float = math.nan


# --- loopback TCP -------------------------------------------------------------------------


def _batches(run: Callable[[], None]) -> list[float]:
    """Process CPU seconds of each of BATCHES timed batches of ``run`` (one untimed batch
    first: caches, the socket's buffers)."""
    run()
    costs = []
    for _ in range(BATCHES):
        start = time.process_time()
        run()
        costs.append(time.process_time() - start)
    return costs


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _listener() -> socket.socket:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    return lst


def _read_exactly(sock: socket.socket, size: int) -> None:
    """Read ``size`` bytes, as a server reads a whole command or body before it answers."""
    while size > 0:
        got = sock.recv(size)
        if not got:
            raise ConnectionError("loopback peer closed early")
        size -= len(got)


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """TimeoutError in this (main) thread after ``seconds``: a loopback end whose peer
    failed would otherwise wait in accept() or recv() for ever. A timer, not socket
    timeouts, so the measured system calls are the plain blocking ones a server makes."""

    def expired(_signo: int, _frame: object) -> None:
        raise TimeoutError(f"the floor's loopback measurement took over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _client_process(client: Callable[[], None], cpu: int, rfd: int, wfd: int) -> NoReturn:
    """The forked client end: pinned to ``cpu``, its batches, its CPU seconds per batch
    to the parent as JSON, then out (never back into the parent's code)."""
    status = 1
    try:
        os.close(rfd)
        os.sched_setaffinity(0, {cpu})
        os.write(wfd, json.dumps(_batches(client)).encode())
        status = 0
    except BaseException:  # said on stderr; the parent sees the status
        traceback.print_exc()
    finally:
        os._exit(status)


def _two_processes(
    server: Callable[[], None], client: Callable[[], None], count: int, cpus: tuple[int, int]
) -> float:
    """Both ends' CPU (ms) per operation, each end in its own process, as a server and
    its client are: every reply wakes a peer asleep in its read, which on this VM costs
    more than the bytes (the scheduler; across two cores an interrupt to the other one).
    The client is a forked child running ``client`` once per batch and sending its own
    CPU seconds per batch back; the figure is the median of the two ends' sums. ``cpus``:
    the cores the server end and the client end are pinned to (the same one, or two).
    If either end fails, the child is killed and reaped and the error raised (within
    LOOPBACK_DEADLINE seconds): the benchmark then goes on without the floor."""
    rfd, wfd = os.pipe()
    before = os.sched_getaffinity(0)
    try:
        pid = os.fork()
    except OSError:
        os.close(rfd)
        os.close(wfd)
        raise
    if pid == 0:
        _client_process(client, cpus[1], rfd, wfd)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        try:
            with _deadline(LOOPBACK_DEADLINE):
                try:
                    os.sched_setaffinity(0, {cpus[0]})
                    mine = _batches(server)
                finally:
                    os.sched_setaffinity(0, before)
                raw = pipe.read()
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise OSError(f"the floor's loopback client failed (wait status {status})")
    theirs: list[float] = json.loads(raw)
    return statistics.median(1000 * (a + b) / count for a, b in zip(mine, theirs, strict=True))


def loopback_connect_ms(lst: socket.socket, cpus: tuple[int, int]) -> float:
    """Both ends' CPU per connection: socket, connect, accept, and both closes (the
    server's first, as after QUIT's 221; the client reads its end of file, then closes).
    No data: the dialogue is counted apart."""
    address = lst.getsockname()

    def server() -> None:
        for _ in range(CONNECTIONS):
            conn, _ = lst.accept()
            conn.close()

    def client() -> None:
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(address)
            sock.recv(1)
            sock.close()

    return _two_processes(server, client, CONNECTIONS, cpus)


def loopback_exchange_ms(lst: socket.socket, request: bytes, cpus: tuple[int, int]) -> float:
    """Both ends' CPU per exchange on one connection: ``request`` one way, read fully,
    then REPLY back, read fully (the benchmark's client waits for every reply)."""
    address = lst.getsockname()
    count = ROUND_TRIPS if len(request) < 1000 else BODIES
    conns: list[socket.socket] = []

    def server() -> None:
        if not conns:
            conns.append(_nodelay(lst.accept()[0]))
        for _ in range(count):
            _read_exactly(conns[0], len(request))
            conns[0].sendall(REPLY)

    def client() -> None:
        if not conns:
            conns.append(_nodelay(socket.create_connection(address)))
        for _ in range(count):
            conns[0].sendall(request)
            _read_exactly(conns[0], len(REPLY))

    try:
        return _two_processes(server, client, count, cpus)
    finally:
        for conn in conns:
            conn.close()


# --- the TLS handshake --------------------------------------------------------------------


def tls_contexts(certs: CertFiles) -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    """(server, client, whose ticket keys). The server's as pyqmail-smtpd's
    ``load_config`` makes it: ``server_context`` on servercert.pem (key, certificate,
    chain: ``certs.combined``, what bench/servers.py copies into control/), then tickets
    under ``pyqmail.tickets`` keys (one ticket per full handshake, no session cache);
    where those cannot be installed, OpenSSL's own keys. The client verifies against the
    bench CA and speaks TLS 1.3 only, as the load generator ends up doing."""
    server = tls.server_context(certs.combined)
    try:
        tickets.enable(server, tickets.TicketKeys(), tickets.session_context(None))
        whose = "pyqmail's shared ticket keys"
    except tickets.TicketError:
        server.options &= ~ssl.OP_NO_TICKET
        server.num_tickets = tickets.NUM_TICKETS
        whose = "OpenSSL's own ticket keys"
    client = ssl.create_default_context(cafile=str(certs.ca))
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, client, whose


def _step(call: Callable[[], object]) -> bool:
    """Run one TLS call; False if it wants more bytes from the peer."""
    try:
        call()
    except ssl.SSLWantReadError:
        return False
    return True


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> tuple[float, ssl.SSLObject]:
    """One handshake over memory BIOs; (server thread CPU ms, the client's SSLObject).

    Only the server's calls are timed: its ``do_handshake`` calls and one ``read``
    afterwards (TLS 1.3 tickets come after the handshake proper; OpenSSL 3.0 writes them
    in the last ``do_handshake``, the read covers a library that defers them). The
    client then reads once, so it holds the ticket (``session``) for a resumption."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    spent = 0.0
    client_done = server_done = False
    for _ in range(10):  # TLS 1.3: two flights each way at most
        if not client_done:
            client_done = _step(client.do_handshake)
        s_in.write(c_out.read())
        if not server_done:
            start = time.thread_time()
            server_done = _step(server.do_handshake)
            spent += time.thread_time() - start
        c_in.write(s_out.read())
        if client_done and server_done:
            break
    else:
        raise ssl.SSLError("the memory-BIO handshake did not finish")
    start = time.thread_time()
    _step(server.read)
    spent += time.thread_time() - start
    c_in.write(s_out.read())
    _step(client.read)
    return 1000 * spent, client


def handshake_ms(certs: CertFiles) -> tuple[float, float, str]:
    """(full, resumed, whose ticket keys): medians of HANDSHAKES each, server CPU ms.
    Each resumed handshake offers the latest session, as the generator's resuming
    clients do; resumed is NaN if the server did not resume every one of them."""
    server_ctx, client_ctx, whose = tls_contexts(certs)
    handshake(server_ctx, client_ctx)  # untimed: first-use costs (tables, key loading)
    full = []
    session = None
    for _ in range(HANDSHAKES):
        spent, client = handshake(server_ctx, client_ctx)
        full.append(spent)
        session = client.session
    resumed = []
    all_reused = True
    for _ in range(HANDSHAKES):
        spent, client = handshake(server_ctx, client_ctx, session)
        resumed.append(spent)
        all_reused &= client.session_reused
        session = client.session
    return statistics.median(full), statistics.median(resumed) if all_reused else math.nan, whose


# --- the commit's fsyncs ------------------------------------------------------------------


def _create(path: Path, body: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, body)
    return fd


def commits(where: Path) -> tuple[list[float], list[float], list[float]]:
    """Wall ms and CPU ms of COMMITS commits as pyqmail makes one (a file into tmp/,
    fsync, rename into new/, fsync new/), then wall ms of COMMITS single fsyncs
    (create, write, fsync the file: Postfix's queue file, whose directory it does not
    fsync), one after the other, in ``where``."""
    tmp, new, single = where / "tmp", where / "new", where / "single"
    for d in (tmp, new, single):
        d.mkdir()
    body = b"x" * BODY
    wall, cpu, one = [], [], []
    for i in range(COMMITS):
        w0, c0 = time.perf_counter(), time.thread_time()
        fd = _create(tmp / str(i), body)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp / str(i), new / str(i))
        fsync_dir(new)
        wall.append(1000 * (time.perf_counter() - w0))
        cpu.append(1000 * (time.thread_time() - c0))
    for i in range(COMMITS):
        w0 = time.perf_counter()
        fd = _create(single / str(i), body)
        os.fsync(fd)
        os.close(fd)
        one.append(1000 * (time.perf_counter() - w0))
    return wall, cpu, one


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)]


# --- all together -------------------------------------------------------------------------


def measure(workdir: Path, certs: CertFiles, *, keep: bool = False) -> Floor:
    """Measure every part; the commit files go into a new directory under ``workdir`` (on
    the queues' file system), removed afterwards unless ``keep``. The benchmark keeps
    them: deleted files make the next file creations in their block group dearer for a
    minute or two (see bench/fsprobe.py), and its whole directory goes at the end."""
    cores = sorted(os.sched_getaffinity(0))
    same = (cores[0], cores[0])
    lst = _listener()
    try:
        connect = loopback_connect_ms(lst, same)
        round_trip = loopback_exchange_ms(lst, REQUEST, same)
        body = loopback_exchange_ms(lst, b"x" * BODY, same)
        cross = (
            loopback_exchange_ms(lst, REQUEST, (cores[0], cores[1])) if len(cores) > 1 else math.nan
        )
    finally:
        lst.close()
    full, resumed, whose = handshake_ms(certs)
    where = workdir / f"floor.{os.getpid()}.{next(_RUNS)}"
    where.mkdir()
    try:
        wall, cpu, one = commits(where)
    finally:
        if not keep:
            shutil.rmtree(where, ignore_errors=True)
    return Floor(
        connect_ms=connect,
        round_trip_ms=round_trip,
        body_ms=body,
        handshake_ms=full,
        resumed_ms=resumed,
        commit_p50_ms=statistics.median(wall),
        commit_p90_ms=p90(wall),
        commit_cpu_ms=statistics.median(cpu),
        fsync_p50_ms=statistics.median(one),
        tickets=whose,
        round_trip_cross_ms=cross,
    )


# --- what the parts imply -----------------------------------------------------------------


def server_cpu_floor(
    floor: Floor, starttls: bool, per_session: int, resumed: bool = False, pipelined: bool = False
) -> float:
    """The server CPU per message (ms) of the unavoidable parts here, for one workload:
    a floor for the handshake (measured on the server's side alone), an estimate for the
    loopback share (see below).

    The count follows the benchmark's client, where each command waits for its reply:
    per session a connection (``connect_ms``), the greeting (one way: half a round trip),
    EHLO and QUIT (a round trip each); per message MAIL, RCPT and DATA (a round trip
    each, or one for the three when ``pipelined``) and the body with its 250
    (``body_ms``). With STARTTLS,
    per session also STARTTLS, the handshake's two round trips (its flights are larger
    than a command, so this is still a floor) and the second EHLO, plus the server's
    handshake CPU (full, or resumed: NaN when resumption was not measured). A session's
    part is shared by its ``per_session`` messages.

    The loopback figures are both ends' CPU; the server's share is taken as half
    (SERVER_SHARE): each end sends and receives about as much, and on loopback the
    sender's system call does the receiver's kernel work, so the split is an estimate,
    not a bound (the client's 4 KiB body, for one, is received at its expense). The
    commit is left out: its CPU is per batch of messages, not per message (see
    ``Floor.commit_cpu_ms``, shown beside), and so is everything a workload adds above
    this count (the checks of port 25 with every check on are work, not a floor: that
    row counts as plain 1 message/session)."""
    session_rt = SESSION_ROUND_TRIPS + (STARTTLS_ROUND_TRIPS if starttls else 0.0)
    session = SERVER_SHARE * (floor.connect_ms + session_rt * floor.round_trip_ms)
    if starttls:
        session += floor.resumed_ms if resumed else floor.handshake_ms
    message_rt = PIPELINED_ROUND_TRIPS if pipelined else MESSAGE_ROUND_TRIPS
    message = SERVER_SHARE * (message_rt * floor.round_trip_ms + floor.body_ms)
    return session / max(per_session, 1) + message


def latency_floor(floor: Floor, fsyncs: int = 2) -> float:
    """The least wait (ms) for the 250 after the end of DATA: the commit's median wall
    time, then the reply's way back (half a round trip: the client's clock starts after
    its write returns, and on loopback that write has already delivered the end of DATA
    to the server). ``fsyncs`` 2 is pyqmail's commit (file, then new/), 1 Postfix's
    (the queue file only)."""
    commit = floor.commit_p50_ms if fsyncs >= 2 else floor.fsync_p50_ms
    return commit + floor.round_trip_ms / 2


def ceiling(floor_ms: float, generator_ms: float, cores: int) -> float:
    """Messages per second a server at ``floor_ms`` of CPU per message could reach when
    the load generator, at ``generator_ms`` per message, shares the same ``cores``."""
    total = floor_ms + generator_ms
    return 1000 * cores / total if total > 0 else math.nan


def cpu_budget(rate: float, generator_ms: float, cores: int) -> float:
    """The server CPU per message (ms) that leaves room for ``rate`` msg/s when the load
    generator, at ``generator_ms`` per message, shares the same ``cores`` and no core is
    ever idle: the most a server may spend to reach that rate here (less in practice).
    NaN when there is none: the generator alone would need the cores for that rate."""
    budget = 1000 * cores / rate - generator_ms if rate > 0 else math.nan
    return budget if budget > 0 else math.nan


def describe(floor: Floor) -> list[str]:
    """The parts, one line each, for the benchmark's ``# floor:`` lines."""
    return [
        f"floor: loopback TCP, CPU of both ends: connection {floor.connect_ms:.3f} ms, "
        f"round trip {floor.round_trip_ms:.4f} ms, {BODY}-byte body + reply "
        f"{floor.body_ms:.4f} ms (two processes on one core, medians of {BATCHES} batches); "
        "round trip across two cores "
        + (
            f"{floor.round_trip_cross_ms:.4f} ms"
            if math.isfinite(floor.round_trip_cross_ms)
            else "n/a"
        ),
        f"floor: TLS 1.3 handshake, server CPU: full {floor.handshake_ms:.3f} ms, resumed "
        + (f"{floor.resumed_ms:.3f} ms" if math.isfinite(floor.resumed_ms) else "n/a")
        + f" (ECDSA P-256, {floor.tickets}; medians of {HANDSHAKES})",
        f"floor: commit (4 KiB file: fsync, rename into new/, fsync new/): wall p50 "
        f"{floor.commit_p50_ms:.2f} / p90 {floor.commit_p90_ms:.2f} ms, CPU "
        f"{floor.commit_cpu_ms:.3f} ms (per batch, not per message); file fsync alone "
        f"(Postfix's) p50 {floor.fsync_p50_ms:.2f} ms ({COMMITS} each)",
        f"floor: 250 after DATA at least: pyqmail (2 fsyncs) {latency_floor(floor, 2):.2f} ms, "
        f"postfix (1 fsync) {latency_floor(floor, 1):.2f} ms",
    ]


def main() -> int:
    """Measure in a temporary directory of our own (with throw-away certificates) and
    print the parts and each workload's server CPU floor."""
    from bench.smtpd_load import WORKLOADS

    base = Path(tempfile.mkdtemp(prefix="pyqmail-floor."))
    try:
        start = time.perf_counter()
        floor = measure(base, make_certs(base / "tls"))
        took = time.perf_counter() - start
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for line in describe(floor):
        print(line)
    print(f"(measured in {took:.1f} s; {len(os.sched_getaffinity(0))} CPUs)")
    print()
    print(f"{'server CPU floor per message (ms)':<38}{'floor':>8}")
    for w in WORKLOADS:
        cost = server_cpu_floor(floor, w.starttls, w.per_session, w.resume, w.pipelining)
        mark = " (*)" if w.checks else ""
        print(f"{w.name + mark:<38}{cost:8.3f}")
    print("(*) counted as plain 1 msg/session: its checks are work, not a floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
