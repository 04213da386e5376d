"""clamd's ``INSTREAM`` command: the message in length-prefixed chunks, one verdict back.

The exchange (clamd(8)): ``zINSTREAM\\0``, then chunks each preceded by its length as four
bytes in network order, then a zero length; clamd answers one NUL-terminated line:
``stream: OK``, ``stream: <signature> FOUND`` or ``<text> ERROR`` (for instance
``INSTREAM size limit exceeded``: clamd's ``StreamMaxLength`` must be at least the largest
message the listeners take, ``databytes``). The reply is read up to ``MAX_REPLY`` bytes;
anything else is garbage (``ScanError``).
"""

from __future__ import annotations

import asyncio
import re
import struct

from pyqmail.scan import wire
from pyqmail.scan.settings import Address
from pyqmail.scan.wire import ScanError

CHUNK = 64 * 1024
MAX_REPLY = 4096
_FOUND = re.compile(rb"stream: ([!-~]{1,200}) FOUND")


async def scan(address: Address, message: bytes) -> str | None:
    """The signature name clamd found in ``message``, or None when it is clean."""
    reader, writer = await wire.connect(address, MAX_REPLY)
    try:
        writer.write(b"zINSTREAM\0")
        try:
            for start in range(0, len(message), CHUNK):
                piece = message[start : start + CHUNK]
                writer.write(struct.pack(">I", len(piece)) + piece)
                await writer.drain()
            writer.write(struct.pack(">I", 0))
            await writer.drain()
        except OSError:
            pass  # clamd may stop reading (a size limit) and still say why: read its reply
        try:
            reply = await reader.readuntil(b"\0")
        except asyncio.LimitOverrunError:
            raise ScanError("reply-too-long") from None
        except asyncio.IncompleteReadError as exc:
            reply = exc.partial
    except OSError as exc:
        raise ScanError(f"io:{exc.errno}") from None
    finally:
        wire.close(writer)
    return verdict(reply.rstrip(b"\0\n"))


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
