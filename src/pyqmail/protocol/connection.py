"""Sans-I/O SMTP server protocol core: bytes in, events out, no sockets, no clock of its own.

Modelled on h11: the server layer owns sockets, TLS, timers and the queue; this module owns
every decision about what the client said. Use::

    conn = SMTPConnection(policy)
    handle(conn.start())                  # greeting
    handle(conn.receive(data))            # for every read; b"" is not EOF: use connection_lost
    handle(conn.auth_result(user|None))   # after an AuthRequest
    handle(conn.message_queued(qid))      # after MessageEnd and a durable commit
    handle(conn.message_failed(reply))    # ... or when the commit failed (451 4.3.0)
    handle(conn.tls_started(info))        # after StartTLS and a good handshake

``handle`` acts on the events in order (``pyqmail.protocol.events``): write ``Send``, run the
handshake on ``StartTLS``, verify on ``AuthRequest``, stream ``MessageStart``/``MessageData``/
``MessageEnd`` into the queue, drop it on ``MessageAbort``, close on ``Close``. While the core
waits (AuthRequest, MessageEnd, StartTLS) the server should stop reading (``paused``);
input that still arrives is buffered up to ``Policy.max_pending`` (plaintext after STARTTLS
is discarded instead).

States (``State``) and which command may run in which are the explicit table ``_ALLOWED``;
everything else gets the reply in ``_OUT_OF_SEQUENCE``.

Message framing (SMTP smuggling, CVE-2023-51764/5/6): the only end of DATA is the byte
sequence ``<CR><LF>.<CR><LF>`` (the CRLF that ends the DATA command counts as the first).
The first occurrence of that sequence in the raw stream is the end, whatever came before.
A CR not followed by LF, anywhere in the message, is refused (``550 5.5.2 ... bare <CR>``,
then close). A LF not preceded by CR is refused the same way unless ``Policy.bare_lf``
(Postfix 3.9 ``smtpd_forbid_bare_newline = normalize``): then it is stored as CRLF, but it
never counts towards the end marker. Like Postfix 3.9 in reject mode the core answers at
once and closes instead of reading to the end: a client that sends bare LF most likely ends
its data with ``LF . LF`` too and would otherwise hang until the idle timeout, and nothing
after the offending byte is ever interpreted as a command.

Content refused after reading to the end (the client hears why; nothing is queued):
more than ``Policy.databytes`` (``552 5.3.4``), a NUL byte (``554 5.6.0``), more than
``Policy.maxhops`` Received/Delivered-To header lines (``554 5.4.6``, counted as the data
streams in by ``pyqmail.headers.HopCounter``, in constant memory). Lines of any length are
accepted (databytes bounds the message); pyqmail-send breaks them at 998 octets on the way out.

Pipelining (RFC 2920, Postfix 3.9 ``smtpd_forbid_unauth_pipelining``): input that arrives
before the greeting (the server delays ``start`` by its greeting pause, control/greetdelay),
or more input already buffered behind HELO, EHLO, DATA, NOOP, VRFY,
EXPN or HELP, or behind any command before EHLO advertised PIPELINING, is a protocol
synchronization error: ``554 5.5.0`` and close. STARTTLS is the exception: what follows it
in the same read is discarded (RFC 3207, CVE-2011-0411), and the client gets its 220.
Because this check looks at what one ``receive`` call delivered together, replies depend on
how input is split only when ``Policy.reject_unauth_pipelining`` is on.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime

from pyqmail.headers import HopCounter
from pyqmail.protocol import helo as protocol_helo
from pyqmail.protocol.address import (
    AddressError,
    Mailbox,
    parse_mailbox,
    parse_params,
    split_path,
)
from pyqmail.protocol.events import (
    KNOWN_MECHANISMS,
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
    StartTLS,
    TLSInfo,
)

__all__ = [
    "KNOWN_MECHANISMS",
    "AuthRejected",
    "AuthRequest",
    "Close",
    "Event",
    "MessageAbort",
    "MessageData",
    "MessageEnd",
    "MessageStart",
    "Policy",
    "ProtocolUsageError",
    "SMTPConnection",
    "Send",
    "StartTLS",
    "State",
    "TLSInfo",
]

#: Bytes of message header scanned for Message-ID (endless folding cannot cost more).
MAX_HEADER_SCAN = 64 * 1024
MAX_MESSAGE_ID = 998
MAX_HELO = protocol_helo.MAX_HELO
MAX_USERNAME = 255
_END = b"\r\n.\r\n"
# Longest suffix of a chunk that may be the start of _END: held back until more arrives.
_END_PREFIXES = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
_REPLY = re.compile(r"[2345]\d\d(?: [\x20-\x7e]*)?\Z")
_QUEUE_ID = re.compile(r"[\x21-\x7e]{1,128}\Z")

REPLY_SYNC = "554 5.5.0 Error: SMTP protocol synchronization"
REPLY_NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
REPLY_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
REPLY_NEED_TLS = "530 5.7.0 Must issue a STARTTLS command first"
REPLY_AUTH_FAILED = "535 5.7.8 Error: authentication failed"
REPLY_AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure, try again later"
REPLY_QUEUE_FAILED = "451 4.3.0 Error: queue file write error"
REPLY_TOO_BIG = "552 5.3.4 Error: message exceeds fixed size limit"
REPLY_NUL = "554 5.6.0 Error: message contains a NUL character"
REPLY_HOPS = "554 5.4.6 Error: too many hops, this message is looping"


class ProtocolUsageError(RuntimeError):
    """The server layer called the core out of turn (a bug in the caller, not the client)."""


class State(enum.Enum):
    CONNECTED = "connected"  # before start(): nothing sent yet
    GREETED = "greeted"  # greeting sent (or TLS just started): HELO/EHLO needed
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message content
    AUTH_INPUT = "auth-input"  # a 334 was sent, the client's SASL line is next
    WAIT_AUTH = "wait-auth"  # AuthRequest out, waiting for auth_result
    WAIT_QUEUE = "wait-queue"  # MessageEnd out, waiting for message_queued/failed
    WAIT_TLS = "wait-tls"  # StartTLS out, waiting for tls_started
    CLOSED = "closed"


_ANY = frozenset({State.GREETED, State.READY, State.MAIL, State.RCPT})
_SESSION = frozenset({State.READY, State.MAIL, State.RCPT})
#: The state table: the states in which each command runs.
_ALLOWED: dict[str, frozenset[State]] = {
    "HELO": _ANY,
    "EHLO": _ANY,
    "MAIL": frozenset({State.READY}),
    "RCPT": frozenset({State.MAIL, State.RCPT}),
    "DATA": frozenset({State.RCPT}),
    "STARTTLS": frozenset({State.READY}),
    "AUTH": frozenset({State.READY}),
    "RSET": _ANY,
    "NOOP": _ANY,
    "QUIT": _ANY,
    "VRFY": _ANY,
    "EXPN": _ANY,
    "HELP": _ANY,
    "BDAT": _ANY,
    "ETRN": _ANY,
    "TURN": _ANY,
}
#: Replies for a known command in a state where it may not run.
_OUT_OF_SEQUENCE: dict[tuple[str, State], str] = {
    ("MAIL", State.GREETED): REPLY_NEED_HELO,
    ("MAIL", State.MAIL): "503 5.5.1 Error: nested MAIL command",
    ("MAIL", State.RCPT): "503 5.5.1 Error: nested MAIL command",
    ("RCPT", State.GREETED): "503 5.5.1 Error: need MAIL command",
    ("RCPT", State.READY): "503 5.5.1 Error: need MAIL command",
    ("DATA", State.GREETED): "503 5.5.1 Error: need MAIL command",
    ("DATA", State.READY): "503 5.5.1 Error: need MAIL command",
    ("DATA", State.MAIL): "503 5.5.1 Error: need RCPT command",
    ("STARTTLS", State.GREETED): REPLY_NEED_HELO,
    ("STARTTLS", State.MAIL): REPLY_IN_TRANSACTION,
    ("STARTTLS", State.RCPT): REPLY_IN_TRANSACTION,
    ("AUTH", State.GREETED): REPLY_NEED_HELO,
    ("AUTH", State.MAIL): REPLY_IN_TRANSACTION,
    ("AUTH", State.RCPT): REPLY_IN_TRANSACTION,
}
#: RFC 2920 section 3.1 (+ HELO, HELP): must be the last command of a pipelined group.
_LAST_IN_GROUP = frozenset({"HELO", "EHLO", "DATA", "NOOP", "VRFY", "EXPN", "HELP", "TURN"})
_NOT_IMPLEMENTED = frozenset({"BDAT", "ETRN", "TURN", "EXPN"})
_NO_ARGS = frozenset({"DATA", "RSET", "QUIT", "STARTTLS"})
_COMMAND_STATES = _ANY | {State.AUTH_INPUT}
#: Commands that move no mail (Postfix's junk commands, plus HELP, EXPN and TURN): past
#: Policy.max_junk each one counts as an error. A repeated HELO/EHLO or RCPT (same
#: address) is counted where it happens.
_JUNK = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "ETRN", "TURN"})


def _printable(text: str, limit: int) -> str:
    """For headers: printable ASCII, no comment delimiters, bounded."""
    clean = "".join(c if " " < c <= "~" and c not in "()\\" else "?" for c in text[:limit])
    return clean or "?"


def _b64decode(text: str) -> bytes | None:
    if text == "=":
        return b""
    try:
        raw = text.encode("ascii")
        data = binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    # canonical form only: no stray padding or whitespace that strict_mode lets through
    return data if base64.b64encode(data) == raw else None


def _valid_username(name: str) -> bool:
    return (
        0 < len(name) <= MAX_USERNAME
        and ":" not in name
        and all(c.isprintable() and not c.isspace() for c in name)
    )


class SMTPConnection:
    """One SMTP session, server side. Not thread-safe; one per connection."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = State.CONNECTED
        self._inbuf = bytearray()
        self._pregreet = False
        self._discarding = False  # inside an over-long line, until its LF
        self._last_crlf = True  # the last command line ended with CRLF, not a bare LF
        self._tls: TLSInfo | None = policy.tls_info
        self._tls_active = policy.tls_active
        self._client_cert_relay = bool(policy.tls_info and policy.tls_info.client_cert_relay)
        self._helo: str | None = None
        self._esmtp = False
        self.auth_user: str | None = None
        self._errors = 0
        self._junk = 0  # junk commands since the last queued message (Policy.max_junk)
        self._auth_failures = 0
        self._shutting_down = False
        # SASL exchange in progress
        self._auth_mech = ""
        self._auth_username = ""
        self._auth_challenge = ""
        # transaction
        self._sender: Mailbox | None = None
        self._params: dict[str, str] = {}
        self._recipients: list[str] = []
        self._rcpt_attempted = False
        # DATA
        self._data_pending = b""  # raw bytes that may start the end marker
        self._after_crlf = True  # raw stream position follows a CRLF (end marker may start)
        self._line_start = True  # for dot-unstuffing
        self._size = 0
        self._client_size = 0
        self._refused: str | None = None  # final reply of a message already aborted
        self._hops = HopCounter()
        self._headers: bytearray | None = None
        self._headers_done = True

    # ----- public properties -----------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while the core waits for the server: stop reading from the socket."""
        return self.state in (State.WAIT_AUTH, State.WAIT_QUEUE, State.WAIT_TLS)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def helo(self) -> str | None:
        return self._helo

    @property
    def tls(self) -> TLSInfo | None:
        return self._tls

    @property
    def buffered(self) -> int:
        """Bytes held in the core's buffers (bounded by the policy's limits)."""
        return len(self._inbuf) + len(self._data_pending) + len(self._headers or b"")

    # ----- server entry points ---------------------------------------------------------

    def start(self) -> list[Event]:
        """The greeting. Input received before this call is a pre-greeting violation."""
        self._require(State.CONNECTED, "start")
        out: list[Event] = []
        if self._pregreet and self.policy.reject_unauth_pipelining:
            self._close(out, REPLY_SYNC)
            return out
        self.state = State.GREETED
        self._reply(out, f"220 {self.policy.greeting}")
        self._run(out)
        return _coalesce(out)

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the client; returns what to do about them."""
        state = self.state
        if state is State.CLOSED or state is State.WAIT_TLS or not data:
            return []
        out: list[Event] = []
        if state is State.CONNECTED or self.paused:
            self._pregreet = self._pregreet or state is State.CONNECTED
            if len(self._inbuf) + len(data) > self.policy.max_pending:
                self._close(out, "421 4.7.0 Error: too much pipelined input")
                return out
            self._inbuf += data
            return out
        if state is State.DATA and not self._inbuf:
            rest = self._data_feed(data, out)
            if rest is None:
                return _coalesce(out)
            self._inbuf += rest
        else:
            self._inbuf += data
        self._run(out)
        return _coalesce(out)

    def auth_result(self, user: str | None, *, temporary: bool = False) -> list[Event]:
        """The verdict on the last AuthRequest: the canonical user name, or None; with
        ``temporary`` the server could not decide now (busy): 454, not a failure."""
        self._require(State.WAIT_AUTH, "auth_result")
        out: list[Event] = []
        self.state = State.READY
        if temporary:
            self._reply(out, REPLY_AUTH_TEMPFAIL)
        elif user is not None and _valid_username(user):
            self.auth_user = user
            self._reply(out, "235 2.7.0 Authentication successful")
        else:
            self._auth_failed(out)
        self._run(out)
        return _coalesce(out)

    def message_queued(self, queue_id: str) -> list[Event]:
        """The message after the last MessageEnd is on stable storage."""
        self._require(State.WAIT_QUEUE, "message_queued")
        if not _QUEUE_ID.match(queue_id):
            raise ProtocolUsageError(f"queue id must be printable ASCII: {queue_id!r}")
        out: list[Event] = []
        self._reset_transaction()
        self._junk = 0  # Postfix: "reset after mail is delivered"
        self.state = State.READY
        self._reply(out, f"250 2.0.0 Ok: queued as {queue_id}")
        self._run(out)
        return _coalesce(out)

    def message_failed(self, reply: str = REPLY_QUEUE_FAILED) -> list[Event]:
        """The commit failed: nothing was queued. ``reply`` is one 4xx/5xx reply line."""
        self._require(State.WAIT_QUEUE, "message_failed")
        if not _REPLY.match(reply) or reply[0] not in "45":
            raise ProtocolUsageError(f"not a 4xx/5xx SMTP reply line: {reply!r}")
        out: list[Event] = []
        self._reset_transaction()
        self.state = State.READY
        self._reply(out, reply)
        self._run(out)
        return _coalesce(out)

    def tls_started(self, info: TLSInfo) -> list[Event]:
        """The handshake after StartTLS succeeded: forget everything (RFC 3207 4.2)."""
        self._require(State.WAIT_TLS, "tls_started")
        self._inbuf.clear()
        self._tls = info
        self._tls_active = True
        self._client_cert_relay = info.client_cert_relay
        self._helo = None
        self._esmtp = False
        self.auth_user = None
        self._reset_transaction()
        self.state = State.GREETED
        return []

    def set_client_cert_relay(self, ok: bool) -> None:
        """Grant or withdraw relaying for a verified, listed client certificate."""
        self._client_cert_relay = ok

    def timeout(self) -> list[Event]:
        """The server's idle timer fired."""
        if self.state is State.CLOSED:
            return []
        out: list[Event] = []
        if self.state is State.DATA and self._refused is None:  # else already aborted
            out.append(MessageAbort("timeout"))
        self._close(out, f"421 4.4.2 {self.policy.hostname} Error: timeout exceeded")
        return out

    def shutdown(self) -> list[Event]:
        """The server is stopping: 421 now if idle, else at the next command boundary."""
        self._shutting_down = True
        out: list[Event] = []
        if self.state in _COMMAND_STATES and not self._inbuf:
            self._close(out, self._shutdown_reply())
        return out

    def connection_lost(self) -> list[Event]:
        """The client went away; aborts a message being received."""
        out: list[Event] = []
        if self.state is State.DATA and self._refused is None:  # else already aborted
            out.append(MessageAbort("connection lost"))
        self.state = State.CLOSED
        self._inbuf.clear()
        return out

    # ----- internals: plumbing ---------------------------------------------------------

    def _require(self, state: State, what: str) -> None:
        if self.state is not state:
            raise ProtocolUsageError(f"{what}() called in state {self.state.value}")

    def _reply(self, out: list[Event], line: str) -> None:
        out.append(Send(line.encode("utf-8") + b"\r\n"))

    def _error(self, out: list[Event], line: str) -> None:
        self._errors += 1
        self._reply(out, line)

    def _close(self, out: list[Event], line: str) -> None:
        self._reply(out, line)
        out.append(Close())
        self.state = State.CLOSED
        self._inbuf.clear()

    def _shutdown_reply(self) -> str:
        return f"421 4.3.2 {self.policy.hostname} Service shutting down, closing channel"

    def _reset_transaction(self) -> None:
        self._sender = None
        self._params = {}
        self._recipients = []
        self._rcpt_attempted = False
        self._headers = None

    def _run(self, out: list[Event]) -> None:
        """Process buffered input until it runs out or the core must wait."""
        while True:
            state = self.state
            if state is State.DATA:
                if not self._inbuf:
                    return
                chunk = bytes(self._inbuf)
                self._inbuf.clear()
                rest = self._data_feed(chunk, out)
                if rest is not None:
                    self._inbuf += rest
                continue
            if state not in _COMMAND_STATES:
                return
            if self._shutting_down and not self._discarding:
                self._close(out, self._shutdown_reply())
                return
            end = self._inbuf.find(b"\n")
            if end < 0:
                if len(self._inbuf) > self.policy.max_line:
                    self._inbuf.clear()
                    self._discarding = True
                return
            line = bytes(self._inbuf[: end + 1])
            del self._inbuf[: end + 1]
            if self._discarding or len(line) > self.policy.max_line:
                self._discarding = False
                if state is State.AUTH_INPUT:
                    self.state = State.READY
                    self._auth_rejected(out, "500 5.5.2 Error: line too long", "too-long")
                else:
                    self._error(out, "500 5.5.2 Error: line too long")
                continue
            if line.endswith(b"\r\n"):
                line = line[:-2]
                self._last_crlf = True
            elif self.policy.bare_lf:
                line = line[:-1]
                self._last_crlf = False
            else:
                self._close(out, f"550 5.5.2 {self.policy.hostname} Error: bare <LF> received")
                return
            if state is State.AUTH_INPUT:
                self._auth_input(line, out)
            else:
                self._command(line, out)

    # ----- commands --------------------------------------------------------------------

    def _command(self, raw: bytes, out: list[Event]) -> None:
        if self._errors >= self.policy.max_errors or (
            self._auth_failures >= self.policy.max_auth_failures
        ):
            self._close(out, f"421 4.7.0 {self.policy.hostname} Error: too many errors")
            return
        if b"\r" in raw or b"\0" in raw:
            self._error(out, "501 5.5.2 Syntax error: CR or NUL in command")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(out, "500 5.5.2 Error: command is not valid UTF-8")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._error(out, "502 5.5.2 Error: command not recognized")
            return
        if self.policy.reject_unauth_pipelining and self._inbuf and verb != "QUIT":
            if verb == "STARTTLS":
                pass  # its pipelined tail is discarded below, never executed
            elif verb in _LAST_IN_GROUP or not self._esmtp:
                self._close(out, REPLY_SYNC)
                return
        if self.state not in _ALLOWED[verb]:
            if verb == "DATA" and self.state is State.MAIL and self._rcpt_attempted:
                self._error(out, "554 5.5.1 Error: no valid recipients")
            else:
                self._error(out, _OUT_OF_SEQUENCE[verb, self.state])
            return
        if verb in _NO_ARGS and arg.strip():
            self._error(out, f"501 5.5.4 Syntax: {verb}")
            return
        if verb in _JUNK:
            self._count_junk()
        handler(self, arg, out)

    def _count_junk(self) -> None:
        """One more command that moves no mail; past the limit it is also an error."""
        self._junk += 1
        limit = self.policy.max_junk
        if limit and self._junk > limit:
            if self._junk == limit + 1:
                self.policy.notice("junk-limit", f"more than {limit} junk commands")
            self._errors += 1

    def _cmd_helo(self, arg: str, out: list[Event], *, esmtp: bool = False) -> None:
        name = arg.strip(" ")
        verb = "EHLO" if esmtp else "HELO"
        if not name:
            self._error(out, f"501 5.5.4 Syntax: {verb} hostname")
            return
        why = protocol_helo.refusal(name)
        if why is not None:
            self.policy.notice("helo-refused", f"{verb} {name[:MAX_HELO]!r}: {why}")
            self._error(out, f"501 5.5.4 Error: invalid {verb} hostname")
            return
        if self._helo is not None:
            self._count_junk()  # a second HELO/EHLO in the same TLS state moves no mail
        self._reset_transaction()
        self._helo = name
        self._esmtp = esmtp
        self.state = State.READY
        if not esmtp:
            self._reply(out, f"250 {self.policy.hostname}")
            return
        lines = [self.policy.hostname, "PIPELINING"]
        lines.append(f"SIZE {self.policy.databytes}" if self.policy.databytes else "SIZE")
        if self.policy.starttls_available and not self._tls_active:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(self.policy.auth_mechanisms))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        out.append(Send(text.encode("ascii", "replace")))

    def _cmd_ehlo(self, arg: str, out: list[Event]) -> None:
        self._cmd_helo(arg, out, esmtp=True)

    def _auth_offered(self) -> bool:
        return bool(self.policy.auth_mechanisms) and (self._tls_active or not self.policy.force_tls)

    def _may_relay(self) -> bool:
        return self.policy.relay_client or self.auth_user is not None or self._client_cert_relay

    def _cmd_mail(self, arg: str, out: list[Event]) -> None:
        if self.policy.force_tls and not self._tls_active:
            self._error(out, REPLY_NEED_TLS)
            return
        if self.policy.auth_required and not self._may_relay():
            self._error(out, "530 5.7.0 Authentication required")
            return
        try:
            path, ptext = split_path(arg, "FROM:", "5.1.7")
            params = self._mail_params(ptext)
            sender = parse_mailbox(path, "5.1.7", utf8="SMTPUTF8" in params, allow_null=True)
        except AddressError as exc:
            self._error(out, exc.reply)
            return
        self._sender = sender
        self._params = params
        self._recipients = []
        self._rcpt_attempted = False
        self.state = State.MAIL
        self._reply(out, "250 2.1.0 Ok")

    def _mail_params(self, text: str) -> dict[str, str]:
        params: dict[str, str] = {}
        for key, value in parse_params(text):
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 15:
                    raise AddressError("555 5.5.4 Bad SIZE parameter")
                if self.policy.databytes and int(value) > self.policy.databytes:
                    raise AddressError("552 5.3.4 Message size exceeds fixed limit")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise AddressError("555 5.5.4 Unsupported BODY parameter")
                params[key] = value.upper()
                continue
            elif key == "SMTPUTF8":
                if value is not None:
                    raise AddressError("555 5.5.4 SMTPUTF8 takes no value")
            elif key == "AUTH":
                if value is None or len(value) > 500:
                    raise AddressError("555 5.5.4 Bad AUTH parameter")
            else:
                raise AddressError(f"555 5.5.4 Unsupported option: {key[:40]}")
            params[key] = value or ""
        return params

    def _cmd_rcpt(self, arg: str, out: list[Event]) -> None:
        self._rcpt_attempted = True
        limit = self.policy.maxrcpt or self.policy.hard_max_recipients
        limit = min(limit, self.policy.hard_max_recipients)
        try:
            path, ptext = split_path(arg, "TO:", "5.1.3")
            _reject_params(ptext)  # no RCPT extension (DSN) is offered
            box = parse_mailbox(path, "5.1.3", utf8="SMTPUTF8" in self._params, allow_null=False)
        except AddressError as exc:
            self._error(out, exc.reply)
            return
        if box.domain == "":  # bare <postmaster>, RFC 5321 4.5.1
            box = Mailbox(f"postmaster@{self.policy.hostname.lower()}", "postmaster", "")
        elif "%" in box.local or "!" in box.local:
            self._error(out, "553 5.1.3 sorry, '%' and '!' are not accepted in recipients")
            return
        local_domain = box.domain == "" or self.policy.rcpthosts(box.domain)
        if not local_domain and not self._may_relay():
            self._error(out, "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts")
            return
        check = self.policy.validrcptto
        if local_domain and box.domain and check is not None and not check(box.address):
            self._error(out, "550 5.1.1 sorry, no mailbox here by that name")
            return
        if box.address in self._recipients:
            self._count_junk()
            self._reply(out, "250 2.1.5 Ok")
            return
        if len(self._recipients) >= limit:
            # neither an error nor junk: a long list (a pipelining MTA sends every RCPT
            # before it reads a 452) must not end the session before its DATA
            self._reply(out, "452 4.5.3 Error: too many recipients")
            return
        self._recipients.append(box.address)
        self.state = State.RCPT
        self._reply(out, "250 2.1.5 Ok")

    def _cmd_data(self, _arg: str, out: list[Event]) -> None:
        sender = self._sender
        if sender is None:  # unreachable by the state table; keeps mypy honest
            self._error(out, "503 5.5.1 Error: need MAIL command")
            return
        self.state = State.DATA
        self._reply(out, "354 End data with <CR><LF>.<CR><LF>")
        self._data_pending = b""
        self._after_crlf = self._last_crlf  # DATA's own CRLF starts the end marker
        self._line_start = True
        self._size = 0
        self._client_size = 0
        self._refused = None
        self._hops = HopCounter()
        self._headers = bytearray()
        self._headers_done = False
        protocol = self._protocol_name()
        out.append(
            MessageStart(
                sender=sender.address,
                recipients=tuple(self._recipients),
                params=dict(self._params),
                helo=self._helo or "",
                auth_user=self.auth_user,
                tls=self._tls if self._tls_active else None,
                protocol=protocol,
            )
        )
        header = self._received_header(protocol)
        self._size = len(header)
        out.append(MessageData(header))

    def _protocol_name(self) -> str:
        if not self._esmtp:
            return "SMTP"
        name = "UTF8SMTP" if "SMTPUTF8" in self._params else "ESMTP"
        return name + ("S" if self._tls_active else "") + ("A" if self.auth_user else "")

    def _received_header(self, protocol: str) -> bytes:
        p = self.policy
        host = _printable(p.client_host, 255) if p.client_host else "unknown"
        lines = [
            f"Received: from {_printable(self._helo or '', MAX_HELO)} ({host} [{p.client_ip}])"
        ]
        if self._tls_active:
            if self._tls is not None:
                tls = self._tls
                bits = f" ({tls.bits} bits)" if tls.bits else ""
                version, cipher = _printable(tls.version, 50), _printable(tls.cipher, 100)
                lines.append(f"\t(using {version} with cipher {cipher}{bits})")
            else:
                lines.append("\t(using TLS)")
        if self.auth_user and p.auth_header:
            lines.append(f"\t(authenticated user: {_printable(self.auth_user, MAX_USERNAME)})")
        lines.append(f"\tby {p.hostname} (pyqmail) with {protocol};")
        lines.append(f"\t{_rfc5322_date(p.clock())}")
        return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")

    def _cmd_rset(self, _arg: str, out: list[Event]) -> None:
        self._reset_transaction()
        if self.state in (State.MAIL, State.RCPT):
            self.state = State.READY
        self._reply(out, "250 2.0.0 Ok")

    def _cmd_noop(self, _arg: str, out: list[Event]) -> None:
        self._reply(out, "250 2.0.0 Ok")

    def _cmd_quit(self, _arg: str, out: list[Event]) -> None:
        self._close(out, f"221 2.0.0 {self.policy.hostname} Bye")

    def _cmd_vrfy(self, _arg: str, out: list[Event]) -> None:
        self._reply(out, "252 2.0.0 Send some mail, I'll try my best")

    def _cmd_help(self, _arg: str, out: list[Event]) -> None:
        self._reply(
            out,
            "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
        )

    def _cmd_not_implemented(self, _arg: str, out: list[Event]) -> None:
        self._error(out, "502 5.5.1 Error: command not implemented")

    def _cmd_starttls(self, _arg: str, out: list[Event]) -> None:
        if self._tls_active:
            self._error(out, "503 5.5.1 Error: TLS already active")
            return
        if not self.policy.starttls_available:
            self._error(out, "502 5.5.1 Error: command not implemented")
            return
        self._inbuf.clear()  # CVE-2011-0411: pipelined plaintext is never executed
        self._reply(out, "220 2.0.0 Ready to start TLS")
        out.append(StartTLS())
        self.state = State.WAIT_TLS

    # ----- AUTH ------------------------------------------------------------------------

    def _cmd_auth(self, arg: str, out: list[Event]) -> None:
        if not self.policy.auth_mechanisms:
            self._error(out, "503 5.5.1 Error: authentication not enabled")
            return
        if self.policy.force_tls and not self._tls_active:
            self._error(out, REPLY_NEED_TLS)
            return
        if self.auth_user is not None:
            self._error(out, "503 5.5.1 Error: already authenticated")
            return
        words = arg.split(" ")
        mech = words[0].upper()
        if not mech or len(words) > 2:
            self._error(out, "501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        if mech not in self.policy.auth_mechanisms:
            self._error(out, "504 5.5.4 Error: unsupported authentication mechanism")
            return
        initial = words[1] if len(words) == 2 else None
        self._auth_mech = mech
        self._auth_username = ""
        if mech == "CRAM-MD5":
            if initial is not None:
                self._error(out, "501 5.5.4 Error: CRAM-MD5 takes no initial response")
                return
            stamp = int(self.policy.clock() * 1000)
            self._auth_challenge = f"<{secrets.token_hex(8)}.{stamp}@{self.policy.hostname}>"
            self._challenge(out, self._auth_challenge.encode())
        elif initial is None:
            self._challenge(out, b"" if mech == "PLAIN" else b"Username:")
        else:
            self._auth_step(initial, out)

    def _challenge(self, out: list[Event], text: bytes) -> None:
        self.state = State.AUTH_INPUT
        self._reply(out, "334 " + base64.b64encode(text).decode("ascii"))

    def _auth_input(self, raw: bytes, out: list[Event]) -> None:
        self.state = State.READY
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            self._auth_rejected(out, "501 5.5.2 Error: cannot decode response", "bad-base64")
            return
        if text == "*":
            self._auth_rejected(out, "501 5.7.0 Error: authentication aborted", "aborted")
            return
        self._auth_step(text, out)

    def _auth_step(self, response: str, out: list[Event]) -> None:
        data = _b64decode(response)
        if data is None:
            self._auth_rejected(out, "501 5.5.2 Error: cannot decode response", "bad-base64")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._auth_rejected(out, "501 5.5.2 Error: response is not UTF-8", "bad-utf8")
            return
        mech = self._auth_mech
        if mech == "PLAIN":
            parts = text.split("\0")
            if len(parts) != 3:
                self._auth_rejected(out, "501 5.5.2 Error: malformed PLAIN response", "malformed")
                return
            authzid, user, password = parts
            if authzid and authzid != user:
                self._auth_rejected(out, REPLY_AUTH_FAILED, "authzid", user)
                return
            self._request(out, AuthRequest("PLAIN", user, password=password))
        elif mech == "LOGIN":
            if not self._auth_username:
                if not text:
                    self._auth_rejected(out, "501 5.5.2 Error: empty user name", "bad-name")
                    return
                self._auth_username = text
                self._challenge(out, b"Password:")
                return
            self._request(out, AuthRequest("LOGIN", self._auth_username, password=text))
        else:
            user, _, digest = text.rpartition(" ")
            if not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
                self._auth_rejected(
                    out, "501 5.5.2 Error: malformed CRAM-MD5 response", "malformed"
                )
                return
            self._request(
                out,
                AuthRequest(
                    "CRAM-MD5", user, challenge=self._auth_challenge, response=digest.lower()
                ),
            )

    def _request(self, out: list[Event], request: AuthRequest) -> None:
        if not _valid_username(request.username):
            # same answer as a wrong password: no user probing
            self._auth_rejected(out, REPLY_AUTH_FAILED, "bad-name", request.username)
            return
        self.state = State.WAIT_AUTH
        out.append(request)

    def _auth_failed(self, out: list[Event]) -> None:
        self._auth_failures += 1
        self._error(out, REPLY_AUTH_FAILED)

    def _auth_rejected(
        self, out: list[Event], reply: str, reason: str, user: str | None = None
    ) -> None:
        """An attempt refused here, not by the server: answered, and reported for the log."""
        if reply == REPLY_AUTH_FAILED:
            self._auth_failures += 1
        self._error(out, reply)
        out.append(AuthRejected(self._auth_mech, user or self._auth_username or None, reason))

    # ----- DATA ------------------------------------------------------------------------

    def _data_feed(self, chunk: bytes, out: list[Event]) -> bytes | None:
        """Consume message bytes; returns the input after the end marker, or None."""
        buf = self._data_pending + chunk if self._data_pending else chunk
        end = -1
        if self._after_crlf and buf.startswith(b".\r\n"):
            end = 0
        else:
            idx = buf.find(_END)
            if idx >= 0:
                end = idx + 2
        if end >= 0:
            self._data_pending = b""
            if end and not self._transform(buf[:end], out):
                return None
            self._finish_message(out)
            return buf[end + 3 :]
        hold = 0
        if self._after_crlf and len(buf) < 3 and b".\r\n".startswith(buf):
            hold = len(buf)
        else:
            for prefix in _END_PREFIXES:
                if buf.endswith(prefix):
                    hold = len(prefix)
                    break
        part = buf[: len(buf) - hold]
        self._data_pending = buf[len(buf) - hold :]
        if part:
            if not self._transform(part, out):
                return None
            self._after_crlf = part.endswith(b"\r\n")
        return None

    def _transform(self, raw: bytes, out: list[Event]) -> bool:
        """Check and unstuff one complete stretch of content; False if the session ended."""
        crlf = raw.count(b"\r\n")
        bare = None
        if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:  # C-speed pre-check
            bare = _BARE.search(raw)
        if bare is not None:
            if self.policy.bare_lf and bare.group() == b"\n":
                bare = _BARE_CR.search(raw, bare.end()) or bare
            if bare.group() == b"\r" or not self.policy.bare_lf:
                what = "CR" if bare.group() == b"\r" else "LF"
                if self._refused is None:
                    out.append(MessageAbort(f"bare {what} in message"))
                self._close(out, f"550 5.5.2 {self.policy.hostname} Error: bare <{what}> received")
                return False
            raw = _BARE_LF.sub(b"\r\n", raw)
        line_start = self._line_start
        self._line_start = raw.endswith(b"\n")
        if line_start and raw.startswith(b"."):
            raw = raw[1:]
        if b"\n." in raw:
            raw = raw.replace(b"\n.", b"\n")
        if not raw:
            return True
        self._client_size += len(raw)
        if not self._headers_done:
            self._collect_headers(raw)
        if self._refused is not None:
            return True
        refusal = self._content_refusal(raw)
        if refusal is not None:
            self._refused = refusal[1]
            out.append(MessageAbort(refusal[0]))
            return True
        self._size += len(raw)
        out.append(MessageData(raw))
        return True

    def _content_refusal(self, raw: bytes) -> tuple[str, str] | None:
        """(abort reason, reply at end of DATA) once the message cannot be accepted; the
        rest of it is read and dropped, so the client hears the reason (RFC 5321 §4.1.1.4)."""
        if self.policy.databytes and self._client_size > self.policy.databytes:
            return "message exceeds databytes", REPLY_TOO_BIG
        if b"\0" in raw:  # RFC 5322 §2.2/3.5 and RFC 5321 §4.5.2: no NUL in a message
            return "NUL character in message", REPLY_NUL
        hops = self._hops
        if not hops.done:
            hops.feed(raw)
            if hops.hops > self.policy.maxhops:
                return f"more than {self.policy.maxhops} hops", REPLY_HOPS
        return None

    def _collect_headers(self, raw: bytes) -> None:
        """Keep the header block (bounded) for the Message-ID; stop at the empty line."""
        headers = self._headers
        if headers is None:
            self._headers_done = True
            return
        old = len(headers)
        headers += raw[: MAX_HEADER_SCAN - old]
        end = -2 if headers.startswith(b"\r\n") else headers.find(b"\r\n\r\n", max(0, old - 3))
        if end != -1:
            del headers[end + 2 :]
            self._headers_done = True
        elif len(headers) >= MAX_HEADER_SCAN:
            self._headers_done = True

    def _finish_message(self, out: list[Event]) -> None:
        self._after_crlf = True
        self._line_start = True
        if self._refused is not None:
            self._reset_transaction()
            self.state = State.READY
            self._error(out, self._refused)
            return
        message_id = _message_id(self._headers or b"")
        self._headers = None
        self.state = State.WAIT_QUEUE
        out.append(MessageEnd(self._size, message_id))


def _reject_params(text: str) -> None:
    params = parse_params(text)
    if params:
        raise AddressError(f"555 5.5.4 Unsupported option: {params[0][0][:40]}")


_date_cache: tuple[int, str] = (-1, "")


def _rfc5322_date(when: float) -> str:
    """``format_datetime`` of the whole second, computed once per second (hot path)."""
    global _date_cache  # noqa: PLW0603 - a one-entry cache
    second = int(when)
    if _date_cache[0] != second:
        _date_cache = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _date_cache[1]


def _message_id(block: bytes | bytearray) -> str | None:
    """The Message-ID field of a header block (CRLF lines, no empty line), bounded."""
    low = bytes(block).lower()
    pos = 0
    while (pos := low.find(b"message-id", pos)) >= 0:
        colon = pos + len(b"message-id")
        while low[colon : colon + 1] in (b" ", b"\t"):
            colon += 1
        if (pos == 0 or low[pos - 1] == 0x0A) and low[colon : colon + 1] == b":":
            end = low.find(b"\r\n", colon)
            while end >= 0 and low[end + 2 : end + 3] in (b" ", b"\t"):  # folded
                end = low.find(b"\r\n", end + 2)
            value = bytes(block[colon + 1 : len(low) if end < 0 else end])
            value = value.replace(b"\r\n", b"").strip(b" \t")[:MAX_MESSAGE_ID]
            return "".join(chr(b) if 0x20 < b < 0x7F else "?" for b in value) or None
        pos += 1
    return None


def _coalesce(events: list[Event]) -> list[Event]:
    """Merge adjacent Sends so a pipelined group's replies leave in one write."""
    if len(events) < 2:
        return events
    merged: list[Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, Send) and isinstance(last, Send):
            merged[-1] = Send(last.data + event.data)
        else:
            merged.append(event)
    return merged


_Handler = Callable[[SMTPConnection, str, list[Event]], None]
_HANDLERS: dict[str, _Handler] = {
    "HELO": SMTPConnection._cmd_helo,
    "EHLO": SMTPConnection._cmd_ehlo,
    "MAIL": SMTPConnection._cmd_mail,
    "RCPT": SMTPConnection._cmd_rcpt,
    "DATA": SMTPConnection._cmd_data,
    "RSET": SMTPConnection._cmd_rset,
    "NOOP": SMTPConnection._cmd_noop,
    "QUIT": SMTPConnection._cmd_quit,
    "VRFY": SMTPConnection._cmd_vrfy,
    "HELP": SMTPConnection._cmd_help,
    "STARTTLS": SMTPConnection._cmd_starttls,
    "AUTH": SMTPConnection._cmd_auth,
    "EXPN": SMTPConnection._cmd_not_implemented,
    "BDAT": SMTPConnection._cmd_not_implemented,
    "ETRN": SMTPConnection._cmd_not_implemented,
    "TURN": SMTPConnection._cmd_not_implemented,
}
