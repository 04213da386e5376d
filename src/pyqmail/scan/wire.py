"""What both scanner clients share: the connection, the error, bounded reads.

Why its own module: a scanner is a peer we trust to be there but not to be well-behaved
(it may be down, hang, or answer garbage), so every read is bounded in size here, and every
failure is one ``ScanError`` whose text goes to the log line. The time bound is the
caller's (``stage.run``), over the whole exchange.
"""

from __future__ import annotations

import asyncio

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
