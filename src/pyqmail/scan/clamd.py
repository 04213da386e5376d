"""clamd's ``INSTREAM`` command: the message in length-prefixed chunks, one verdict back.

The exchange (clamd(8)): ``zINSTREAM\\0``, then chunks each preceded by its length as four
bytes in network order, then a zero length; clamd answers one NUL-terminated line:
``stream: OK``, ``stream: <signature> FOUND`` or ``<text> ERROR`` (for instance
``INSTREAM size limit exceeded``, after which clamd closes at once). The reply is read up
to ``MAX_REPLY`` bytes; anything else is garbage (``ScanError``).

Over a bare non-blocking socket and the loop's ``sock_*`` calls, as rspamd's exchange
(``pyqmail.scan.wire``): a write clamd no longer reads fails, and the reply must still be
read after it (``_send``). A message larger than clamd takes is not sent at all
(``pyqmail.scan.stage``, ``control/clamdmaxsize``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct

from pyqmail.scan import wire
from pyqmail.scan.settings import Address
from pyqmail.scan.wire import ScanError

CHUNK = 64 * 1024
MAX_REPLY = 4096
_FOUND = re.compile(rb"stream: ([!-~]{1,200}) FOUND")


async def scan(address: Address, message: bytes) -> str | None:
    """The signature name clamd found in ``message``, or None when it is clean."""
    sock = await wire.open_socket(address)
    try:
        await _send(sock, message)
        reply = await _read_reply(sock)
    finally:
        wire.close_socket(sock)
    return verdict(reply.rstrip(b"\0\n"))


async def _send(sock: socket.socket, message: bytes) -> None:
    """The command and the chunks. clamd stops reading once the stream passes its
    ``StreamMaxLength``: it answers ``INSTREAM size limit exceeded. ERROR`` and closes, and
    the next write fails (EPIPE on its Unix socket, ECONNRESET over TCP). That is no error
    of ours: the reply that says why is already on its way, and ``_read_reply`` reads it.
    (asyncio's streams closed the transport on the failed write, and the reply was lost:
    the log said ``io:32``.)"""
    loop = asyncio.get_running_loop()
    view = memoryview(message)
    try:
        await loop.sock_sendall(sock, b"zINSTREAM\0")
        for start in range(0, len(view), CHUNK):
            piece = view[start : start + CHUNK]
            await loop.sock_sendall(sock, struct.pack(">I", len(piece)) + piece)
        await loop.sock_sendall(sock, struct.pack(">I", 0))
    except (BrokenPipeError, ConnectionResetError):
        pass  # clamd stopped reading and said why: read its reply
    except OSError as exc:
        raise ScanError(f"io:{exc.errno}") from None


async def _read_reply(sock: socket.socket) -> bytes:
    """clamd's one line, up to its NUL (or EOF), at most ``MAX_REPLY`` bytes. A reset after
    part of it came keeps that part (``verdict`` judges it)."""
    data = b""
    while b"\0" not in data:
        try:
            chunk = await wire.recv(sock, MAX_REPLY)
        except OSError as exc:
            if data:
                break
            raise ScanError(f"io:{exc.errno}") from None
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REPLY:
            raise ScanError("reply-too-long")
    return data.split(b"\0", 1)[0]


def verdict(reply: bytes) -> str | None:
    """``stream: OK`` → None; ``stream: <name> FOUND`` → name; else ``ScanError``."""
    if reply == b"stream: OK":
        return None
    found = _FOUND.fullmatch(reply)
    if found is not None:
        return found.group(1).decode("ascii")
    if reply.endswith(b" ERROR"):
        text = reply[: -len(b" ERROR")].decode("ascii", "replace")
        raise ScanError("error:" + "-".join(text.split())[:80])
    raise ScanError("garbage" if reply else "eof")
