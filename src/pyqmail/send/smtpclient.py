"""The SMTP client connection remote delivery speaks through: smtplib, connecting to the
address the MX lookup chose while TLS checks the host name, with bounded replies, no
Nagle, TLS from the first byte on port 465, and a clock on every wait.

Port 465 is SMTP over implicit TLS (RFC 8314 3.3, "submissions"): a smarthost route
``relay:465`` gets the handshake before the greeting, as Postfix's
``smtp_tls_wrappermode`` and ``smtplib.SMTP_SSL`` do. There is no plaintext on that port,
so no cleartext fallback either: a server whose certificate does not verify is tried once
more without verification (``verified=no``), as with STARTTLS; a pinned relay
(``tlshosts``) must verify.

Time limits. A limit per ``recv`` (qmail-remote's ``timeoutremote`` per read, smtplib's
socket timeout) lets a server that trickles one byte at a time hold a delivery for ever: a
reply may be 64 KiB. Here every wait has a wall clock, as Postfix's
``smtp_per_request_deadline`` (3.7) has:

- the TCP connection: ``timeoutconnect``;
- the greeting and each reply: complete within ``timeoutremote`` of the command (RFC 5321
  4.5.3.2 asks for at least 5 minutes for the greeting and most replies, 10 for the end
  of DATA; qmail-remote's default, and ours, is 20);
- a TLS handshake (STARTTLS, or port 465): ``min(timeoutremote, 300)`` (Postfix's
  ``smtp_starttls_timeout``): a server that stalls it costs minutes, not twenty;
- the message after DATA: each write makes progress within ``timeoutremote`` (a slow link
  is not a dead one), and the whole of it is written within ``timeoutremote`` plus its
  size at ``MIN_DATA_RATE`` bytes a second (Postfix's ``smtp_min_data_rate``, 500);
- over all of it up to the message's last byte, ``deadline``, which remote delivery sets
  per transaction (``delivery_deadline``): a server that answers every command just in
  time, or a transaction with many recipients to a tarpit, still ends;
- the reply to the end of DATA: ``timeoutremote`` plus what is still unsent at
  ``MIN_DATA_RATE``, never cut short by ``deadline``. Once the server has the final dot it
  may already have stored the message (RFC 5321 4.5.3.2.6 gives this reply 10 minutes,
  and 6.1 warns about exactly this); giving up on its 250 defers a delivered message,
  which the retry delivers again, every retry.

A wait that runs out closes the connection and raises ``SMTPTimeoutError``, whose text
says what was waited for and which limit ended it.
"""

from __future__ import annotations

import fcntl
import io
import smtplib
import socket
import ssl
import struct
import termios
import time
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_REPLY = 64 * 1024  # bytes of one (multi-line) SMTP reply read before giving up
MAX_LINE_IN = 8192  # one reply line (smtplib's own limit)
IMPLICIT_TLS_PORT = 465
TLS_HANDSHAKE_MAX = 300.0  # seconds a TLS handshake may take at most (smtp_starttls_timeout)
MIN_DATA_RATE = 500  # bytes a second the message must at least be taken at (smtp_min_data_rate)
DEADLINE_REPLIES = 4  # full timeoutremote waits a delivery may spend beyond its message
RCPT_SHARE = 20  # each recipient beyond the first adds timeoutremote / RCPT_SHARE
QUIT_WAIT = 5.0  # seconds the QUIT reply is waited for: nothing depends on it
WRITE_CHUNK = 256 * 1024  # bytes handed to one send(): each makes progress or times out
GREETING = "the greeting"  # the names of two waits remote delivery tells apart
TLS_HANDSHAKE = "the TLS handshake"


def delivery_deadline(timeoutremote: float, size: int, recipients: int = 1) -> float:
    """Seconds one transaction may take on one connection until the message's last byte
    is written: from before the TCP connection (or, on a reused connection, from its MAIL
    or RSET). The reply to the end of DATA is waited for beyond it (``send_data``).

    ``DEADLINE_REPLIES`` whole ``timeoutremote`` waits, plus ``timeoutremote /
    RCPT_SHARE`` for each recipient beyond the first, plus the message at
    ``MIN_DATA_RATE``. An honest server answers almost every command at once and takes
    long at a few places at most (a greeting pause, the STARTTLS handshake, a content
    scan), each within ``timeoutremote``; four of them leave room for all of them. Each
    recipient may cost some seconds more: a callout verifying it (Exim's callout timeout
    is 30 s), a tarpit's or a greylister's delay. A twentieth of ``timeoutremote`` each
    (60 s at the default 1200 s) covers those, so a slow transaction with many recipients
    is not cut at every retry until it bounces; a whole ``timeoutremote`` each would let a
    tarpit hold a worker 20 minutes a recipient, which is what the deadline is there to
    stop, and a share (not a fixed number of seconds) keeps the bound meaningful when
    ``timeoutremote`` is set low. What it bounds: a tarpit that answers each command just
    before ``timeoutremote``, many recipients times a slow reply, a server taking a big
    message at a trickle. With the default ``timeoutremote``, a transaction of 1 MB to 10
    recipients may take 80 + 9 + 35 minutes until its last byte is written, and the final
    reply 20 minutes more."""
    extra = max(0, recipients - 1) * timeoutremote / RCPT_SHARE
    return DEADLINE_REPLIES * timeoutremote + extra + size / MIN_DATA_RATE


class SMTPTimeoutError(smtplib.SMTPServerDisconnected):
    """A wait that ran out of time; the connection is closed. The text says what was
    waited for and which limit ended it; ``what`` names the wait (``GREETING``, ...)."""

    def __init__(self, text: str, what: str) -> None:
        super().__init__(text)
        self.what = what


class ConnectError(OSError):
    """The TCP connection itself failed (refused, unreachable, timed out): the address,
    not the server, is the trouble (``pyqmail.send.peers`` remembers it)."""

    def __init__(self, text: str, timed_out: bool) -> None:
        super().__init__(text)
        self.timed_out = timed_out


class _TimedReader(io.RawIOBase):
    """The client's socket as a raw stream whose every ``recv`` may take only what is
    left of the current wait: a reply that trickles in still has to be complete in time."""

    def __init__(self, client: SMTPClient) -> None:
        self._client = client

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        sock = self._client.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        sock.settimeout(self._client.time_left())
        return sock.recv_into(buffer)


class SMTPClient(smtplib.SMTP):
    """smtplib connecting to a chosen address while TLS checks the host name.

    ``timeout``: seconds to connect (``timeoutconnect``); ``reply_timeout``: seconds for
    the greeting and each reply (``timeoutremote``, default ``timeout``); ``tls_timeout``:
    for a TLS handshake (default ``min(reply_timeout, TLS_HANDSHAKE_MAX)``);
    ``implicit``: a context to wrap the socket in before the greeting (port 465)."""

    def __init__(
        self,
        address: str,
        helo: str,
        timeout: float,
        implicit: ssl.SSLContext | None = None,
        *,
        reply_timeout: float | None = None,
        tls_timeout: float | None = None,
    ) -> None:
        self._address = address
        self._implicit = implicit
        self.reply_timeout = float(timeout if reply_timeout is None else reply_timeout)
        self.tls_timeout = (
            min(self.reply_timeout, TLS_HANDSHAKE_MAX) if tls_timeout is None else tls_timeout
        )
        self.deadline: float | None = None  # time.monotonic() by which the delivery ends
        self.deadline_seconds = 0.0
        self._what = "a reply"  # what the current wait is for
        self._wait = self.reply_timeout  # how long it may take
        self._until: float | None = None  # when it ends (None: nothing armed)
        super().__init__(local_hostname=helo, timeout=timeout)

    # -- the clock --------------------------------------------------------------------
    def set_deadline(self, seconds: float | None) -> None:
        """From now on, everything must be over within ``seconds`` (None: no deadline)."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.deadline_seconds = seconds or 0.0

    def _arm(self, what: str, seconds: float | None = None) -> float:
        """Start the wait for ``what``: it may take ``seconds`` (default ``reply_timeout``);
        returns when it ends."""
        self._what = what
        self._wait = self.reply_timeout if seconds is None else seconds
        self._until = until = time.monotonic() + self._wait
        return until

    def _deadline_first(self) -> bool:
        return self.deadline is not None and (self._until is None or self.deadline <= self._until)

    def time_left(self) -> float:
        """Seconds the current wait may still take; SMTPTimeoutError when none is left (the
        caller closes the connection: this runs inside the reply reader's buffer, which
        cannot be closed from within)."""
        end = self._until if self._until is not None else self._arm("a reply")
        if self.deadline is not None:
            end = min(end, self.deadline)
        left = end - time.monotonic()
        if left <= 0:
            raise self._expired()
        return left

    def _expired(self) -> SMTPTimeoutError:
        """The error of the wait that ran out."""
        if self._deadline_first():
            why = f"the delivery's deadline ({self.deadline_seconds:g} s) passed"
            return SMTPTimeoutError(f"timed out waiting for {self._what}: {why}", self._what)
        if self._what == GREETING:
            return SMTPTimeoutError(f"no greeting within {self._wait:g} s (timed out)", GREETING)
        text = f"timed out after {self._wait:g} s waiting for {self._what}"
        return SMTPTimeoutError(text, self._what)

    # -- connecting ---------------------------------------------------------------------
    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        """With TCP_NODELAY: our Finished ends a TLS 1.3 handshake, and a server writing nothing
        then (no session tickets, or tickets held for its first reply) sends nothing that
        carries its ACK, so Nagle would hold our EHLO until the server's delayed ACK (40+ ms
        on Linux). Nagle has nothing else to do here: no PIPELINING, each command waits for
        its reply, and the message is written as fast as the server takes it."""
        self._host = host  # the name STARTTLS verifies (smtplib only sets it in __init__)
        try:
            sock = socket.create_connection((self._address, port), timeout)
        except TimeoutError:
            raise ConnectError(f"timed out after {timeout:g} s", timed_out=True) from None
        except OSError as exc:
            raise ConnectError(exc.strerror or str(exc), timed_out=False) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._implicit is not None:
            sock = self._handshake(sock, self._implicit)
        self._arm(GREETING)
        return sock

    def _handshake(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        """``sock`` wrapped in TLS within ``tls_timeout`` (OpenSSL's handshake gets the
        socket timeout for the whole of it); any failure closes the connection."""
        self._arm(TLS_HANDSHAKE, self.tls_timeout)
        try:
            sock.settimeout(self.time_left())
            return context.wrap_socket(sock, server_hostname=self._host)
        except TimeoutError:
            sock.close()
            self.close()
            raise self._expired() from None
        except BaseException:
            sock.close()
            self.close()
            raise

    def start_tls(self, context: ssl.SSLContext) -> tuple[int, bytes]:
        """STARTTLS: the server's reply, and TLS is up when it is 220 (then EHLO again).
        A handshake that fails raises (``ssl.SSLCertVerificationError`` when the
        certificate did not verify) with the connection closed: the stream is neither
        TLS nor SMTP any more, so not even QUIT can follow."""
        code, reply = self.docmd("STARTTLS")
        if code != 220:
            return code, reply
        if self.sock is None:  # docmd raises when the connection is gone: not reached
            raise smtplib.SMTPServerDisconnected("connection lost at STARTTLS")
        self.sock = self._handshake(self.sock, context)
        self.file = None  # nothing read before the handshake is used after it
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False
        return code, reply

    # -- writing --------------------------------------------------------------------------
    def putcmd(self, cmd: str, args: str = "") -> None:
        """A command; its reply is waited for ``reply_timeout`` (QUIT's ``QUIT_WAIT``).
        The wait is named by the verb alone: never AUTH's credentials."""
        verb = (cmd.split(None, 1) or [""])[0].upper()
        self._arm(f"the reply to {verb}", QUIT_WAIT if verb == "QUIT" else None)
        super().putcmd(cmd, args)

    def send(self, s: bytes | str) -> None:  # type: ignore[override]
        """A command line (smtplib's ``send``) within what is left of its wait."""
        self._write(s.encode(self.command_encoding) if isinstance(s, str) else s, "")

    def send_data(self, data: bytes) -> None:
        """The message after the 354 (dot-stuffed, ending in ``.``): each write within
        ``reply_timeout``, all of it within ``reply_timeout`` + its size at
        ``MIN_DATA_RATE``; then the reply to the end of DATA is waited for.

        The last write ends when the kernel has taken the bytes, not the server: a send
        buffer of some megabytes may still be on its way over a slow link, and the server
        answers only after it has read them. The reply may take ``reply_timeout`` after
        that: the wait is ``reply_timeout`` plus what is still unsent at ``MIN_DATA_RATE``.

        That wait is not cut short by the delivery's ``deadline``, which ends here: the
        server may have stored the message as soon as it read the final dot, and a reply
        given up on defers a delivered message, whose retry duplicates it (RFC 5321 6.1;
        4.5.3.2.6 gives this reply 10 minutes). The deadline's purpose, bounding a tarpit,
        is served: everything before the last byte was under it."""
        self._arm("the server to take the message", self.reply_timeout + len(data) / MIN_DATA_RATE)
        self._write(data, "message")
        self.set_deadline(None)
        unsent = _unsent(self.sock)
        self._arm("the reply to the end of DATA", self.reply_timeout + unsent / MIN_DATA_RATE)

    def _write(self, data: bytes, label: str) -> None:
        """Every byte of ``data``, each ``send`` within ``reply_timeout`` and what is left of
        the wait. A failure closes the connection; for the message (``label``) it says how
        many bytes were written."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                left = self.time_left()
            except SMTPTimeoutError:
                raise self._write_timeout(label, sent, len(view), stalled=False) from None
            sock.settimeout(min(self.reply_timeout, left))
            try:
                sent += sock.send(view[sent : sent + WRITE_CHUNK])
            except TimeoutError:
                stalled = self.reply_timeout < left
                raise self._write_timeout(label, sent, len(view), stalled) from None
            except OSError as exc:
                self.close()
                lost = f"connection lost after {sent} of {len(view)} bytes: {exc}"
                raise smtplib.SMTPServerDisconnected(lost) from None

    def _write_timeout(self, label: str, sent: int, total: int, stalled: bool) -> SMTPTimeoutError:
        """The error of a write that ran out of time; the connection is closed."""
        self.close()
        if not label:
            return self._expired()
        if stalled:
            why = f"no progress for {self.reply_timeout:g} s"
        elif self._deadline_first():
            why = f"the delivery's deadline ({self.deadline_seconds:g} s) passed"
        else:
            rate = f"timeoutremote + {MIN_DATA_RATE} bytes/s"
            why = f"the {self._wait:g} s allowed for it ({rate}) passed"
        text = f"timed out after {sent} of {total} bytes of the {label}: {why}"
        return SMTPTimeoutError(text, label)

    # -- reading --------------------------------------------------------------------------
    def getreply(self) -> tuple[int, bytes]:
        """smtplib's reply reader with a bound on the whole reply, in bytes (``MAX_REPLY``: a
        server sending continuation lines for ever is cut off) and in time (the current
        wait: a server trickling its reply is cut off when it runs out)."""
        file = self.file
        if file is None:
            if self.sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            self.file = file = io.BufferedReader(_TimedReader(self))
        try:
            return self._read_reply(file)
        finally:
            self._until = None

    def _read_reply(self, file: BinaryIO) -> tuple[int, bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            try:
                line = file.readline(MAX_LINE_IN + 1)
            except SMTPTimeoutError:
                self.close()
                raise
            except TimeoutError:
                self.close()
                raise self._expired() from None
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"connection lost: {exc}") from None
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("connection closed by the server")
            total += len(line)
            if len(line) > MAX_LINE_IN or total > MAX_REPLY:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    f"reply line over {MAX_LINE_IN} bytes"
                    if len(line) > MAX_LINE_IN
                    else f"reply over {MAX_REPLY} bytes"
                )
            lines.append(line[4:].strip(b" \t\r\n"))
            code = line[:3]
            if not code.isdigit():
                return -1, b"\n".join(lines)
            if line[3:4] != b"-":
                return int(code), b"\n".join(lines)


def _unsent(sock: socket.socket | None) -> int:
    """Bytes written to ``sock`` that the peer has not acknowledged yet (Linux's
    ``SIOCOUTQ``); 0 when that cannot be asked."""
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return max(0, int(struct.unpack("i", raw)[0]))
