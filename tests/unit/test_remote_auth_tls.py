"""An AUTH route (``smtproutes-auth``) and the memories of failed TLS, against a loopback
server (``tests.smtpserver``) that speaks real TLS with a certificate the client trusts
(``SSL_CERT_FILE`` names the test CA).

AUTH goes only over verified TLS, so for such a route a stalled handshake must defer the
message without a plaintext try, and must not make the next messages skip STARTTLS:
before, one stall sent every delivery of the next hour straight to plaintext, where AUTH
was refused, so the relay's mail waited an hour after the relay had recovered.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.send.mx import Destination
from pyqmail.send.peers import PeerMemory
from pyqmail.send.remote import RemoteDelivery
from tests.conftest import PKI
from tests.smtpserver import Conversation, SmtpServer, deliver_once, standard

MESSAGE = b"Subject: hi\r\n\r\nSECRET-BODY\r\n"
EXTENSIONS = ("STARTTLS", "AUTH PLAIN", "8BITMIME")


def _server_context(pki: PKI, tmp_path: Path) -> ssl.SSLContext:
    cert = tmp_path / "server.pem"
    cert.write_bytes(pki.server.key_pem + pki.server.cert_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert)
    return ctx


def _relay(ctx: ssl.SSLContext, stalled: set[int]) -> SmtpServer:
    """STARTTLS and AUTH PLAIN; the handshake of the conversations numbered in ``stalled``
    gets a 220 and then nothing (what the client sends is kept in ``held``)."""

    def hook(conv: Conversation, line: str) -> bool:
        verb = line.split(" ", 1)[0].upper()
        if verb == "AUTH":
            conv.say("235 2.7.0 authenticated")
            return True
        if verb != "STARTTLS":
            return False
        conv.say("220 2.0.0 go ahead")
        if conv.number in stalled:
            conv.held = conv.hold()
            return True
        conv.conn = ctx.wrap_socket(conv.conn, server_side=True)
        conv.rfile = conv.conn.makefile("rb")
        return True

    return SmtpServer(lambda conv: standard(conv, hook, EXTENSIONS))


def _delivery(tmp_path: Path, port: int, peers: PeerMemory) -> RemoteDelivery:
    root = tmp_path / "control"
    root.mkdir(exist_ok=True)
    (root / "me").write_text("mx.test\n")
    (root / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
    (root / "smtproutes-auth").write_text("127.0.0.1:user:pw\n")
    (root / "timeoutremote").write_text("1\n")
    return RemoteDelivery(Control.load(tmp_path), peers=peers)


@pytest.fixture
def trusted(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> PKI:
    """The client's system CA store is the test CA."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    return pki


def test_a_stalled_handshake_defers_without_plaintext_and_is_not_remembered(
    tmp_path: Path, trusted: PKI
) -> None:
    """The reviewer's scenario: the first handshake stalls, then the relay works."""
    with _relay(_server_context(trusted, tmp_path), stalled={0}) as relay:
        delivery = _delivery(tmp_path, relay.port, PeerMemory())
        first, took = deliver_once(delivery, MESSAGE)
        assert first.kind == "temp", first
        assert "TLS handshake failed" in first.detail, first
        assert "timed out after 1 s waiting for the TLS handshake" in first.detail
        assert "no fallback on a route with AUTH" in first.detail
        assert took < 2.5
        assert len(relay.conversations) == 1  # no plaintext connection after it
        second, _ = deliver_once(delivery, MESSAGE)
        assert (second.kind, second.verified) == ("ok", "yes"), second
        relay.wait_closed()
    assert relay.conversations[0].verbs() == ["EHLO", "STARTTLS"]
    assert b"AUTH" not in relay.conversations[0].held
    assert b"MAIL" not in relay.conversations[0].held
    assert relay.conversations[1].verbs()[:2] == ["EHLO", "STARTTLS"]  # TLS tried again
    assert "AUTH" in relay.conversations[1].verbs()
    assert len(relay.conversations[1].messages) == 1


def test_an_auth_route_ignores_the_tls_memories_of_its_address(
    tmp_path: Path, trusted: PKI
) -> None:
    """An address remembered as "TLS failed" and as "certificate unverifiable" (by an
    earlier delivery, of this route or of another one to the same address) still gets
    verified TLS, and AUTH, on an AUTH route."""
    with _relay(_server_context(trusted, tmp_path), stalled=set()) as relay:
        peers = PeerMemory()
        dest = Destination("127.0.0.1", "127.0.0.1", relay.port)
        peers.mark_tls_failed(dest)
        peers.mark_unverifiable(dest)
        delivery = _delivery(tmp_path, relay.port, peers)
        result, _ = deliver_once(delivery, MESSAGE)
        assert (result.kind, result.verified) == ("ok", "yes"), result
        relay.wait_closed()
    assert len(relay.conversations) == 1
    assert relay.conversations[0].verbs()[:2] == ["EHLO", "STARTTLS"]
    assert len(relay.conversations[0].messages) == 1
