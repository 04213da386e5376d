"""The TLS pump's reads (pyqmail.smtpd.tlspump): a real OpenSSL client over memory BIOs.

``TLSPump.read`` answers None without asking OpenSSL when neither the BIO nor OpenSSL
holds anything; these tests pin what that shortcut must never change: records that
arrive together are all read, so is the first record that comes with the client's
Finished, a record cut in two is read once its second half is in, plaintext OpenSSL
still holds is read. The client's close_notify ends the session (TLSClosedError, never
None or b""), a broken record fails. TLS 1.3 and 1.2 alike. And the pump asks for an
immediate ACK exactly when a STARTTLS handshake ends with nothing written to the client.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from pyqmail import tls
from pyqmail.smtpd import tlspump
from pyqmail.smtpd.tlspump import TLSClosedError, TLSFailedError, TLSPump
from tests.conftest import PKI

VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


class Wire:
    """A pump and a client joined by hand: the client's ciphertext goes to ``pump.feed``
    only when a test says so."""

    def __init__(
        self, servercert: Path, ca: Path, version: ssl.TLSVersion, *, implicit: bool = True
    ) -> None:
        self.sent: list[bytes] = []
        self.acks: list[None] = []  # the pump's calls of ``ack``
        self.pump = TLSPump(
            tls.server_context(servercert),
            self.sent.append,
            implicit=implicit,
            ack=lambda: self.acks.append(None),
        )
        ctx = tls.client_context(cafile=ca)
        ctx.maximum_version = version
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = ctx.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")

    def to_client(self) -> None:
        self.c_in.write(b"".join(self.sent))
        self.sent.clear()

    def handshake(self, first: bytes = b"", done: Callable[[], None] | None = None) -> None:
        """Both sides' handshake; ``first``: plaintext the client writes as soon as its
        own handshake is done, fed to the pump with the client's last flight (TLS 1.3)
        or after the server's Finished (TLS 1.2, where the client finishes last).
        ``done``: what the server does in the read that ends its handshake; by default
        it sends TLS 1.3's tickets and reads nothing."""
        client_done = False
        for _ in range(6):
            if not client_done:
                with contextlib.suppress(ssl.SSLWantReadError):
                    self.client.do_handshake()
                    client_done = True
                    if first:
                        self.client.write(first)
            self.pump.feed(self.c_out.read())
            if self.pump.handshaking and self.pump.handshake():
                (done or self.pump.flush)()  # TLS 1.3's tickets, held for the first reply
            self.to_client()
            if client_done and not self.pump.handshaking:
                return
        raise AssertionError("no handshake")

    def records(self, *chunks: bytes) -> bytes:
        """The client's ciphertext for ``chunks``, one record each."""
        for chunk in chunks:
            self.client.write(chunk)
        return self.c_out.read()

    def end_of_read(self) -> None:
        """What the session does in a read: every plaintext to the core, a reply to each
        whole command line, then ``flush_unless_held``."""
        if b"".join(self.read_all()).endswith(b"\n"):
            self.pump.send(b"250 ok\r\n")
            self.pump.flush_replies()
        self.pump.flush_unless_held()

    def read_all(self) -> list[bytes]:
        out = []
        while (chunk := self.pump.read()) is not None:
            out.append(chunk)
        return out


@pytest.fixture(params=VERSIONS, ids=["tls13", "tls12"])
def raw_wire(request: pytest.FixtureRequest, pki: PKI, tmp_path: Path) -> Wire:
    cert = pki.ca.write_servercert(tmp_path / "servercert.pem", pki.server)
    return Wire(cert, pki.ca_file, request.param)


@pytest.fixture
def wire(raw_wire: Wire) -> Wire:
    raw_wire.handshake()
    return raw_wire


def test_nothing_buffered_reads_none(wire: Wire) -> None:
    assert wire.pump.read() is None
    assert wire.pump.read() is None


def test_records_that_arrive_together_are_all_read(wire: Wire) -> None:
    """A pipelining client's MAIL, RCPT and DATA, three records in one segment."""
    commands = [b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n"]
    wire.pump.feed(wire.records(*commands))
    assert wire.read_all() == commands


def test_the_first_record_behind_the_handshake_is_read(raw_wire: Wire) -> None:
    """TLS 1.3: the client's Finished and its EHLO in one feed, the handshake step
    before any read (TLS 1.2's client finishes last: its EHLO comes after)."""
    raw_wire.handshake(first=b"EHLO client.test\r\n")
    assert raw_wire.read_all() == [b"EHLO client.test\r\n"]


def test_a_record_cut_in_two_is_read_when_whole(wire: Wire) -> None:
    data = wire.records(b"EHLO client.test\r\n")
    wire.pump.feed(data[:7])
    assert wire.pump.read() is None
    wire.pump.feed(data[7:])
    assert wire.read_all() == [b"EHLO client.test\r\n"]


def test_a_large_record_is_read_in_full(wire: Wire) -> None:
    body = bytes(range(256)) * 64  # 16 KiB: one full record
    wire.pump.feed(wire.records(body))
    assert b"".join(wire.read_all()) == body


def test_plaintext_left_in_openssl_is_read(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read smaller than the record leaves the rest in OpenSSL (SSL_pending), with the
    BIO empty: it must still be read."""
    monkeypatch.setattr(tlspump, "TLS_READ", 1000)
    body = bytes(range(250)) * 20  # 5,000 bytes in one record
    wire.pump.feed(wire.records(body))
    chunks = wire.read_all()
    assert [len(c) for c in chunks] == [1000] * 5
    assert b"".join(chunks) == body


def test_close_notify_ends_the_session(wire: Wire) -> None:
    """The client's close_notify: TLSClosedError, so the session closes now; b"" or None
    would leave it open until the idle timeout of a client that keeps TCP open."""
    with contextlib.suppress(ssl.SSLWantReadError):
        wire.client.unwrap()
    wire.pump.feed(wire.c_out.read())
    with pytest.raises(TLSClosedError):
        wire.pump.read()


def test_a_broken_record_fails(wire: Wire) -> None:
    data = bytearray(wire.records(b"QUIT\r\n"))
    data[-1] ^= 0xFF  # the record's authentication tag
    wire.pump.feed(bytes(data))
    with pytest.raises(TLSFailedError):
        wire.pump.read()


# (client's maximum version, implicit TLS?, what the client sends with its Finished, acks)
ACK_CASES = {
    "tls13-starttls": (ssl.TLSVersion.TLSv1_3, False, b"", 1),  # nothing carries the ACK
    "tls13-ehlo-with-finished": (ssl.TLSVersion.TLSv1_3, False, b"EHLO c.test\r\n", 0),
    # no answer in this read: nothing else carries the ACK
    "tls13-half-a-line-with-finished": (ssl.TLSVersion.TLSv1_3, False, b"EHLO c.te", 1),
    "tls13-implicit": (ssl.TLSVersion.TLSv1_3, True, b"", 0),  # the greeting follows at once
    "tls12-full": (ssl.TLSVersion.TLSv1_2, False, b"", 0),  # our Finished ends the handshake
}


@pytest.mark.parametrize("case", ACK_CASES.values(), ids=ACK_CASES.keys())
def test_ack_only_when_a_starttls_handshake_writes_nothing(
    pki: PKI, tmp_path: Path, case: tuple[ssl.TLSVersion, bool, bytes, int]
) -> None:
    """The resumed TLS 1.2 case (the client's Finished last, ack asked) runs against the
    daemon: ``test_a_nagle_client_is_not_kept_waiting_after_the_handshake``. An EHLO that
    comes with the Finished is answered at once, and the answer carries the ACK; half a
    line is not answered, so it gets the ACK as if nothing had come."""
    version, implicit, first, acks = case
    cert = pki.ca.write_servercert(tmp_path / "servercert.pem", pki.server)
    wire = Wire(cert, pki.ca_file, version, implicit=implicit)
    wire.handshake(first, done=wire.end_of_read)
    assert len(wire.acks) == acks
