"""TLS session resumption in the load generator, and the resumed share in the table.

The servers that send to an MX reconnect all day and resume their TLS sessions; the
"resumed STARTTLS 1 msg/session" workload does the same. ``loop.start_tls`` (asyncio's and
uvloop's) has no ``session`` parameter, but both make their ``SSLObject`` with
``sslcontext.wrap_bio(...)``: ``ResumingContext`` overrides that to pass the session saved
from an earlier connection. The session is saved after the first reply that follows the
handshake (``remember``), since TLS 1.3 tickets arrive after the handshake itself. One
generator process keeps one session, the latest, as an MTA keeps one per destination.
"""

from __future__ import annotations

import ssl
from typing import Any


class ResumingContext(ssl.SSLContext):
    """A client context whose connections offer the last session ``remember`` saw."""

    saved: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """``SSLContext.wrap_bio`` with the saved session unless one is given."""
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session or self.saved,
        )

    def remember(self, sslobj: ssl.SSLObject) -> None:
        """Keep ``sslobj``'s session (its newest ticket) for the next connection."""
        session = sslobj.session
        if session is not None and session.has_ticket:
            self.saved = session


def client_context(cafile: str, *, resume: bool) -> ssl.SSLContext:
    """The generator's context: verifies the server; resumes if asked (the same settings
    as ``ssl.create_default_context``, which cannot make a subclass)."""
    if not resume:
        ctx = ssl.create_default_context(cafile=cafile)
    else:
        ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def share(results: list[dict[str, Any]]) -> tuple[int, int]:
    """(handshakes, resumed ones) over the generators' results."""
    return (
        sum(int(r.get("handshakes", 0)) for r in results),
        sum(int(r.get("resumed", 0)) for r in results),
    )


def share_lines(rows: list[tuple[str, str, int, int]]) -> list[str]:
    """The table's lines: per (workload, server), resumed handshakes out of all."""
    if not rows:
        return []
    lines = [f"{'TLS sessions resumed (client side)':<32}"]
    for workload, server, handshakes, resumed in rows:
        pct = f"{100 * resumed / handshakes:.1f}%" if handshakes else "n/a"
        lines.append(f"  {workload:<30}{server:>16}  {resumed}/{handshakes} = {pct}")
    return lines
