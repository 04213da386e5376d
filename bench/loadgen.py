"""SMTP load generator: STARTTLS, several messages per session, every reply code checked.

Postfix's smtp-source can do neither STARTTLS nor several messages per session, hence
this. One process runs ``--sessions`` concurrent sessions on one asyncio loop; the
benchmark starts several such processes so the generator is never the bottleneck.

The dialogue is plain RFC 5321: each command waits for its reply, or with
``--pipelining`` MAIL, RCPT and DATA go in one write when the server offers PIPELINING
(RFC 2920, as MTAs send them), and every reply code is checked (220 greeting, 250 EHLO,
220 STARTTLS, 250 MAIL/RCPT, 354 DATA, 250 after the message, 221 QUIT). A message counts
only once its 250 after DATA arrived. Any other reply ends that session and is recorded
as an error (the first few are kept verbatim); the benchmark treats errors as a failed
run.

Protocol with the parent process (one JSON object per line on stdout):
``{"event": "ready"}`` once the loop is up; then the parent writes ``go`` on stdin;
the final ``{"event": "result", ...}`` carries the counts and, per counted message, the
microseconds from writing its end of DATA to reading its 250 (``latency_us``). In
``--idle`` mode the generator reports ``{"event": "holding", ...}`` once every connection
got its EHLO answered, and closes them when the parent writes ``release``.

Run standalone for a quick check::

    python bench/loadgen.py --port 2525 --sessions 4 --messages 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import ssl
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import resume
from bench.lines import write_line

MESSAGE_SIZE = 4096
RECIPIENT_DOMAIN = "bench.test"
DEFAULT_SENDER = "loadgen@client.test"
DEFAULT_RECIPIENT = f"user@{RECIPIENT_DOMAIN}"
MAX_KEPT_ERRORS = 5
LATE_AFTER = 0.005  # seconds: a paced session started later than this was held up (--rate)


class ReplyError(Exception):
    """The server answered with a code the dialogue did not expect."""


def make_message(
    size: int = MESSAGE_SIZE, sender: str | None = None, recipient: str | None = None
) -> bytes:
    """A plausible RFC 5322 message of exactly ``size`` bytes, CRLF line ends.

    The message never contains a line starting with a dot, so it goes on the wire as is
    (no dot-stuffing) and the end-of-data marker is simply appended. With ``sender`` it is
    a submission, as a mail client writes it: From that address, and a Date header.
    """
    head = (
        b"From: Load Generator <" + (sender or DEFAULT_SENDER).encode() + b">\r\n"
        b"To: <"
        + (recipient or DEFAULT_RECIPIENT).encode()
        + b">\r\n"
        + (b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\n" if sender else b"")
        + b"Subject: pyqmail benchmark message\r\n"
        b"Message-ID: <bench@client.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    filler = size - len(body)
    if filler:
        if filler < 3:  # too short for text + CRLF: widen the previous line instead
            body = body[: -len(line)]
            filler += len(line)
            body += b"x" * (filler - 2) + b"\r\n"
        else:
            body += b"x" * (filler - 2) + b"\r\n"
    assert len(body) == size
    return bytes(body)


@dataclass
class Counters:
    messages: int = 0
    sessions: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # end of DATA sent -> its 250
    session_times: list[float] = field(default_factory=list)  # connect -> 221, whole sessions
    late: int = 0  # paced sessions (--rate) that started over LATE_AFTER past their time
    handshakes: int = 0  # TLS handshakes that completed
    resumed: int = 0  # of which resumed a session (bench/resume.py)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_KEPT_ERRORS:
            self.error_samples.append(text)


async def _reply(reader: asyncio.StreamReader, expected: int, what: str) -> None:
    """Read one (possibly multi-line) reply and check its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ReplyError(f"{what}: connection closed instead of {expected}")
        if len(line) < 4 or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            raise ReplyError(f"{what}: malformed reply line {line[:80]!r}")
        if line[3:4] != b"-":
            break
    if int(line[:3]) != expected:
        text = line.decode("ascii", "replace").strip()
        raise ReplyError(f"{what}: expected {expected}, got {text[:200]!r}")


class Budget:
    """Messages still to send: a total (count mode) or a deadline (duration mode); with a
    ``rate``, when the next session may start (``pace``)."""

    def __init__(
        self, messages: int | None, duration: float | None, rate: float | None = None
    ) -> None:
        self.left = messages
        self.duration = duration
        self.deadline = float("inf")
        self.rate = rate
        self.next_start = 0.0  # monotonic time the next paced session is due

    def start(self) -> None:
        self.next_start = time.monotonic()
        if self.duration is not None:
            self.deadline = self.next_start + self.duration

    async def pace(self, counters: Counters) -> None:
        """Open loop (``--rate``): sessions start on a fixed schedule, one every 1/rate
        seconds, whatever the server's speed, so two servers are compared at the same
        offered load (a closed loop lets the faster server's clients queue more work on
        it). A session that starts late because every one of ``--sessions`` was busy is
        counted: then the server could not keep up and the run is not open loop."""
        if self.rate is None:
            return
        due, self.next_start = self.next_start, self.next_start + 1 / self.rate
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        elif wait < -LATE_AFTER:
            counters.late += 1

    def take(self) -> bool:
        if time.monotonic() >= self.deadline:
            return False
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def give_back(self) -> None:
        if self.left is not None:
            self.left += 1


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    starttls: bool
    per_session: int
    tls_context: ssl.SSLContext | None
    server_name: str
    sender: str = DEFAULT_SENDER
    recipient: str = DEFAULT_RECIPIENT
    source: str | None = None  # the local address to connect from (127.0.0.x)
    pipelining: bool = False  # MAIL, RCPT and DATA in one write, as MTAs send them


class Session(asyncio.Protocol):
    """One SMTP session as a protocol state machine (callbacks, no coroutine per reply).

    The generator must cost far less CPU than the servers it measures: it shares their
    cores. Each reply is parsed in ``data_received`` and answered with the next command
    at once; STARTTLS goes through ``loop.start_tls`` (uvloop's when it is installed).
    ``done`` resolves (to True) when the session ended, well or with a recorded error, and
    the worker may start another; ``run_session`` returns False itself when the budget ran
    out before a session began.
    """

    def __init__(self, target: Target, budget: Budget, counters: Counters, payload: bytes) -> None:
        self.target = target
        self.budget = budget
        self.counters = counters
        self.payload = payload
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[bool] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.expect = 220
        self.what = "greeting"
        self.taken = True  # the budget counted a message we have not had a 250 for
        self.data_sent = 0.0  # when the message and its end marker were written
        self.began = time.monotonic()  # the connect, for the whole session's time
        self.ended = False
        self.sent = 0
        self.counted = False  # its latest message's 250 came within the run's window
        self.mail = f"MAIL FROM:<{target.sender}>\r\n".encode()
        self.offered = False  # the latest EHLO reply listed PIPELINING
        self.pipelined = False  # the message in flight went as one MAIL, RCPT, DATA write
        self.rcpt = f"RCPT TO:<{target.recipient}>\r\n".encode()

    # transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            eol = buf.find(b"\n")
            if eol < 0:
                break
            line, buf = buf[: eol + 1], buf[eol + 1 :]
            if len(line) < 4 or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                self.buf = b""
                self.fail(f"{self.what}: malformed reply line {line[:80]!r}")
                return
            if self.target.pipelining and self.expect == 250 and self.what.startswith("EHLO"):
                self.offered = self.offered or line[4:].strip().upper() == b"PIPELINING"
            if line[3:4] == b"-":
                continue
            if not line[:3].isdigit() or int(line[:3]) != self.expect:
                self.buf = b""
                text = line.decode("ascii", "replace").strip()
                self.fail(f"{self.what}: expected {self.expect}, got {text[:200]!r}")
                return
            self.buf = buf
            self.reply()
            if self.ended:
                return
            buf = self.buf
        self.buf = buf

    def eof_received(self) -> bool | None:
        self.fail(f"{self.what}: connection closed instead of {self.expect}")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            why = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            self.fail(f"{self.what}: {why} instead of {self.expect}")

    # the dialogue

    def send(self, data: bytes, expect: int, what: str) -> None:
        self.expect, self.what = expect, what
        assert self.transport is not None
        self.transport.write(data)

    def reply(self) -> None:
        what = self.what
        if what == "greeting":
            self.send(b"EHLO loadgen.client.test\r\n", 250, "EHLO")
        elif what == "EHLO":
            if self.target.starttls:
                self.send(b"STARTTLS\r\n", 220, "STARTTLS")
            else:
                self.begin()
        elif what == "STARTTLS":
            self.what = "TLS handshake"
            self.loop.create_task(self.upgrade())
        elif what == "EHLO after STARTTLS":
            self.tls_done()
            self.begin()
        elif what == "MAIL":
            if self.pipelined:  # RCPT went with it
                self.expect, self.what = 250, "RCPT"
            else:
                self.send(self.rcpt, 250, "RCPT")
        elif what == "RCPT":
            if self.pipelined:  # and so did DATA
                self.expect, self.what = 354, "DATA"
            else:
                self.send(b"DATA\r\n", 354, "DATA")
        elif what == "DATA":
            self.send(self.payload, 250, "end of DATA")
            self.data_sent = time.monotonic()
        elif what == "end of DATA":
            self.taken = False
            now = time.monotonic()
            self.counted = now < self.budget.deadline
            if self.counted:
                self.counters.messages += 1
                self.counters.latencies.append(now - self.data_sent)
            self.sent += 1
            if self.sent < self.target.per_session and self.budget.take():
                self.taken = True
                self.start_message()
            else:
                self.send(b"QUIT\r\n", 221, "QUIT")
        elif what == "QUIT":
            # a session is in the window when its last message was counted: its 221 may
            # come after the deadline (a loaded machine), and it would leave a counted
            # message without its session's time
            if self.counted:
                self.counters.session_times.append(time.monotonic() - self.began)
            self.finish()

    def tls_done(self) -> None:
        """Count the handshake (resumed?) and, when resuming, keep its session: the
        first reply after the handshake has brought the TLS 1.3 tickets with it."""
        assert self.transport is not None
        sslobj = self.transport.get_extra_info("ssl_object")
        self.counters.handshakes += 1
        self.counters.resumed += bool(sslobj.session_reused)
        ctx = self.target.tls_context
        if isinstance(ctx, resume.ResumingContext):
            ctx.remember(sslobj)

    def begin(self) -> None:
        self.counters.sessions += 1
        self.start_message()

    def start_message(self) -> None:
        """MAIL, then RCPT and DATA one reply at a time; with ``pipelining`` the three in
        one write, their replies read in order (``reply``), if the server's EHLO reply
        offered PIPELINING (RFC 2920), as Postfix's and Exim's clients do it."""
        self.pipelined = self.target.pipelining and self.offered
        if self.pipelined:
            self.send(self.mail + self.rcpt + b"DATA\r\n", 250, "MAIL")
        else:
            self.send(self.mail, 250, "MAIL")

    async def upgrade(self) -> None:
        assert self.transport is not None and self.target.tls_context is not None
        try:
            transport = await self.loop.start_tls(
                self.transport,
                self,
                self.target.tls_context,
                server_hostname=self.target.server_name,
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self.fail(f"TLS handshake: {type(exc).__name__}: {exc}")
            return
        if self.ended:
            return
        if transport is None:
            self.fail("TLS handshake: connection closed")
            return
        self.transport = transport
        self.offered = False  # what the server offered before TLS no longer counts
        self.send(b"EHLO loadgen.client.test\r\n", 250, "EHLO after STARTTLS")

    def finish(self) -> None:
        self.ended = True
        if self.transport is not None:
            self.transport.close()
        self._resolve()

    def fail(self, text: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.taken:
            self.budget.give_back()
        self.counters.error(text)
        if self.transport is not None:
            self.transport.abort()
        # A failed session must not spin: the worker backs off a little first.
        self.loop.call_later(0.05, self._resolve)

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(True)


async def run_session(target: Target, budget: Budget, counters: Counters, payload: bytes) -> bool:
    """One SMTP session of up to ``per_session`` messages; False when the budget ran out."""
    await budget.pace(counters)
    if not budget.take():
        return False
    loop = asyncio.get_running_loop()
    session = Session(target, budget, counters, payload)
    try:
        await loop.create_connection(
            lambda: session,
            target.host,
            target.port,
            local_addr=(target.source, 0) if target.source else None,
        )
    except OSError as exc:
        session.fail(f"connect: {type(exc).__name__}: {exc}")
    return await session.done


async def _worker(target: Target, budget: Budget, counters: Counters, message: bytes) -> None:
    payload = message + b".\r\n"
    while await run_session(target, budget, counters, payload):
        if counters.errors > 100:
            return


def raise_nofile(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        return limit
    return soft


async def _wait_for(word: str) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            raise SystemExit(f"loadgen: stdin closed while waiting for {word!r}")
        if line.strip() == word:
            return


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def load(args: argparse.Namespace, target: Target) -> dict[str, object]:
    counters = Counters()
    budget = Budget(args.messages, args.duration, args.rate)
    message = (
        read_message(args.message_file)
        if args.message_file
        else make_message(args.size, args.sender, args.recipient)
    )
    if args.wait_go:
        write_line({"event": "ready"})
        await _wait_for("go")
    cpu0 = _cpu_seconds()
    started = time.monotonic()
    budget.start()
    await asyncio.gather(
        *(_worker(target, budget, counters, message) for _ in range(args.sessions))
    )
    finished = time.monotonic()
    window = min(finished, budget.deadline) - started
    return {
        "event": "result",
        "messages": counters.messages,
        "sessions": counters.sessions,
        "errors": counters.errors,
        "error_samples": counters.error_samples,
        "elapsed": window,
        "wall": finished - started,
        "cpu": _cpu_seconds() - cpu0,
        "latency_us": [round(1e6 * s) for s in counters.latencies],
        "session_us": [round(1e6 * s) for s in counters.session_times],
        "late": counters.late,
        "handshakes": counters.handshakes,
        "resumed": counters.resumed,
    }


def read_message(path: str) -> bytes:
    """A prepared message (the checks row's DKIM-signed one), sent as is: CRLF lines, no
    line starting with a dot, ending with CRLF."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.endswith(b"\r\n") or b"\n." in data or data.startswith(b"."):
        raise SystemExit(f"loadgen: --message-file {path}: needs CRLF lines, none with a dot")
    return data


async def _open_idle(
    target: Target, source: str, sem: asyncio.Semaphore, counters: Counters
) -> asyncio.StreamWriter | None:
    async with sem:
        try:
            reader, writer = await asyncio.open_connection(
                target.host, target.port, local_addr=(source, 0)
            )
            await _reply(reader, 220, "greeting")
            writer.write(b"EHLO idle.client.test\r\n")
            await _reply(reader, 250, "EHLO")
        except (OSError, ReplyError, asyncio.IncompleteReadError) as exc:
            counters.error(f"{type(exc).__name__}: {exc}")
            return None
        counters.sessions += 1
        return writer


async def idle(args: argparse.Namespace, target: Target) -> dict[str, object]:
    """Hold ``--idle`` connections open after EHLO until the parent says ``release``."""
    raise_nofile(args.idle + 256)
    counters = Counters()
    sem = asyncio.Semaphore(args.connect_concurrency)
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(args.idle_sources)]
    if args.wait_go:
        write_line({"event": "ready"})
        await _wait_for("go")
    started = time.monotonic()
    writers = await asyncio.gather(
        *(_open_idle(target, sources[i % len(sources)], sem, counters) for i in range(args.idle))
    )
    write_line(
        {
            "event": "holding",
            "connections": counters.sessions,
            "errors": counters.errors,
            "error_samples": counters.error_samples,
            "seconds": time.monotonic() - started,
        }
    )
    if args.wait_go:
        await _wait_for("release")
    for writer in writers:
        if writer is not None:
            writer.close()
    return {
        "event": "result",
        "messages": 0,
        "sessions": counters.sessions,
        "errors": counters.errors,
        "error_samples": counters.error_samples,
    }


def run_loop(coro: Coroutine[Any, Any, dict[str, object]], choice: str) -> dict[str, object]:
    """Run on uvloop when it is installed (``auto``), or as told."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("loadgen: --loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=10, help="concurrent sessions (default 10)")
    p.add_argument("--per-session", type=int, default=1, help="messages per session")
    p.add_argument("--starttls", action="store_true", help="STARTTLS before MAIL")
    p.add_argument("--cafile", help="CA to verify the server certificate against")
    p.add_argument("--resume", action="store_true", help="resume TLS sessions (bench/resume.py)")
    p.add_argument(
        "--pipelining", action="store_true", help="MAIL, RCPT and DATA in one write (RFC 2920)"
    )
    p.add_argument("--server-name", default="localhost", help="name to verify (SNI)")
    p.add_argument("--size", type=int, default=MESSAGE_SIZE, help="message size in bytes")
    p.add_argument("--sender", help=f"MAIL FROM and header From (default {DEFAULT_SENDER})")
    p.add_argument("--recipient", help=f"RCPT TO and header To (default {DEFAULT_RECIPIENT})")
    p.add_argument("--message-file", help="send this message as is (MAIL FROM: --sender)")
    p.add_argument("--source", help="local address to connect from (default: any)")
    p.add_argument(
        "--rate",
        type=float,
        help="start this many sessions per second (open loop, at most --sessions at once)",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--messages", type=int, help="stop after this many messages in total")
    mode.add_argument("--duration", type=float, help="stop after this many seconds")
    mode.add_argument("--idle", type=int, help="hold this many idle connections instead")
    p.add_argument("--idle-sources", type=int, default=40, help="127.0.x.y source addresses")
    p.add_argument("--connect-concurrency", type=int, default=50)
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (default: uvloop when installed)",
    )
    p.add_argument("--wait-go", action="store_true", help="handshake with the parent (stdin)")
    args = p.parse_args(argv)
    for name in ("sessions", "per_session", "size", "idle_sources", "connect_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate is not None and not args.rate > 0:
        p.error("--rate must be a positive number of sessions per second")
    if args.size < 512:
        p.error("--size must be at least 512 bytes (the headers alone take ~250)")
    if args.starttls and not args.cafile:
        p.error("--starttls needs --cafile (the server certificate is verified)")
    if args.resume and not args.starttls:
        p.error("--resume needs --starttls")
    if args.cafile and not os.path.isfile(args.cafile):
        p.error(f"--cafile {args.cafile}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = None
    if args.starttls:
        ctx = resume.client_context(args.cafile, resume=args.resume)
    target = Target(
        host=args.host,
        port=args.port,
        starttls=args.starttls,
        per_session=args.per_session,
        tls_context=ctx,
        server_name=args.server_name,
        sender=args.sender or DEFAULT_SENDER,
        recipient=args.recipient or DEFAULT_RECIPIENT,
        source=args.source,
        pipelining=args.pipelining,
    )
    runner = idle if args.idle is not None else load
    result = run_loop(runner(args, target), args.loop)
    write_line(result)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
