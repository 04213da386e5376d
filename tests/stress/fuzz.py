"""Grey-box mutation fuzzer for the sans-I/O SMTP core (``pyqmail.protocol.connection``), on demand.

D1's hypothesis properties (tests/unit/test_protocol_fuzz.py) shrink failures; this runs
for minutes with a growing corpus instead. Each iteration builds an input from SMTP tokens
and mutations (byte flips, inserts, splices, CR/LF/NUL/dot runs, huge repeats) of corpus
entries, picks a random Policy (TLS, AUTH mechanisms, BARELF, pipelining check, limits), splits
the input at random points and drives an ``SMTPConnection`` like the server would (TLS,
AUTH results, queue ids or queue failures, sometimes TERM), then ``timeout()``.

Invariants checked on every event: replies are well-formed SMTP reply lines (multi-line
continuations consistent); the event sequence follows the contract (no message data outside
a message, nothing after Close, recipients without CR/LF/NUL, Close after timeout); the
core's buffer stays bounded; no exception other than none escapes. Feedback: an input that
produces a new (reply code, state) pair or a new event shape joins the corpus. The process's
peak RSS growth is reported and checked at the end (bounded memory).

``python -m tests.stress.fuzz --seconds 120`` prints ``iterations=N corpus=M failures=F``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable

from pyqmail.protocol import (
    AuthRejected,
    AuthRequest,
    Close,
    Event,
    MessageAbort,
    MessageData,
    MessageEnd,
    MessageStart,
    Policy,
    Send,
    SMTPConnection,
    StartTLS,
    TLSInfo,
)
from tests.core_buffers import held_bytes

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][\x20-\x7e\x80-\xff]*\Z")
TLS = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256)
TOKENS = [
    b"EHLO client.example\r\n", b"HELO x\r\n", b"EHLO\r\n", b"MAIL FROM:<a@example.net>\r\n",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n", b"MAIL FROM:<a@b.test> SMTPUTF8\r\n",
    b"RCPT TO:<u@example.test>\r\n", b"RCPT TO:<x@elsewhere.test>\r\n",
    b"RCPT TO:<@r.test:u@example.test>\r\n", b"RCPT TO:<u%evil.test@example.test>\r\n",
    b"RCPT TO:<postmaster>\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
    b"VRFY x\r\n", b"EXPN x\r\n", b"HELP\r\n", b"BDAT 10 LAST\r\n", b"STARTTLS\r\n",
    b"AUTH PLAIN AGFsaWNlAHB3\r\n", b"AUTH PLAIN\r\n", b"AGFsaWNlAHdyb25n\r\n", b"AUTH LOGIN\r\n",
    b"YWxpY2U=\r\n", b"cHc=\r\n", b"*\r\n", b"AUTH CRAM-MD5\r\n", b"YWxpY2UgMDAwMA==\r\n",
    b"\r\n.\r\n", b".\r\n", b"..\r\n", b"\r\n", b"\n", b"\r", b".", b"\x00", b"\xff", b"\xc3\xa9",
    b"Subject: x\r\n", b"Message-ID: <m@x>\r\n", b" folded\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n",
    b"\r\n.\n", b"\r\n.\r", b"\x00.\r\n", b"\r\n\x00.\r\n",
]  # fmt: skip
SPECIAL = [b"\r", b"\n", b".", b"\x00", b"\r\n", b" ", b":", b"<", b">", b"@", b"="]
USERS = {"alice": "pw"}


class InvariantError(Exception):
    """An invariant was broken."""


def random_policy(rng: random.Random) -> Policy:
    tls = rng.random() < 0.3
    return Policy(
        hostname="mx.example.test",
        greeting="mx.example.test ESMTP",
        client_ip="192.0.2.7",
        tls_active=tls,
        tls_info=TLS if tls else None,
        starttls_available=not tls and rng.random() < 0.8,
        auth_mechanisms=rng.choice([(), ("PLAIN", "LOGIN"), ("PLAIN", "LOGIN", "CRAM-MD5")]),
        force_tls=rng.random() < 0.5,
        auth_required=rng.random() < 0.3,
        relay_client=rng.random() < 0.2,
        bare_lf=rng.random() < 0.5,
        databytes=rng.choice([0, 0, 64, 1000, 100_000]),
        maxrcpt=rng.choice([0, 1, 3, 100]),
        rcpthosts=lambda d: d in ("example.test", "mx.example.test"),
        max_line=rng.choice([512, 1000, 4096]),
        max_errors=rng.choice([3, 10]),
        max_auth_failures=rng.choice([1, 3]),
        max_pending=rng.choice([4096, 8192, 256 * 1024]),
        hard_max_recipients=rng.choice([5, 1000]),
        reject_unauth_pipelining=rng.random() < 0.7,
        clock=lambda: 1_700_000_000.0,
        max_junk=rng.choice([0, 2, 100]),
        auth_header=rng.random() < 0.5,
    )


class Driver:
    """Plays the server layer and checks the contract on every event."""

    def __init__(self, pol: Policy, rng: random.Random) -> None:
        self.pol, self.rng = pol, rng
        self.conn = SMTPConnection(pol)
        self.closed = False
        self.in_message = False
        self.queued = 0
        self.shape: set[tuple[str, str]] = set()
        self.run(self.conn.start)

    def run(self, call: Callable[[], list[Event]]) -> None:
        for event in call():
            self.check(event)
        bound = self.pol.max_pending + self.pol.max_line + 64 * 1024 + 8
        held = held_bytes(self.conn)
        if held > bound:
            raise InvariantError(f"core buffers {held} bytes (bound {bound})")

    def check(self, event: Event) -> None:
        if self.closed:
            raise InvariantError(f"{event!r} after Close")
        self.shape.add((type(event).__name__, str(self.conn.state)))
        if isinstance(event, Send):
            check_replies(event.data)
            for line in event.data.split(b"\r\n")[:-1]:
                self.shape.add(("reply", line[:3].decode()))
        elif isinstance(event, Close):
            self.closed = True
        elif isinstance(event, StartTLS):
            if self.in_message:
                raise InvariantError("StartTLS inside a message")
            self.run(lambda: self.conn.tls_started(TLS))
        elif isinstance(event, AuthRequest):
            if self.in_message:
                raise InvariantError("AuthRequest inside a message")
            ok = USERS.get(event.username) == event.password and self.rng.random() < 0.8
            busy = self.rng.random() < 0.1  # the shared AUTH limits answer 454
            self.run(lambda: self.conn.auth_result(event.username if ok else None, temporary=busy))
        elif isinstance(event, AuthRejected):
            if self.in_message or not event.reason:
                raise InvariantError(f"bad AuthRejected {event!r}")
        elif isinstance(event, MessageStart):
            if self.in_message or not event.recipients:
                raise InvariantError(f"bad MessageStart {event!r}")
            for addr in (event.sender, *event.recipients):
                if set("\r\n\0") & set(addr):
                    raise InvariantError(f"control character in address {addr!r}")
            self.in_message = True
        elif isinstance(event, MessageData):
            if not self.in_message:
                raise InvariantError("MessageData outside a message")
        elif isinstance(event, MessageEnd):
            if not self.in_message:
                raise InvariantError("MessageEnd outside a message")
            self.in_message = False
            self.queued += 1
            if self.rng.random() < 0.2:
                self.run(self.conn.message_failed)
            else:
                self.run(lambda: self.conn.message_queued(f"Q{self.queued}"))
        elif isinstance(event, MessageAbort):
            if not self.in_message:
                raise InvariantError(f"MessageAbort outside a message: {event!r}")
            self.in_message = False
        else:
            raise InvariantError(f"unknown event {event!r}")

    def feed(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            if self.closed:
                return
            self.run(lambda piece=piece: self.conn.receive(piece))  # type: ignore[misc]
            if self.rng.random() < 0.01 and not self.closed:
                self.run(self.conn.shutdown)


def check_replies(data: bytes) -> None:
    if not data.endswith(b"\r\n"):
        raise InvariantError(f"reply not CRLF-terminated: {data!r}")
    lines = data[:-2].split(b"\r\n")
    for line, nxt in zip(lines, [*lines[1:], None], strict=True):
        if not REPLY_LINE.match(line):
            raise InvariantError(f"malformed reply line {line!r}")
        if line[3:4] == b"-" and (nxt is None or nxt[:3] != line[:3]):
            raise InvariantError(f"broken multi-line reply {line!r} then {nxt!r}")


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice(SPECIAL) * rng.randint(1, 4)
        elif op == 2:
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 3 and buf:
            end = min(len(buf), pos + rng.randint(1, 16))
            del buf[pos:end]
        elif op == 4:
            other = rng.choice(corpus)
            a = rng.randint(0, len(other))
            buf[pos:pos] = other[a : a + rng.randint(1, 64)]
        elif op == 5:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            buf[pos:pos] = rng.choice([b"A", b"x", b"\r\n", b"RCPT TO:<u@example.test>\r\n"]) * (
                rng.choice([100, 1000, 5000])
            )
    return bytes(buf[:200_000])


def split(rng: random.Random, data: bytes) -> list[bytes]:
    if not data:
        return []
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def one(rng: random.Random, data: bytes) -> set[tuple[str, str]]:
    driver = Driver(random_policy(rng), rng)
    driver.feed(split(rng, data))
    if not driver.closed and rng.random() < 0.2:
        driver.run(driver.conn.connection_lost)
        driver.closed = True
    if not driver.closed:
        driver.run(driver.conn.timeout)
        if not driver.closed:
            raise InvariantError("no Close after timeout()")
    if driver.in_message:
        raise InvariantError("message still open after Close")
    return driver.shape


def fuzz(seconds: float, seed: int, report: Callable[[str], None] = print) -> tuple[int, int, list]:
    rng = random.Random(seed)
    corpus = [
        b"EHLO a\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nx\r\n.\r\n",
        b"".join(TOKENS[:12]),
    ]
    seen: set[tuple[str, str]] = set()
    failures: list[tuple[bytes, str]] = []
    iterations = 0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if rng.random() < 0.3:
            data = b"".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 40)))
        else:
            data = mutate(rng, rng.choice(corpus), corpus)
        iterations += 1
        try:
            shape = one(rng, data)
        except InvariantError as exc:
            failures.append((data, str(exc)))
            report(f"FAILURE {exc}: input {data[:300]!r}")
            continue
        except Exception:  # any escaping exception is a finding
            failures.append((data, traceback.format_exc()))
            report(f"EXCEPTION on input {data[:300]!r}:\n{traceback.format_exc()}")
            continue
        if shape - seen:
            seen |= shape
            corpus.append(data)
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    report(f"corpus features={len(seen)} peak RSS growth={growth_kib // 1024} MiB")
    if growth_kib > 200 * 1024:
        failures.append((b"", f"peak RSS grew by {growth_kib // 1024} MiB"))
    return iterations, len(corpus), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"fuzz: protocol core for {args.seconds:.0f}s, seed={seed}", flush=True)
    iterations, corpus, failures = fuzz(args.seconds, seed)
    print(f"iterations={iterations} corpus={corpus} failures={len(failures)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
