"""Remote delivery to a relay on port 465: TLS from the first byte (RFC 8314 3.3), as
Postfix's ``smtp_tls_wrappermode``; before, pyqmail-send spoke plain SMTP there and both
sides waited for the other until ``timeoutremote``, deferring every message.

In process (``RemoteDelivery``, as pyqmail-send's workers use it) against ``Recorder``, a
real TLS server on loopback. Port 465 on loopback is this host (a loop, refused before any
connection), so the tests make the Recorder's own port the implicit one: the constant is
what they set, the handshake, verification, AUTH and refusals are the real ones."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope as QueuedEnvelope
from pyqmail.send import remote
from pyqmail.send.delivery import Result
from pyqmail.send.remote import RemoteDelivery
from tests.conftest import PKI
from tests.e2e.test_send import Recorder, message, server_ctx  # noqa: F401 - a fixture


@pytest.fixture
def implicit(
    server_ctx: ssl.SSLContext,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Recorder]:
    rec = Recorder(tls=server_ctx, implicit=True, starttls=False, auth=True)
    monkeypatch.setattr(remote, "IMPLICIT_TLS_PORT", rec.port)
    yield rec
    rec.close()


def _deliver(tmp_path: Path, port: int, pem: bytes | None = None, auth: bool = False) -> Result:
    """One message to a@remote.test through the relay ``127.0.0.1:port`` (pinned to
    ``pem`` when given; with AUTH credentials when ``auth``)."""
    control = tmp_path / "sender" / "control"
    (control / "tlshosts").mkdir(parents=True, exist_ok=True)
    (control / "me").write_text("mx.test\n")
    (control / "smtproutes").write_text(f"remote.test:127.0.0.1:{port}\n")
    if auth:
        (control / "smtproutes-auth").write_text("127.0.0.1:relay:s3:cret\n")
    if pem is not None:
        (control / "tlshosts" / "127.0.0.1.pem").write_bytes(pem)
    body = message("implicit", "SECRET-BODY-465\r\n")
    env = QueuedEnvelope("id", "me@mx.test", ("a@remote.test",), len(body), 0.0)
    session = RemoteDelivery(Control.load(control.parent)).session("remote.test")
    try:
        (result,) = session.deliver(env, body, ["a@remote.test"])
    finally:
        session.close()
    return result


def test_a_pinned_relay_gets_tls_before_the_greeting(
    tmp_path: Path, pki: PKI, implicit: Recorder
) -> None:
    result = _deliver(tmp_path, implicit.port, pem=pki.ca.cert_pem, auth=True)
    assert (result.kind, result.tls, result.verified) == ("ok", "TLSv1.3", "yes"), result
    assert [r for r, _, _ in implicit.accepted] == ["a@remote.test"]
    assert bytes(implicit.cleartext) == b""  # not even the greeting in clear


def test_an_unverified_relay_is_encrypted_but_gets_no_credentials(
    tmp_path: Path, implicit: Recorder
) -> None:
    """The test CA is not trusted: tried again without verification (``verified=no``),
    as with STARTTLS; on a route with AUTH there is no such second try (credentials need
    a verified certificate): the delivery is deferred at once and says why."""
    result = _deliver(tmp_path, implicit.port)
    assert (result.kind, result.tls, result.verified) == ("ok", "TLSv1.3", "no"), result
    refused = _deliver(tmp_path / "auth", implicit.port, auth=True)
    assert refused.kind == "temp" and "credentials are only sent over TLS" in refused.detail
    assert len(implicit.accepted) == 1
    assert bytes(implicit.cleartext) == b""


def test_a_pin_that_does_not_match_defers_with_nothing_sent(
    tmp_path: Path, pki: PKI, implicit: Recorder
) -> None:
    result = _deliver(tmp_path, implicit.port, pem=pki.other_ca.cert_pem)
    assert result.kind == "temp" and "TLS required" in result.detail, result
    assert implicit.accepted == [] and implicit.connections == 1


def test_a_cleartext_server_on_the_implicit_port_gets_no_mail_in_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No cleartext fallback on that port: a plain server there sees a ClientHello only."""
    plain = Recorder(tls=None, starttls=False)
    monkeypatch.setattr(remote, "IMPLICIT_TLS_PORT", plain.port)
    try:
        result = _deliver(tmp_path, plain.port)
    finally:
        plain.close()
    assert result.kind == "temp" and "TLS handshake failed" in result.detail, result
    for word in (b"EHLO", b"MAIL", b"SECRET-BODY-465"):
        assert word not in bytes(plain.cleartext)
    assert plain.accepted == []


def test_port_465_is_the_implicit_one() -> None:
    """What the tests above move: RFC 8314's submissions port, IANA's 465."""
    assert remote.IMPLICIT_TLS_PORT == 465
