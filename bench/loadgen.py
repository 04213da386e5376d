"""SMTP load generator: STARTTLS, several messages per session, every reply code checked.

Postfix's smtp-source can do neither STARTTLS nor several messages per session, hence
this. One process runs ``--sessions`` concurrent sessions on one asyncio loop; the
benchmark starts several such processes so the generator is never the bottleneck.

The dialogue is plain RFC 5321 without pipelining: each command waits for its reply and
the reply code is checked (220 greeting, 250 EHLO, 220 STARTTLS, 250 MAIL/RCPT, 354 DATA,
250 after the message, 221 QUIT). A message counts only once its 250 after DATA arrived.
Any other reply ends that session and is recorded as an error (the first few are kept
verbatim); the benchmark treats errors as a failed run.

Protocol with the parent process (one JSON object per line on stdout):
``{"event": "ready"}`` once the loop is up; then the parent writes ``go`` on stdin;
the final ``{"event": "result", ...}`` carries the counts. In ``--idle`` mode the
generator reports ``{"event": "holding", ...}`` once every connection got its EHLO
answered, and closes them when the parent writes ``release``.

Run standalone for a quick check::

    python bench/loadgen.py --port 2525 --sessions 4 --messages 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import ssl
import sys
import time
from dataclasses import dataclass, field

MESSAGE_SIZE = 4096
RECIPIENT_DOMAIN = "bench.test"
MAX_KEPT_ERRORS = 5


class ReplyError(Exception):
    """The server answered with a code the dialogue did not expect."""


def make_message(size: int = MESSAGE_SIZE) -> bytes:
    """A plausible RFC 5322 message of exactly ``size`` bytes, CRLF line ends.

    The message never contains a line starting with a dot, so it goes on the wire as is
    (no dot-stuffing) and the end-of-data marker is simply appended.
    """
    head = (
        b"From: Load Generator <loadgen@client.test>\r\n"
        b"To: <user@" + RECIPIENT_DOMAIN.encode() + b">\r\n"
        b"Subject: pyqmail benchmark message\r\n"
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
    """Messages still to send: a total (count mode) or a deadline (duration mode)."""

    def __init__(self, messages: int | None, duration: float | None) -> None:
        self.left = messages
        self.duration = duration
        self.deadline = float("inf")

    def start(self) -> None:
        if self.duration is not None:
            self.deadline = time.monotonic() + self.duration

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
    sender: str = "loadgen@client.test"
    recipient: str = f"user@{RECIPIENT_DOMAIN}"


async def run_session(target: Target, budget: Budget, counters: Counters, message: bytes) -> bool:
    """One SMTP session of up to ``per_session`` messages; False when the budget ran out."""
    if not budget.take():
        return False
    taken = True
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        await _reply(reader, 220, "greeting")
        writer.write(b"EHLO loadgen.client.test\r\n")
        await _reply(reader, 250, "EHLO")
        if target.starttls:
            writer.write(b"STARTTLS\r\n")
            await _reply(reader, 220, "STARTTLS")
            assert target.tls_context is not None
            await writer.start_tls(target.tls_context, server_hostname=target.server_name)
            writer.write(b"EHLO loadgen.client.test\r\n")
            await _reply(reader, 250, "EHLO after STARTTLS")
        counters.sessions += 1
        mail = f"MAIL FROM:<{target.sender}>\r\n".encode()
        rcpt = f"RCPT TO:<{target.recipient}>\r\n".encode()
        payload = message + b".\r\n"
        sent = 0
        while True:
            writer.write(mail)
            await _reply(reader, 250, "MAIL")
            writer.write(rcpt)
            await _reply(reader, 250, "RCPT")
            writer.write(b"DATA\r\n")
            await _reply(reader, 354, "DATA")
            writer.write(payload)
            await _reply(reader, 250, "end of DATA")
            taken = False
            if time.monotonic() < budget.deadline:
                counters.messages += 1
            sent += 1
            if sent >= target.per_session or not budget.take():
                break
            taken = True
        writer.write(b"QUIT\r\n")
        await _reply(reader, 221, "QUIT")
    except (OSError, ReplyError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        if taken:
            budget.give_back()
        counters.error(f"{type(exc).__name__}: {exc}")
        # A failed session must not spin: back off a little before the next one.
        await asyncio.sleep(0.05)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return True


async def _worker(target: Target, budget: Budget, counters: Counters, message: bytes) -> None:
    while await run_session(target, budget, counters, message):
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


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


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
    budget = Budget(args.messages, args.duration)
    message = make_message(args.size)
    if args.wait_go:
        _emit({"event": "ready"})
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
    }


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
        _emit({"event": "ready"})
        await _wait_for("go")
    started = time.monotonic()
    writers = await asyncio.gather(
        *(_open_idle(target, sources[i % len(sources)], sem, counters) for i in range(args.idle))
    )
    _emit(
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=10, help="concurrent sessions (default 10)")
    p.add_argument("--per-session", type=int, default=1, help="messages per session")
    p.add_argument("--starttls", action="store_true", help="STARTTLS before MAIL")
    p.add_argument("--cafile", help="CA to verify the server certificate against")
    p.add_argument("--server-name", default="localhost", help="name to verify (SNI)")
    p.add_argument("--size", type=int, default=MESSAGE_SIZE, help="message size in bytes")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--messages", type=int, help="stop after this many messages in total")
    mode.add_argument("--duration", type=float, help="stop after this many seconds")
    mode.add_argument("--idle", type=int, help="hold this many idle connections instead")
    p.add_argument("--idle-sources", type=int, default=40, help="127.0.x.y source addresses")
    p.add_argument("--connect-concurrency", type=int, default=50)
    p.add_argument("--wait-go", action="store_true", help="handshake with the parent (stdin)")
    args = p.parse_args(argv)
    for name in ("sessions", "per_session", "size", "idle_sources", "connect_concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.size < 512:
        p.error("--size must be at least 512 bytes (the headers alone take ~250)")
    if args.starttls and not args.cafile:
        p.error("--starttls needs --cafile (the server certificate is verified)")
    if args.cafile and not os.path.isfile(args.cafile):
        p.error(f"--cafile {args.cafile}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = None
    if args.starttls:
        ctx = ssl.create_default_context(cafile=args.cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    target = Target(
        host=args.host,
        port=args.port,
        starttls=args.starttls,
        per_session=args.per_session,
        tls_context=ctx,
        server_name=args.server_name,
    )
    runner = idle if args.idle is not None else load
    result = asyncio.run(runner(args, target))
    _emit(result)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
