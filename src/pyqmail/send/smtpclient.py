"""The SMTP client connection remote delivery speaks through: smtplib, connecting to the
address the MX lookup chose while TLS checks the host name, with bounded replies, no
Nagle, and TLS from the first byte on port 465.

Port 465 is SMTP over implicit TLS (RFC 8314 3.3, "submissions"): a smarthost route
``relay:465`` gets the handshake before the greeting, as Postfix's
``smtp_tls_wrappermode`` and ``smtplib.SMTP_SSL`` do. There is no plaintext on that port,
so no cleartext fallback either: a server whose certificate does not verify is tried once
more without verification (``verified=no``), as with STARTTLS; a pinned relay
(``tlshosts``) must verify.
"""

from __future__ import annotations

import smtplib
import socket
import ssl

MAX_REPLY = 64 * 1024  # bytes of one (multi-line) SMTP reply read before giving up
MAX_LINE_IN = 8192  # one reply line (smtplib's own limit)
IMPLICIT_TLS_PORT = 465


class SMTPClient(smtplib.SMTP):
    """smtplib connecting to a chosen address while TLS checks the host name.
    ``implicit``: a context to wrap the socket in before the greeting (port 465)."""

    def __init__(
        self, address: str, helo: str, timeout: float, implicit: ssl.SSLContext | None = None
    ) -> None:
        self._address = address
        self._implicit = implicit
        super().__init__(local_hostname=helo, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        """With TCP_NODELAY: our Finished ends a TLS 1.3 handshake, and a server writing nothing
        then (no session tickets, or tickets held for its first reply) sends nothing that
        carries its ACK, so Nagle would hold our EHLO until the server's delayed ACK (40+ ms
        on Linux). Nagle has nothing else to do here: no PIPELINING, each command waits for
        its reply, and the message goes in one ``sendall``."""
        self._host = host  # the name STARTTLS verifies (smtplib only sets it in __init__)
        sock = socket.create_connection((self._address, port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._implicit is None:
            return sock
        try:
            return self._implicit.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's reply reader with a bound on the whole reply, not only on each line: a
        server sending continuation lines forever is cut off after ``MAX_REPLY`` bytes."""
        lines: list[bytes] = []
        total = 0
        if self.file is None:
            if self.sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            self.file = self.sock.makefile("rb")
        while True:
            try:
                line = self.file.readline(MAX_LINE_IN + 1)
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"connection lost: {exc}") from None
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("connection closed by the server")
            total += len(line)
            if len(line) > MAX_LINE_IN or total > MAX_REPLY:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    f"reply line over {MAX_LINE_IN} bytes"
                    if len(line) > MAX_LINE_IN
                    else f"reply over {MAX_REPLY} bytes"
                )
            lines.append(line[4:].strip(b" \t\r\n"))
            code = line[:3]
            if not code.isdigit():
                return -1, b"\n".join(lines)
            if line[3:4] != b"-":
                return int(code), b"\n".join(lines)
