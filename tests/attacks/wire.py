"""A minimal SMTP client for attack tests: raw bytes out, every reply line in, any source IP."""

from __future__ import annotations

import socket
import ssl
import time


class Wire:
    """One connection; ``replies()`` returns everything the server says until EOF or quiet."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if self.eof:
                return None
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.eof = True
                continue
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """One complete reply: (code, all lines joined by newlines); (0, '') on EOF."""
        lines = []
        while (line := self.line()) is not None:
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)
        return 0, "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        """Send one command line (CRLF appended) and read its reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def until_eof(self, timeout: float = 10.0) -> list[tuple[int, str]]:
        """Every reply until the server closes (or ``timeout`` passes: then a (-1, '') last)."""
        out: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        try:
            while time.monotonic() < deadline:
                code, text = self.reply()
                if code == 0:
                    return out
                out.append((code, text))
        except TimeoutError:
            pass
        out.append((-1, ""))
        return out

    def closed_within(self, seconds: float) -> bool:
        """True if the server closes (EOF/reset) within ``seconds``; data is kept in buf."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return True
            if not chunk:
                return True
            self.buf += chunk
        return False

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        """Handshake on the plain socket; plaintext still buffered is an error."""
        assert not self.buf, f"plaintext after the STARTTLS reply: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def quiet(self, seconds: float = 0.3) -> bool:
        """True if the server sends nothing (and does not close) within ``seconds``."""
        if self.buf:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        except ConnectionResetError:  # closed with our bytes unread: a close, not silence
            self.eof = True
            return False
        finally:
            self.sock.settimeout(10)
        if not chunk:
            self.eof = True
        self.buf += chunk
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
