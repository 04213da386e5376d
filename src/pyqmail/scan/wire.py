"""What both scanner clients share: the connection, the error, bounded reads.

Why its own module: a scanner is a peer we trust to be there but not to be well-behaved
(it may be down, hang, or answer garbage), so every read is bounded in size here, and every
failure is one ``ScanError`` whose text goes to the log line. The time bound is the
caller's (``stage.run``), over the whole exchange.

Both scanners are asked through a bare non-blocking socket and the loop's ``sock_*`` calls
(``open_socket``, ``recv``, ``close_socket``): no transport, protocol or stream objects and
fewer trips through the loop, which measurably cut pyqmail-smtpd's CPU per scanned message
(bench/README.md, "Port 25 with rspamd"); and a write the scanner no longer reads fails
without closing anything, so clamd's reply to an oversized stream can still be read
(``pyqmail.scan.clamd``; asyncio's streams closed the transport on that failure).

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
