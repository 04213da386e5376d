"""A hostile or broken DNS server behind the blocklists (issue 17, "Bad input" and fuzzing).

pyqmail-smtpd asks a UDP "name server" this test runs on loopback, which answers every
query with one kind of garbage: random bytes, a truncated header, a reply with another
query id, a reply for another name, a well-formed reply whose A record is outside
127.0.0.0/8, a truncated (TC) reply whose TCP retry finds nothing listening, or nothing at
all. Whatever it does, the client is greeted within ``dnsbltimeout`` (plus a margin), its
mail is accepted (a failing list never blocks mail), and the daemon lives on.
"""

from __future__ import annotations

import os
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import dns.flags
import dns.message
import dns.rrset
import pytest

from tests.attacks.tally import tried
from tests.e2e.conftest import QmailRoot, StartDaemon

CLIENT = "127.0.0.9"
MESSAGE = b"From: a@b.test\r\nSubject: dns garbage\r\n\r\nbody\r\n"


def _reply(query: bytes, mangle: Callable[[dns.message.Message], None]) -> bytes:
    msg = dns.message.from_wire(query)
    reply = dns.message.make_response(msg)
    mangle(reply)
    return reply.to_wire()


def _a(address: str) -> Callable[[dns.message.Message], None]:
    def add(reply: dns.message.Message) -> None:
        name = reply.question[0].name
        reply.answer.append(dns.rrset.from_text(name, 300, "IN", "A", address))

    return add


def _other_name(reply: dns.message.Message) -> None:
    reply.answer.append(dns.rrset.from_text("elsewhere.test.", 300, "IN", "A", "127.0.0.2"))


def _truncated(reply: dns.message.Message) -> None:
    reply.flags |= dns.flags.TC


GARBAGE: dict[str, Callable[[bytes], bytes | None]] = {
    "random-bytes": lambda q: os.urandom(200),
    "short-header": lambda q: q[:5],
    "wrong-id": lambda q: bytes([q[0] ^ 0xFF, q[1]]) + _reply(q, _a("127.0.0.2"))[2:],
    "other-name": lambda q: _reply(q, _other_name),
    "outside-127": lambda q: _reply(q, _a("192.0.2.1")),
    "truncated": lambda q: _reply(q, _truncated),
    "silence": lambda q: None,
}


@pytest.fixture
def liar(request: pytest.FixtureRequest) -> Iterator[int]:
    """A UDP server answering every query with ``GARBAGE[request.param]``; its port."""
    answer = GARBAGE[request.param]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                query, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                data = answer(query)
            except Exception:  # a query dnspython cannot parse: say nothing
                data = None
            if data is not None:
                sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1])
    stop.set()
    thread.join(5)
    sock.close()


@pytest.mark.parametrize("liar", sorted(GARBAGE), indirect=True)
def test_garbage_from_the_name_server_costs_time_not_mail(
    qmail_root: QmailRoot, smtpd: StartDaemon, liar: int
) -> None:
    qmail_root.control("dnsbl", "bl.test\nother.test=2\n")
    qmail_root.control("dnsresolver", f"127.0.0.1@{liar}\n")
    qmail_root.control("dnsbltimeout", "1\n")
    d = smtpd()
    for _ in range(2):  # a second session: nothing cached from the garbage blocks it
        began = time.monotonic()
        with smtplib.SMTP("127.0.0.1", d.port, timeout=10, source_address=(CLIENT, 0)) as s:
            greeted = time.monotonic() - began
            s.ehlo("garbage.test")
            assert s.mail("a@b.test")[0] == 250
            assert s.rcpt("u@mx.test")[0] == 250
            assert s.data(MESSAGE)[0] == 250
        assert greeted < 1.8, greeted
        tried("DNSBL garbage answers")
    assert d.proc.poll() is None
    d.wait_for(r"msg qid=\S+ ", count=2)
    assert "Traceback" not in d.output
