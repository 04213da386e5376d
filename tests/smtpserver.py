"""Loopback SMTP servers that misbehave on purpose, for remote delivery's tests.

``SmtpServer(talk)`` listens on 127.0.0.1 (or a given address and port) and runs
``talk(conversation)`` for each connection in a thread of its own; ``Conversation`` reads
lines, records them, answers. ``standard(conversation, hook)`` is a plain server's side of
the dialogue (greeting, EHLO with ``extensions``, MAIL, RCPT, DATA, RSET, QUIT) in which
``hook(conversation, line)`` may answer any line itself (return True) to stall, trickle,
refuse or hang up. ``close()`` closes the listener and every connection, so a thread that
stalls on purpose ends with the test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyqmail.queue.format import Envelope

if TYPE_CHECKING:
    from pyqmail.send.delivery import Result
    from pyqmail.send.remote import RemoteDelivery

Hook = Callable[["Conversation", str], bool]


class Conversation:
    """One accepted connection: what it received (``lines``), how to answer."""

    def __init__(self, conn: socket.socket, number: int) -> None:
        self.conn = conn
        self.number = number
        self.rfile = conn.makefile("rb")
        self.lines: list[str] = []
        self.messages: list[bytes] = []
        self.held = b""  # what a stalled conversation received (``hold``)
        self.closed = threading.Event()
        self.ending = threading.Event()  # the server is closing

    def say(self, text: str) -> None:
        self.conn.sendall(text.encode() + b"\r\n")

    def line(self) -> str | None:
        raw = self.rfile.readline()
        if not raw:
            return None
        text = raw.decode(errors="replace").rstrip("\r\n")
        self.lines.append(text)
        return text

    def data(self) -> bytes:
        """The message after a 354, up to the lone dot."""
        chunks = []
        while (raw := self.rfile.readline()) not in (b".\r\n", b""):
            chunks.append(raw)
        return b"".join(chunks)

    def stall(self, seconds: float = 30.0) -> None:
        """Read nothing, say nothing, until the server closes (or ``seconds`` pass)."""
        self.ending.wait(seconds)

    def hold(self, seconds: float = 30.0) -> bytes:
        """Say nothing until the client goes away (or ``seconds`` pass); what it sent
        meanwhile (a TLS ClientHello, a QUIT in clear ...)."""
        self.conn.settimeout(seconds)
        got = b""
        with contextlib.suppress(OSError):
            while piece := self.conn.recv(65536):
                got += piece
        return got

    def verbs(self) -> list[str]:
        return [ln.split(" ", 1)[0].upper() for ln in self.lines]


def standard(
    conv: Conversation,
    hook: Hook | None = None,
    extensions: tuple[str, ...] = ("8BITMIME",),
    greeting: str = "220 fake.test ESMTP",
) -> None:
    """A well-behaved server's side of the dialogue, but for what ``hook`` answers."""
    conv.say(greeting)
    while (line := conv.line()) is not None:
        if hook is not None and hook(conv, line):
            continue
        verb = line.split(" ", 1)[0].upper()
        if verb in ("EHLO", "HELO"):
            ext = ["fake.test", *extensions]
            conv.say(
                "\r\n".join(f"250{'-' if i < len(ext) - 1 else ' '}{e}" for i, e in enumerate(ext))
            )
        elif verb == "DATA":
            conv.say("354 go")
            conv.messages.append(conv.data())
            conv.say("250 2.0.0 accepted")
        elif verb == "QUIT":
            conv.say("221 bye")
            return
        else:
            conv.say("250 ok")


class SmtpServer:
    """``talk(conversation)`` for each connection to ``host``:``port`` (0: a free one)."""

    def __init__(
        self, talk: Callable[[Conversation], None], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.talk = talk
        self.sock = socket.create_server((host, port))
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self.conversations: list[Conversation] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                conv = Conversation(conn, len(self.conversations))
                self.conversations.append(conv)
            threading.Thread(target=self._run, args=(conv,), daemon=True).start()

    def _run(self, conv: Conversation) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.talk(conv)
        conv.closed.set()
        with contextlib.suppress(OSError):
            conv.rfile.close()
            conv.conn.close()

    def wait_closed(self, seconds: float = 5.0) -> None:
        """Until every conversation so far has ended on the server's side."""
        end = time.monotonic() + seconds
        for conv in list(self.conversations):
            conv.closed.wait(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            conversations = list(self.conversations)
        for conv in conversations:
            conv.ending.set()
            with contextlib.suppress(OSError):
                conv.conn.shutdown(socket.SHUT_RDWR)
            conv.closed.wait(5)

    def __enter__(self) -> SmtpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deliver_once(delivery: RemoteDelivery, message: bytes) -> tuple[Result, float]:
    """``message`` from me@mx.test to a@remote.test in a session of its own (as the next job
    of another worker of the delivery child), closed after it: its one result, and the
    seconds it took."""
    session = delivery.session("remote.test")
    env = Envelope("id", "me@mx.test", ("a@remote.test",), len(message), 0.0)
    start = time.monotonic()
    try:
        (result,) = session.deliver(env, message, ["a@remote.test"])
    finally:
        session.close()
    return result, time.monotonic() - start
