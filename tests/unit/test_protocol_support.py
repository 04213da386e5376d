"""Shared driver for the protocol tests: an in-memory server around the sans-I/O core."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pyqmail.protocol import (
    AuthRejected,
    AuthRequest,
    Close,
    Event,
    MessageAbort,
    MessageData,
    MessageEnd,
    MessageStart,
    Policy,
    Send,
    SMTPConnection,
    StartTLS,
    TLSInfo,
)

HOST = "mx.example.test"
LOCAL_DOMAINS = frozenset({"example.test", "mx.example.test", "[192.0.2.1]"})
USERS = {"alice@example.test": "s3cret pass", "bob": "hunter2"}
CRAM_USERS = {"alice@example.test": "s3cret pass"}
TLS = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)


def policy(**overrides: Any) -> Policy:
    base: dict[str, Any] = {
        "hostname": HOST,
        "greeting": f"{HOST} ESMTP",
        "client_ip": "192.0.2.7",
        "client_host": "client.example.net",
        "rcpthosts": lambda domain: domain in LOCAL_DOMAINS,
        "clock": lambda: 1_700_000_000.0,
    }
    base.update(overrides)
    return Policy(**base)


def check_password(request: AuthRequest) -> str | None:
    import hashlib
    import hmac

    if request.mechanism == "CRAM-MD5":
        secret = CRAM_USERS.get(request.username)
        if secret is None or request.challenge is None or request.response is None:
            return None
        want = hmac.new(secret.encode(), request.challenge.encode(), hashlib.md5).hexdigest()
        return request.username if hmac.compare_digest(want, request.response) else None
    if USERS.get(request.username) == request.password:
        return request.username
    return None


@dataclasses.dataclass
class Message:
    start: MessageStart
    data: bytearray
    end: MessageEnd | None = None
    aborted: str | None = None

    @property
    def body(self) -> bytes:
        """The client's content, without the Received header the core prepends."""
        return bytes(self.data[_received_len(bytes(self.data)) :])


def _received_len(data: bytes) -> int:
    # The Received header ends at the first CRLF not followed by a TAB.
    pos = 0
    while True:
        pos = data.index(b"\r\n", pos) + 2
        if data[pos : pos + 1] != b"\t":
            return pos


class Server:
    """Feeds bytes in and answers every event the way pyqmail-smtpd would."""

    def __init__(
        self, pol: Policy | None = None, *, auto_start: bool = True, fail_queue: bool = False
    ) -> None:
        self.conn = SMTPConnection(pol or policy())
        self.out = bytearray()
        self.events: list[Event] = []
        self.messages: list[Message] = []
        self.closed = False
        self.tls_starts = 0
        self.auth_rejected: list[AuthRejected] = []
        self.fail_queue = fail_queue
        self.queued = 0
        if auto_start:
            self.handle(self.conn.start())

    def handle(self, events: Iterable[Event]) -> None:
        for event in events:
            self.events.append(event)
            assert not self.closed, f"event after Close: {event}"
            if isinstance(event, Send):
                self.out += event.data
            elif isinstance(event, Close):
                self.closed = True
            elif isinstance(event, StartTLS):
                self.tls_starts += 1
                self.handle(self.conn.tls_started(TLS))
            elif isinstance(event, AuthRequest):
                self.handle(self.conn.auth_result(check_password(event)))
            elif isinstance(event, AuthRejected):
                self.auth_rejected.append(event)
            elif isinstance(event, MessageStart):
                self.messages.append(Message(event, bytearray()))
            elif isinstance(event, MessageData):
                assert self.messages and self.messages[-1].end is None
                self.messages[-1].data += event.chunk
            elif isinstance(event, MessageEnd):
                msg = self.messages[-1]
                assert msg.aborted is None
                msg.end = event
                assert event.size == len(msg.data)
                if self.fail_queue:
                    self.handle(self.conn.message_failed())
                else:
                    self.queued += 1
                    self.handle(self.conn.message_queued(f"Q{self.queued}"))
            elif isinstance(event, MessageAbort):
                self.messages[-1].aborted = event.reason
            else:  # pragma: no cover - the fuzz test checks this too
                raise TypeError(f"unknown event {event!r}")

    def send(self, data: bytes | str) -> list[str]:
        """Feed data; return the reply lines it produced."""
        if isinstance(data, str):
            data = data.encode()
        before = len(self.out)
        self.handle(self.conn.receive(data))
        return self.lines(before)

    def lines(self, since: int = 0) -> list[str]:
        text = bytes(self.out[since:]).decode()
        assert text == "" or text.endswith("\r\n"), text
        return text.split("\r\n")[:-1]

    def cmd(self, line: str) -> str:
        """One command line; returns the single-line or last line of the reply."""
        got = self.send(line + "\r\n")
        assert got, f"no reply to {line!r}"
        return got[-1]


def ready(pol: Policy | None = None, helo: str = "EHLO client.example.net") -> Server:
    srv = Server(pol)
    assert srv.cmd(helo).startswith("250")
    return srv


def in_data(pol: Policy | None = None, rcpt: str = "<user@example.test>") -> Server:
    srv = ready(pol)
    assert srv.cmd("MAIL FROM:<sender@example.net>").startswith("250")
    assert srv.cmd(f"RCPT TO:{rcpt}").startswith("250")
    assert srv.cmd("DATA").startswith("354")
    return srv
