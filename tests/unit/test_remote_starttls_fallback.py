"""What a failed STARTTLS costs, against loopback servers (``tests.smtpserver``) that stall
the handshake or refuse STARTTLS.

A handshake that stalls (the server says 220 and then nothing) costs one handshake wait,
``min(timeoutremote, 300 s)``, and the message goes in clear on one new connection: not a
second handshake without verification first (it fails the same way), and not a QUIT
into the broken stream. The address is remembered, so the next message goes in clear at
once. A ``tlshosts`` pin never gets plaintext, however the handshake fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.send.peers import PeerMemory
from pyqmail.send.remote import RemoteDelivery
from pyqmail.send.smtpclient import SMTPClient
from tests.conftest import PKI
from tests.smtpserver import Conversation, SmtpServer, deliver_once, standard

MESSAGE = b"Subject: hi\r\n\r\nSECRET-BODY\r\n"


def _stall(conv: Conversation, line: str) -> bool:
    """220 to STARTTLS, then no handshake: whatever comes is kept, nothing is said, until
    the client hangs up."""
    if line.upper() != "STARTTLS":
        return False
    conv.say("220 2.0.0 go ahead")
    conv.held = conv.hold()
    return True


def _refuse(conv: Conversation, line: str) -> bool:
    if line.upper() != "STARTTLS":
        return False
    conv.say("454 4.7.0 TLS not available")
    return True


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    """STARTTLS offered, and its handshake stalled."""
    with SmtpServer(lambda conv: standard(conv, _stall, ("STARTTLS", "8BITMIME"))) as srv:
        yield srv


def _delivery(tmp_path: Path, port: int, pin: bytes | None = None) -> RemoteDelivery:
    root = tmp_path / "control"
    (root / "tlshosts").mkdir(parents=True, exist_ok=True)
    (root / "me").write_text("mx.test\n")
    (root / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
    (root / "timeoutremote").write_text("1\n")
    if pin is not None:
        (root / "tlshosts" / "127.0.0.1.pem").write_bytes(pin)
    return RemoteDelivery(Control.load(tmp_path), peers=PeerMemory())


def test_a_stalled_handshake_costs_one_wait_and_is_remembered(
    tmp_path: Path, server: SmtpServer
) -> None:
    delivery = _delivery(tmp_path, server.port)
    result, took = deliver_once(delivery, MESSAGE)
    assert (result.kind, result.tls) == ("ok", "none"), result
    # The stalled connection, then plaintext: no second handshake without verification.
    assert len(server.conversations) == 2
    assert took < 2.5  # one handshake wait of min(timeoutremote, 300 s) = 1 s
    # Nothing after STARTTLS on the stalled connection but the ClientHello: no QUIT in clear.
    server.wait_closed()
    assert server.conversations[0].lines[-1] == "STARTTLS"
    assert server.conversations[0].held.startswith(b"\x16\x03")  # a TLS handshake record
    assert b"QUIT" not in server.conversations[0].held
    result, took = deliver_once(delivery, MESSAGE)
    assert (result.kind, result.tls) == ("ok", "none"), result
    assert len(server.conversations) == 3
    assert "STARTTLS" not in server.conversations[2].verbs()  # straight to plaintext
    assert took < 0.5


def test_a_handshake_waits_at_most_300_seconds() -> None:
    """Postfix's ``smtp_starttls_timeout``: the default ``timeoutremote`` (1200 s) would
    let a stalled handshake hold a worker twenty minutes."""
    assert SMTPClient("127.0.0.1", "mx.test", 60, reply_timeout=1200).tls_timeout == 300
    assert SMTPClient("127.0.0.1", "mx.test", 60, reply_timeout=30).tls_timeout == 30


def test_a_pinned_host_that_stalls_the_handshake_never_gets_plaintext(
    tmp_path: Path, pki: PKI, server: SmtpServer
) -> None:
    delivery = _delivery(tmp_path, server.port, pin=pki.ca.cert_pem)
    for attempt in (1, 2):
        result, took = deliver_once(delivery, MESSAGE)
        assert result.kind == "temp" and "TLS required" in result.detail, result
        assert "timed out after 1 s waiting for the TLS handshake" in result.detail
        assert took < 2.5
        assert len(server.conversations) == attempt  # one connection each, no fallback
    server.wait_closed()
    for conv in server.conversations:
        assert conv.lines[-1] == "STARTTLS"
        assert b"QUIT" not in conv.held and b"MAIL" not in conv.held  # nothing in clear
        assert conv.messages == []


def test_a_refused_starttls_goes_to_plaintext_on_one_new_connection(tmp_path: Path) -> None:
    """A 454 to STARTTLS costs one reply, so it is not remembered: each message asks again,
    and is then sent in clear on one new connection (before, on the third)."""
    talk = lambda conv: standard(conv, _refuse, ("STARTTLS",))  # noqa: E731
    with SmtpServer(talk) as server:
        delivery = _delivery(tmp_path, server.port)
        for attempt in (1, 2):
            result, _ = deliver_once(delivery, MESSAGE)
            assert (result.kind, result.tls) == ("ok", "none"), result
            assert len(server.conversations) == 2 * attempt
            assert "STARTTLS" in server.conversations[-2].verbs()
            assert "STARTTLS" not in server.conversations[-1].verbs()
