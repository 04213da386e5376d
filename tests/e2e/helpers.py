"""Small client-side helpers for the end-to-end tests: TLS contexts and a raw SMTP socket."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import PKI
from tests.pki import Issued


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def free_port() -> int:
    """A loopback port nobody listens on right now (for a daemon the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: user@example.test\r\n"
    b"Subject: e2e\r\n"
    b"Message-ID: <e2e-1@remote.test>\r\n"
    b"\r\n"
    b"Hello there.\r\n"
    b".leading dot survives\r\n"
)


def client_context(pki: PKI, cert: Issued | None = None, tmp: Path | None = None) -> ssl.SSLContext:
    """Trusts the test CA; presents ``cert`` (written to ``tmp``) when given."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        assert tmp is not None
        path = tmp / "client.pem"
        path.write_bytes(cert.key_pem + cert.cert_pem)
        ctx.load_cert_chain(str(path))
    return ctx


class RawSMTP:
    """A line-level SMTP client over a plain socket that can be upgraded to TLS."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout
        )
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        """One complete (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got so far: {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode()
            lines.append(text)
            if text[3:4] != "-":
                return int(text[:3]), lines

    def cmd(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def nothing_pending(self, wait: float = 0.5) -> bool:
        """True if the server sent nothing more within ``wait`` seconds."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        finally:
            self.sock.settimeout(10)
        self.buf += data
        return False

    def is_closed(self, wait: float = 5.0) -> bool:
        """True if the server closes the connection (EOF or reset) within ``wait``."""
        self.sock.settimeout(wait)
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        assert not self.buf, f"plaintext after STARTTLS reply: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def data_segments_in(self) -> int:
        """TCP segments with data this socket has received so far: the kernel's own count
        (``tcpi_data_segs_in`` of Linux's ``struct tcp_info``, at byte 152 since 4.6), so a
        test can tell how many writes the server's replies left in."""
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        return int(struct.unpack_from("=I", info, 152)[0])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def openssl(args: list[str], stdin: bytes = b"quit\r\n", timeout: float = 20) -> tuple[int, str]:
    """Run ``openssl s_client`` and return its exit code and combined output.

    ``-ign_eof``: s_client keeps reading until the server closes (after our QUIT), and
    does not take a line starting with Q as its own quit command."""
    proc = subprocess.run(
        ["openssl", *args, "-ign_eof"],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")


def open_data(c: RawSMTP) -> None:
    """Greeting, EHLO and a one-recipient envelope, up to the 354 of DATA."""
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<s@remote.test>")
    c.cmd("RCPT TO:<user@example.test>")
    assert c.cmd("DATA")[0] == 354
