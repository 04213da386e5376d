"""rspamd's HTTP exchange on the wire (``pyqmail.scan.rspamd.check`` over its bare socket,
``pyqmail.scan.wire``), against a scripted loopback peer: the request leaves in one piece,
a reply in any number of pieces is read whole and bounded, a peer that stops short or
never answers is a ``ScanError`` or the time bound, and no socket outlives its scan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyqmail.scan import rspamd, stage
from pyqmail.scan.settings import ScanSettings, parse_address
from pyqmail.scan.wire import ScanError

ENV = rspamd.Envelope("127.0.0.1", "client.test", "a@client.test", ("u@mx.test",), None, "Q1")
MESSAGE = b"From: <a@client.test>\r\nSubject: hi\r\n\r\n" + b"hello world\r\n" * 300
JSON = b'{"action": "no action", "score": 0.5, "required_score": 15}'
REPLY = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(JSON), JSON)


class Peer:
    """A loopback server that records each connection's first read and its whole request,
    then runs ``answer(conn)`` (or never answers when it is None)."""

    def __init__(self, answer: Callable[[socket.socket], None] | None) -> None:
        self.answer = answer
        self.first_reads: list[int] = []
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            data = conn.recv(1 << 20)
            self.first_reads.append(len(data))
            while b"\r\n\r\n" not in data or len(data) < _request_length(data):
                more = conn.recv(1 << 20)
                if not more:
                    return
                data += more
            self.requests.append(data)
            if self.answer is not None:
                self.answer(conn)
                conn.close()

    def drop(self) -> None:
        """Close the accepted connections (they live in the test's process too)."""
        for conn in self.conns:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.drop()


def _request_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(head) + 4


@pytest.fixture
def peer() -> Iterator[Callable[[Callable[[socket.socket], None] | None], Peer]]:
    made: list[Peer] = []

    def make(answer: Callable[[socket.socket], None] | None) -> Peer:
        made.append(Peer(answer))
        return made[-1]

    yield make
    for p in made:
        p.close()


def send(reply: bytes, pieces: int = 1, pause: float = 0.0) -> Callable[[socket.socket], None]:
    """An answer: ``reply`` in ``pieces`` sends, ``pause`` seconds apart."""

    def answer(conn: socket.socket) -> None:
        step = max(1, -(-len(reply) // pieces))
        for i in range(0, len(reply), step):
            conn.sendall(reply[i : i + step])
            time.sleep(pause)

    return answer


def check(address: str) -> rspamd.Reply:
    return asyncio.run(rspamd.check(parse_address(address, "test"), ENV, MESSAGE))


def test_the_request_leaves_in_one_piece(peer: Callable[..., Peer]) -> None:
    """Head and message in one send: rspamd is woken once, not once for the head and again
    for the body (two sends arrived as two reads nearly every time)."""
    p = peer(send(REPLY))
    for _ in range(20):
        assert check(p.address).action == "no action"
    total = len(p.requests[0])
    assert total == len(rspamd.request(ENV, len(MESSAGE))) + len(MESSAGE)
    assert p.first_reads == [total] * 20


@pytest.mark.parametrize(
    ("pieces", "pause"), [(1, 0.0), (7, 0.01), (len(REPLY), 0.0)], ids=["whole", "7", "bytes"]
)
def test_a_reply_in_pieces_is_read_whole(
    peer: Callable[..., Peer], pieces: int, pause: float
) -> None:
    reply = check(peer(send(REPLY, pieces, pause)).address)
    assert (reply.action, reply.score, reply.required) == ("no action", 0.5, 15.0)


def test_without_content_length_the_reply_ends_at_eof(peer: Callable[..., Peer]) -> None:
    p = peer(send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + JSON, 3, 0.01))
    assert check(p.address).score == 0.5


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (REPLY[:-5], "short-body"),
        (REPLY.split(b"\r\n\r\n")[0], "eof"),
        (b"", "eof"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * rspamd.MAX_HEAD + b"\r\n\r\n" + JSON, "head-too-long"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 5000, "head-too-long"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{}", "reply-too-long"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b" " * (rspamd.MAX_BODY + 1), "reply-too-long"),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "http-503"),
    ],
    ids=[
        "short body",
        "head only",
        "nothing",
        "long field",
        "endless head",
        "announced",
        "endless body",
        "503",
    ],
)
def test_a_broken_reply_is_a_scan_error(peer: Callable[..., Peer], reply: bytes, why: str) -> None:
    p = peer(send(reply, 4))
    with pytest.raises(ScanError, match=f"^{why}$"):
        check(p.address)


def _open_fds() -> set[tuple[str, str]]:
    """Each open fd with what it points to (``socket:[inode]`` for a socket). A set, not a
    count: garbage from earlier tests in the same worker may be closed meanwhile, which
    lowers a count; a socket left open is an entry that was not there before."""
    gc.collect()  # close what earlier tests left to the collector now, not during the test
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed by now
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return fds


def test_timed_out_and_failed_scans_leave_no_socket_behind(peer: Callable[..., Peer]) -> None:
    """A scan cancelled at the time bound (its socket waiting in the loop's selector) and one
    that failed close their socket: 30 of each at once, then the process has the fds it
    had, and the loop's selector watches nothing of theirs."""
    hang = peer(None)
    broken = peer(send(b"SPAMD/1.1 0 EX_OK\r\n\r\n"))
    settings = ScanSettings(rspamd=parse_address(hang.address, "test"), timeout=1)
    failing = ScanSettings(rspamd=parse_address(broken.address, "test"), timeout=1)
    refused = ScanSettings(rspamd=parse_address("127.0.0.1:1", "test"), timeout=1)

    async def many() -> tuple[list[stage.Outcome], int]:
        before = len(asyncio.get_running_loop()._selector.get_map())  # type: ignore[attr-defined]
        jobs = [stage.run(s, ENV, MESSAGE) for s in (settings, failing, refused) for _ in range(30)]
        outcomes = await asyncio.gather(*jobs)
        await asyncio.sleep(0.05)  # the loop's own clean-up callbacks
        after = len(asyncio.get_running_loop()._selector.get_map())  # type: ignore[attr-defined]
        return outcomes, after - before

    fds = _open_fds()
    started = time.monotonic()
    outcomes, watched = asyncio.run(many())
    assert time.monotonic() - started < 3
    hang.drop()
    broken.drop()
    assert _open_fds() - fds == set(), "fds opened by the scans and still open"
    assert watched == 0
    logs = [o.verdict.log for o in outcomes]
    assert all(o.verdict.code == 451 for o in outcomes)
    assert sum("scan_error=rspamd:timeout" in log for log in logs) == 30
    assert sum("scan_error=rspamd:not-http" in log for log in logs) == 30
    assert sum("scan_error=rspamd:refused" in log for log in logs) == 30
