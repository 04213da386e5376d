"""The outbound benchmark's sink: an SMTP server on 127.0.0.1 that the servers under test
relay to, counting what arrives and checking that every message is DKIM-signed.

A benchmark of signing must prove that the servers signed: a message that arrives without
the signatures expected (``--algorithms``, default one ``rsa-sha256`` and one
``ed25519-sha256`` signature, each with ``d=`` the signing domain ``--domain``) is counted
as unsigned, and the benchmark reports the server as not signing instead of printing a
rate. The sink only looks at the ``DKIM-Signature`` headers (cheap: it shares the cores
with the servers); the benchmark verifies the first message it kept cryptographically.

It speaks enough ESMTP for an MTA's SMTP client (EHLO with PIPELINING, 8BITMIME, SIZE;
MAIL, RCPT, DATA, RSET, NOOP, QUIT; commands may be pipelined) and answers 250 at the end
of DATA at once: it stores nothing, so it costs the servers under test the same little.

Protocol with the parent (one JSON object per line on stdout, each the answer to one line
on stdin, so the parent never has two lines to read): ``{"event": "ready", "port": P}``
once listening; on ``count``, ``{"event": "count", "messages": N}``; on ``report``,
``{"event": "report", ...}`` with the counts and the first message (latin-1 text). EOF on
stdin ends the sink.

    python bench/dkim_sink.py --port 0 --domain bench.test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.lines import write_line

DEFAULT_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
MAX_LINE = 4096
MAX_MESSAGE = 10 * 1024 * 1024


def dkim_signatures(message: bytes) -> list[dict[str, str]]:
    """The tags of every DKIM-Signature header of ``message`` (header section only,
    folded lines joined; tag names lower case, values with white space removed)."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif line:
            fields.append(line)
    out = []
    for raw in fields:
        name, colon, value = raw.partition(b":")
        if not colon or name.strip().lower() != b"dkim-signature":
            continue
        tags = {}
        for part in value.decode("latin-1").split(";"):
            key, eq, val = part.partition("=")
            if eq:
                tags[key.strip().lower()] = "".join(val.split())
        out.append(tags)
    return out


def verdict(message: bytes, domain: str, algorithms: tuple[str, ...]) -> str:
    """``ok`` when the message carries exactly the expected signatures by ``domain``,
    else a short description of what it carries (the report counts those)."""
    sigs = dkim_signatures(message)
    if not sigs:
        return "no DKIM-Signature"
    seen = sorted(f"{s.get('a', '?')} d={s.get('d', '?')}" for s in sigs)
    wanted = sorted(f"{a} d={domain}" for a in algorithms)
    return "ok" if seen == wanted else "signatures: " + ", ".join(seen)


@dataclass
class Tally:
    """What the sink saw; shared by every connection."""

    domain: str
    algorithms: tuple[str, ...]
    messages: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    first: bytes = b""

    def add(self, message: bytes) -> None:
        self.messages += 1
        if not self.first:
            self.first = message
        self.verdicts[verdict(message, self.domain, self.algorithms)] += 1

    def report(self) -> dict[str, Any]:
        return {
            "event": "report",
            "messages": self.messages,
            "signed": self.verdicts["ok"],
            "verdicts": dict(self.verdicts),
            "first": self.first.decode("latin-1"),
        }


class SinkSession(asyncio.Protocol):
    """One SMTP connection: line mode for commands, data mode until CRLF.CRLF."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.have_mail = False
        self.rcpts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.write(b"220 sink.bench.test ESMTP benchmark sink\r\n")

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf and self.transport is not None and not self.transport.is_closing():
            if self.in_data:
                if not self._take_message():
                    return
            elif not self._take_line():
                return

    def _take_message(self) -> bool:
        """A complete message in the buffer: count it and answer; False: wait for more."""
        if self.buf.startswith(b".\r\n"):  # an empty message
            end, message = 0, b""
        else:
            end = self.buf.find(b"\r\n.\r\n")
            if end < 0:
                if len(self.buf) > MAX_MESSAGE:
                    self.write(b"552 5.3.4 message too big for the sink\r\n")
                    assert self.transport is not None
                    self.transport.close()
                return False
            message = bytes(self.buf[: end + 2]).replace(b"\r\n..", b"\r\n.")
            end += 2
        del self.buf[: end + 3]
        self.in_data, self.have_mail, self.rcpts = False, False, 0
        self.tally.add(message)
        self.write(b"250 2.0.0 Ok: counted\r\n")
        return True

    def _take_line(self) -> bool:
        eol = self.buf.find(b"\n")
        if eol < 0:
            if len(self.buf) > MAX_LINE:
                self.write(b"500 5.5.2 line too long\r\n")
                assert self.transport is not None
                self.transport.close()
            return False
        line = bytes(self.buf[:eol]).rstrip(b"\r")
        del self.buf[: eol + 1]
        self.command(line)
        return True

    def command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.write(
                b"250-sink.bench.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
                b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
            )
        elif verb == b"HELO":
            self.write(b"250 sink.bench.test\r\n")
        elif verb == b"MAIL":
            self.have_mail, self.rcpts = True, 0
            self.write(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            if not self.have_mail:
                self.write(b"503 5.5.1 MAIL first\r\n")
                return
            self.rcpts += 1
            self.write(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                self.write(b"503 5.5.1 RCPT first\r\n")
                return
            self.in_data = True
            self.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.have_mail, self.rcpts = False, 0
            self.write(b"250 2.0.0 Ok\r\n")
        elif verb == b"NOOP":
            self.write(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self.write(b"221 2.0.0 Bye\r\n")
            assert self.transport is not None
            self.transport.close()
        else:
            self.write(b"502 5.5.2 command not implemented\r\n")


async def serve(args: argparse.Namespace) -> None:
    tally = Tally(args.domain.lower(), tuple(args.algorithms.split(",")))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkSession(tally), "127.0.0.1", args.port, backlog=1024, reuse_address=True
    )
    write_line({"event": "ready", "port": server.sockets[0].getsockname()[1]})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        word = line.strip()
        if word == "count":
            write_line({"event": "count", "messages": tally.messages})
        elif word == "report":
            write_line(tally.report())
    server.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    p.add_argument("--domain", required=True, help="the signing domain (d=) expected")
    p.add_argument(
        "--algorithms",
        default=",".join(DEFAULT_ALGORITHMS),
        help="the signatures every message must carry, comma-separated",
    )
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        p.error("--port must be 0 to 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
