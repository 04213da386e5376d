"""TLS for one pyqmail-smtpd session, pumped through memory BIOs on the raw transport.

Why memory BIOs and not a second asyncio transport (``loop.start_tls``): the session keeps
one transport from the first byte to the last, so STARTTLS and implicit TLS (port 465)
take the same path, nothing the client pipelined after STARTTLS can slip past the switch
(the core drops it; every byte read after it is handshake input), and the same code runs
on asyncio's loop and uvloop's alike. The pump only moves bytes: the session decides what
a finished handshake, a failure or the client's close_notify means for the SMTP dialogue.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterable

from pyqmail import tls
from pyqmail.protocol import TLSInfo

TLS_READ = 17 * 1024  # one TLS record's plaintext at most (16 KiB) per SSLObject.read
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class TLSFailedError(Exception):
    """The handshake or the record layer failed; the text is what the log says."""


class TLSClosedError(Exception):
    """The client sent close_notify: the TLS session, and so the SMTP session, is over."""


def _why(exc: BaseException) -> TLSFailedError:
    """OpenSSL's text, or the exception's class when it has none."""
    return TLSFailedError(str(exc) or type(exc).__name__)


class TLSPump:
    """One server-side TLS session over two memory BIOs. ``write`` sends ciphertext to
    the client (the transport's ``write``); ``ack`` acknowledges what the client sent at
    once (``quick_ack``); ``timer`` is the handshake's deadline, owned here so that
    whoever ends the pump also ends the timer."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        write: Callable[[bytes], None],
        *,
        implicit: bool,
        ack: Callable[[], None] | None = None,
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.implicit = implicit  # port 465: the SMTP dialogue starts after the handshake
        self.handshaking = True
        self.timer: asyncio.TimerHandle | None = None
        self.due = False  # replies encrypted since the last flush
        self.held = False  # TLS 1.3's session tickets, waiting for the first reply
        self.ack_due = False  # a STARTTLS handshake ended and nothing of ours has left since
        self._write = write
        self._ack = ack or _nothing

    def flush(self) -> bool:
        """Whatever OpenSSL wrote (handshake records, alerts, tickets, data) to the client,
        now, in one write; False when there was nothing."""
        self.due = self.held = False
        if not self.outgoing.pending:
            return False
        self._write(self.outgoing.read())
        self.ack_due = False  # this write carries the ACK
        return True

    def flush_unless_held(self) -> None:
        """After reading: ``flush`` what OpenSSL wrote meanwhile (an alert, the refusal of a
        renegotiation, which a client may wait for), except between a TLS 1.3 handshake
        and the first reply: then everything (the session tickets, the answer to a
        KeyUpdate, neither of which a client waits for) leaves with that reply.

        A STARTTLS handshake that ended in this read with nothing written since gets its
        ACK now: after STARTTLS the client speaks first, and nothing of ours carried the
        ACK of its Finished, so a client with Nagle's algorithm on (smtplib, and any that
        does not set TCP_NODELAY) would hold its EHLO until our delayed ACK, 40 ms or
        more. Decided here, at the end of the read, not when the handshake ends: what came
        with the Finished (an EHLO, half a command line, a KeyUpdate) may or may not be
        answered in this read, and only a write tells."""
        if not self.held:
            self.flush()
        if self.ack_due:
            self.ack_due = False
            self._ack()

    def send(self, data: bytes) -> None:
        """Plaintext to the client, encrypted; it goes out at the next ``flush``. The
        session flushes once per batch of replies (``flush_replies``), so a reply and
        what OpenSSL wrote before it (TLS 1.3's session tickets) or after it (the
        close_notify that follows a 221) leave in one write: on loopback each write
        costs about as much CPU as a command's whole handling (``bench/README.md``)."""
        self.sslobj.write(data)
        self.due = True

    def flush_replies(self) -> None:
        """``flush`` if replies were sent since the last one."""
        if self.due:
            self.flush()

    def feed(self, data: bytes) -> None:
        """Ciphertext from the client, for ``handshake`` and ``read``."""
        self.incoming.write(data)

    def handshake(self) -> bool:
        """One step of the handshake: True once it is complete (the deadline is then
        cancelled), False while it needs more input; TLSFailedError if it failed."""
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self.flush()
            return False
        except (ssl.SSLError, OSError) as exc:
            raise _why(exc) from exc
        if self.sslobj.version() == "TLSv1.3":
            # The client waits for nothing now: what the server wrote are session tickets,
            # and they go out with the first reply.
            self.held = True
            wrote = False
        else:
            wrote = self.flush()  # TLS 1.2's last flight (the server's Finished), if any
        self.handshaking = False
        self.cancel_timer()
        self.ack_due = not (wrote or self.implicit)  # port 465: the greeting follows at once
        return True

    def read(self) -> bytes | None:
        """The next plaintext, None until more ciphertext comes; TLSClosedError after the
        client's close_notify, TLSFailedError on a broken record.

        CPython's ``SSLObject.read`` answers the close_notify with b"" (it raises
        SSLZeroReturnError only when our side has shut down too); that is turned into
        TLSClosedError here, so the session ends when the client says goodbye, not at the
        idle timeout of a client that keeps its TCP connection open.

        With no ciphertext left in the BIO and no plaintext left in OpenSSL (SSL_pending)
        the answer is None without asking OpenSSL, which could only raise SSLWantReadError:
        the session's read loop ends that way each time a segment's records are read, and
        the raise cost 2.2 µs more than this test (``bench/README.md``). OpenSSL keeps no
        whole record between calls: Python never turns read-ahead on, so what OpenSSL has
        not decrypted is still in the BIO."""
        if not self.incoming.pending and not self.sslobj.pending():
            return None
        try:
            data = self.sslobj.read(TLS_READ)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError as exc:
            raise TLSClosedError from exc
        except (ssl.SSLError, OSError) as exc:
            raise _why(exc) from exc
        if not data:
            raise TLSClosedError
        return data

    def info(self, tlsclients: Iterable[str]) -> TLSInfo:
        """The finished session as the core sees it; a client certificate listed in
        ``tlsclients`` (control/tlsclients) makes the client a relay client."""
        session = tls.describe(self.sslobj)
        relay_ident = tls.client_cert_relay(session, tlsclients)
        peer = session.peer_identities[0] if session.peer_identities else None
        return TLSInfo(
            version=session.version,
            cipher=session.cipher,
            bits=session.bits,
            client_cert_relay=relay_ident is not None,
            peer=relay_ident or peer,
        )

    def unwrap(self) -> None:
        """Our close_notify; we do not wait for the client's."""
        with contextlib.suppress(ssl.SSLError):
            self.sslobj.unwrap()
        self.flush()

    def cancel_timer(self) -> None:
        """No more handshake deadline (done, failed, or the connection is gone)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def drop(self) -> None:
        """The connection is gone: nothing more is written, the deadline is cancelled."""
        self.cancel_timer()
        self._write = _discard


def _discard(data: bytes) -> None:
    """Where a dropped pump's output goes."""


def _nothing() -> None:
    """No ``ack`` (a pump without a TCP socket under it: the unit tests' memory wire)."""


def tls_text(info: TLSInfo | None) -> str | None:
    """A session's TLS as its log lines name it (``version:cipher:bits``); None: plaintext."""
    return None if info is None else f"{info.version}:{info.cipher}:{info.bits}"


def quick_ack(transport: asyncio.BaseTransport) -> Callable[[], None]:
    """``ack`` for a pump on ``transport``: send the ACK that the kernel is delaying, now.

    Linux's TCP_QUICKACK sends it when one is pending (``__tcp_sock_set_quickack``), and
    with an even value puts the socket back in delayed-ACK mode once it did. With none
    pending the socket stays in quick-ACK mode until our next reply (one pure ACK more at
    worst). A closed transport (uvloop's socket then raises ValueError), a transport with
    no socket, or a kernel without the option get nothing: the client waits for the
    delayed ACK."""

    def ack() -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or _TCP_QUICKACK is None or transport.is_closing():
            return
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 2)

    return ack
