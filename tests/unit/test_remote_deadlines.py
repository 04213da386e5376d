"""Remote delivery's clock, against loopback servers that trickle, pause, stall or read
slowly (``tests.smtpserver``): every reply is complete within ``timeoutremote`` however it
trickles, the greeting gets ``timeoutremote`` too (not ``timeoutconnect``), a delivery has
a deadline, and the message is written for as long as the server keeps taking it.

Small timeouts (1 s) keep the wall time short; each delivery runs in a thread joined with
a bound, so that a client that would wait for ever fails the test instead of hanging it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.send.delivery import Result
from pyqmail.send.peers import PeerMemory
from pyqmail.send.remote import RemoteDelivery
from tests.smtpserver import Conversation, SmtpServer, standard

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
Deliver = Callable[..., "tuple[list[Result], float]"]


def control(tmp_path: Path, port: int, **files: int) -> Control:
    root = tmp_path / "control"
    root.mkdir(exist_ok=True)
    (root / "me").write_text("mx.test\n")
    (root / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
    for name, value in files.items():
        (root / name).write_text(f"{value}\n")
    return Control.load(tmp_path)


@pytest.fixture
def deliver(tmp_path: Path) -> Iterator[Deliver]:
    """``deliver(server, rcpts, message=..., within=..., **control files)``: the results of
    one delivery and the seconds it took; fails when it takes longer than ``within``."""
    servers: list[SmtpServer] = []

    def run(
        server: SmtpServer,
        rcpts: list[str],
        message: bytes = MESSAGE,
        within: float = 10.0,
        **files: int,
    ) -> tuple[list[Result], float]:
        servers.append(server)
        delivery = RemoteDelivery(control(tmp_path, server.port, **files), peers=PeerMemory())
        session = delivery.session("remote.test")
        env = Envelope("id", "me@mx.test", tuple(rcpts), len(message), 0.0)
        out: list[list[Result]] = []
        start = time.monotonic()
        thread = threading.Thread(
            target=lambda: out.append(session.deliver(env, message, rcpts)), daemon=True
        )
        thread.start()
        thread.join(within)
        took = time.monotonic() - start
        assert not thread.is_alive(), f"the delivery still runs after {within} s"
        session.close()
        assert out, "the delivery raised"
        return out[0], took

    yield run
    for server in servers:
        server.close()


def test_a_reply_trickled_byte_by_byte_is_cut_off_at_timeoutremote(deliver: Deliver) -> None:
    """One byte of a never-ending EHLO reply every 0.2 s: each ``recv`` is well within
    ``timeoutremote``, the reply never is (drip.py of the review)."""

    def drip(conv: Conversation, line: str) -> bool:
        if not line.upper().startswith("EHLO"):
            return False
        while True:
            for byte in b"250-slowly\r\n":
                conv.conn.sendall(bytes([byte]))
                time.sleep(0.2)

    server = SmtpServer(lambda conv: standard(conv, drip))
    (result,), took = deliver(server, ["a@remote.test"], within=6, timeoutremote=1)
    assert result.kind == "temp"
    assert "timed out after 1 s waiting for the reply to EHLO" in result.detail, result
    assert took < 3


def test_the_greeting_is_waited_for_timeoutremote_not_timeoutconnect(deliver: Deliver) -> None:
    """A greeting pause (postscreen, a greetdelay) longer than ``timeoutconnect``: the TCP
    connection is made, the greeting has ``timeoutremote`` (RFC 5321 4.5.3.2.1)."""

    def pause(conv: Conversation) -> None:
        time.sleep(1.5)
        standard(conv)

    server = SmtpServer(pause)
    (result,), _ = deliver(server, ["a@remote.test"], timeoutconnect=1, timeoutremote=5)
    assert result.kind == "ok", result
    assert len(server.conversations[0].messages) == 1


def test_no_greeting_says_so_not_that_it_cannot_connect(deliver: Deliver) -> None:
    server = SmtpServer(lambda conv: conv.hold())
    (result,), took = deliver(server, ["a@remote.test"], timeoutconnect=5, timeoutremote=1)
    assert result.kind == "temp"
    assert "no greeting within 1 s (timed out)" in result.detail, result
    assert "cannot connect" not in result.detail
    assert took < 3


def test_a_tarpit_answering_every_command_just_in_time_meets_the_deadline(
    deliver: Deliver,
) -> None:
    """Every reply 0.7 s late, within ``timeoutremote`` (1 s) each: the delivery still ends
    at its deadline, 4 x timeoutremote + timeoutremote / 20 for each of the 9 recipients
    beyond the first + the message at 500 bytes/s (about 4.5 s)."""

    def late(conv: Conversation, line: str) -> bool:
        time.sleep(0.7)
        return False

    rcpts = [f"r{i}@remote.test" for i in range(10)]
    server = SmtpServer(lambda conv: standard(conv, late))
    results, took = deliver(server, rcpts, within=8, timeoutremote=1)
    assert {r.kind for r in results} == {"temp"}
    assert "the delivery's deadline (4.49" in results[0].detail, results[0]
    assert "waiting for the reply to RCPT" in results[0].detail
    assert took < 5.5
    assert server.conversations[0].messages == []


def _slow_reader(pause: float, chunk: int) -> Callable[[Conversation, str], bool]:
    """DATA read ``chunk`` bytes at a time with ``pause`` between (``pause`` < 0: read
    ``chunk`` bytes, then nothing more)."""

    def hook(conv: Conversation, line: str) -> bool:
        if line.upper() != "DATA":
            return False
        conv.say("354 go")
        got = b""
        while not got.endswith(b"\r\n.\r\n"):
            if pause < 0 and len(got) >= chunk:
                conv.stall()
                return True
            piece = conv.rfile.read1(chunk)
            while piece and len(piece) < chunk and not piece.endswith(b"\r\n.\r\n"):
                more = conv.rfile.read1(chunk - len(piece))
                if not more:
                    break
                piece += more
            if not piece:
                return True
            got += piece
            time.sleep(max(pause, 0.0))
        conv.messages.append(got)
        conv.say("250 2.0.0 accepted")
        return True

    return hook


def _small_window(talk: Callable[[Conversation], None]) -> Callable[[Conversation], None]:
    """The server's receive buffer kept small, so the client's writes wait for its reads."""

    def run(conv: Conversation) -> None:
        conv.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        talk(conv)

    return run


def test_a_slow_but_steady_reader_gets_the_whole_message(deliver: Deliver) -> None:
    """3 MiB taken at about 1 MiB/s, so for some 3 s: each write makes progress within
    ``timeoutremote`` (1 s), and the message is written (slowread.py of the review; before,
    ``sendall`` had ``timeoutremote`` for the whole of it)."""
    body = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * (3 * 1024 * 1024 // 78)
    hook = _slow_reader(0.25, 256 * 1024)
    server = SmtpServer(_small_window(lambda conv: standard(conv, hook)))
    (result,), took = deliver(server, ["a@remote.test"], body, within=20, timeoutremote=1)
    assert result.kind == "ok", result
    assert took > 1.5  # it did take longer than timeoutremote
    assert len(server.conversations[0].messages[0]) > len(body)


def test_a_reader_that_stops_is_reported_with_the_bytes_written(deliver: Deliver) -> None:
    body = b"Subject: big\r\n\r\n" + (b"z" * 76 + b"\r\n") * (16 * 1024 * 1024 // 78)
    server = SmtpServer(_small_window(lambda conv: standard(conv, _slow_reader(-1, 100_000))))
    (result,), took = deliver(server, ["a@remote.test"], body, within=10, timeoutremote=1)
    assert result.kind == "temp"
    assert "timed out after " in result.detail and " bytes of the message: " in result.detail
    assert "no progress for 1 s" in result.detail, result
    assert took < 5
