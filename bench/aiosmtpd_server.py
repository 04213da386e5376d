"""The aiosmtpd peer: an aiosmtpd server whose handler stores each message durably.

The handler follows the same commit protocol as pyqmail's queue, so both pay for the
same disk work before the 250: write ``tmp/<n>``, fsync it, rename it into ``new/``,
fsync ``new/``. The blocking part runs in the loop's thread pool (fsync releases the
GIL), which is how a careful aiosmtpd user keeps other sessions moving during a sync.
STARTTLS uses the benchmark's certificate.

    python bench/aiosmtpd_server.py --listen 127.0.0.1:2525 --spool DIR \
        --cert server-chain.pem --key server.key
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableSpool:
    """aiosmtpd handler: 250 only after the message is on stable storage."""

    def __init__(self, spool: Path) -> None:
        self.tmp = spool / "tmp"
        self.new = spool / "new"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.new.mkdir(parents=True, exist_ok=True)
        self._names = itertools.count()
        self._prefix = f"{os.getpid()}."

    def _store(self, envelope: Envelope) -> None:
        name = f"{self._prefix}{next(self._names)}"
        head = (
            f"from {envelope.mail_from}\n"
            + "".join(f"to {rcpt}\n" for rcpt in envelope.rcpt_tos)
            + "\n"
        ).encode("utf-8", "surrogateescape")
        content = envelope.original_content or b""
        tmp = self.tmp / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, head + content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.new / name)
        _fsync_dir(self.new)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd's hook name)
        del server, session
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._store, envelope)
        except OSError as exc:
            return f"451 4.3.0 spool error: {exc.strerror}"
        return "250 2.0.0 OK queued"


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--listen wants IP:PORT, got {value!r}")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(args.cert, args.key)
    handler = DurableSpool(args.spool)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(
            handler,
            hostname="mx.bench.test",
            tls_context=ctx,
            data_size_limit=10 * 1024 * 1024,
        )

    host, port = args.listen
    server = await loop.create_server(factory, host, port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sys.stdout.write(f"aiosmtpd listening on {host}:{port}\n")
    sys.stdout.flush()
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_listen, required=True, help="IP:PORT")
    p.add_argument("--spool", type=Path, required=True, help="directory for tmp/ and new/")
    p.add_argument("--cert", required=True, help="certificate chain (PEM)")
    p.add_argument("--key", required=True, help="private key (PEM)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
