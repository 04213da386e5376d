"""The TLS pump's reads (pyqmail.smtpd.tlspump): a real OpenSSL client over memory BIOs.

``TLSPump.read`` answers None without asking OpenSSL when neither the BIO nor OpenSSL
holds anything; these tests pin what that shortcut must never change: records that
arrive together are all read, a record cut in two is read once its second half is in,
the client's close_notify still reads as the end, a broken record still fails.
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest

from pyqmail import tls
from pyqmail.smtpd.tlspump import TLSClosedError, TLSFailedError, TLSPump
from tests.conftest import PKI


class Wire:
    """A pump and a client joined by hand: ``to_server`` carries what the client wrote."""

    def __init__(self, servercert: Path, ca: Path) -> None:
        self.sent: list[bytes] = []
        self.pump = TLSPump(tls.server_context(servercert), self.sent.append, implicit=True)
        ctx = tls.client_context(cafile=ca)
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = ctx.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")

    def to_client(self) -> None:
        self.c_in.write(b"".join(self.sent))
        self.sent.clear()

    def handshake(self) -> None:
        for _ in range(5):
            with contextlib.suppress(ssl.SSLWantReadError):
                self.client.do_handshake()
            self.pump.feed(self.c_out.read())
            if self.pump.handshaking and self.pump.handshake():
                return
            self.to_client()
        raise AssertionError("no handshake")

    def records(self, *chunks: bytes) -> bytes:
        """The client's ciphertext for ``chunks``, one record each."""
        for chunk in chunks:
            self.client.write(chunk)
        return self.c_out.read()

    def read_all(self) -> list[bytes]:
        out = []
        while (chunk := self.pump.read()) is not None:
            out.append(chunk)
        return out


@pytest.fixture
def wire(pki: PKI, tmp_path: Path) -> Wire:
    w = Wire(pki.ca.write_servercert(tmp_path / "servercert.pem", pki.server), pki.ca_file)
    w.handshake()
    return w


def test_nothing_buffered_reads_none(wire: Wire) -> None:
    assert wire.pump.read() is None
    assert wire.pump.read() is None


def test_records_that_arrive_together_are_all_read(wire: Wire) -> None:
    """A pipelining client's MAIL, RCPT and DATA, three records in one segment."""
    commands = [b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n"]
    wire.pump.feed(wire.records(*commands))
    assert wire.read_all() == commands


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


def test_close_notify_reads_as_the_end(wire: Wire) -> None:
    """The client's close_notify: b"" (or TLSClosedError), never None, which would leave
    the session waiting for a client that has said goodbye."""
    with contextlib.suppress(ssl.SSLWantReadError):
        wire.client.unwrap()
    wire.pump.feed(wire.c_out.read())
    with contextlib.suppress(TLSClosedError):
        assert wire.pump.read() == b""


def test_a_broken_record_fails(wire: Wire) -> None:
    data = bytearray(wire.records(b"QUIT\r\n"))
    data[-1] ^= 0xFF  # the record's authentication tag
    wire.pump.feed(bytes(data))
    with pytest.raises(TLSFailedError):
        wire.pump.read()
