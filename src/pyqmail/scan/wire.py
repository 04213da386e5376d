"""What both scanner clients share: the connection, the error, bounded reads.

Why its own module: a scanner is a peer we trust to be there but not to be well-behaved
(it may be down, hang, or answer garbage), so every read is bounded in size here, and every
failure is one ``ScanError`` whose text goes to the log line. The time bound is the
caller's (``stage.run``), over the whole exchange.

Two ways to talk: clamd's short exchange goes through asyncio streams (``connect``); rspamd's,
once per scanned message, through a bare non-blocking socket and the loop's ``sock_*`` calls
(``open_socket``, ``recv``, ``close_socket``): no transport, protocol or stream objects and
fewer trips through the loop, which measurably cut pyqmail-smtpd's CPU per scanned message
(bench/README.md, "Port 25 with rspamd").

The socket module encodes a host name with the ``idna`` codec, which Python imports on
first use: imported here, with the daemon, because pyqmail-smtpd connects after dropping
privileges, when the interpreter's files may be unreadable (a Python under /root).
"""

from __future__ import annotations

import asyncio
import encodings.idna  # noqa: F401 - the codec a host name to connect to goes through
import socket

from pyqmail.scan.settings import Address


class ScanError(Exception):
    """A scanner that could not be asked or whose answer is unusable; the text is short,
    without blanks (it goes to the log line as ``scan_error=<scanner>:<text>``)."""


async def connect(
    address: Address, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to the scanner; ``limit`` bounds a ``readuntil`` (the reply's head)."""
    try:
        if address.path:
            return await asyncio.open_unix_connection(address.path, limit=limit)
        return await asyncio.open_connection(address.host, address.port, limit=limit)
    except FileNotFoundError:
        raise ScanError("no-socket") from None
    except ConnectionRefusedError:
        raise ScanError("refused") from None
    except OSError as exc:
        raise ScanError(f"connect:{exc.errno}") from None


async def open_socket(address: Address) -> socket.socket:
    """A connected non-blocking socket to the scanner (``close_socket`` when done)."""
    target: str | tuple[str, int] = address.path or (address.host, address.port)
    family = socket.AF_UNIX if address.path else socket.AF_INET
    if not address.path and ":" in address.host:
        family = socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    if family != socket.AF_UNIX:  # the request goes in one send; no Nagle wait for the reply
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.get_running_loop().sock_connect(sock, target)
    except BaseException as exc:  # also a cancellation (the time bound): never leak the fd
        close_socket(sock)
        if isinstance(exc, FileNotFoundError):
            raise ScanError("no-socket") from None
        if isinstance(exc, ConnectionRefusedError):
            raise ScanError("refused") from None
        if isinstance(exc, OSError):
            raise ScanError(f"connect:{exc.errno}") from None
        raise
    return sock


def close_socket(sock: socket.socket) -> None:
    """Forget the socket in the loop's selector first (a cancelled ``sock_recv`` leaves that
    to a later callback, which must not hit a new socket given the same fd), then close it."""
    if sock.fileno() >= 0:
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.remove_writer(sock.fileno())
    sock.close()


async def recv(sock: socket.socket, most: int) -> bytes:
    """At most ``most`` bytes as soon as some are there; b"" at EOF."""
    return await asyncio.get_running_loop().sock_recv(sock, most)


async def read_to_end(reader: asyncio.StreamReader, most: int) -> bytes:
    """Everything up to EOF, at most ``most`` bytes (more is a ``ScanError``)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > most:
            raise ScanError("reply-too-long")
        chunks.append(chunk)


def close(writer: asyncio.StreamWriter) -> None:
    """Drop the connection at once: the reply is read (or will never be), and a graceful
    close would wait for a peer that may not read what is still buffered."""
    writer.transport.abort()
