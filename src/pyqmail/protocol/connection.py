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

The states, the transition table and which command and reader run in which state are in
``states``; every state change goes through ``SMTPConnection._enter``. The package docstring
says which module owns each other part: input framing and pipelining rules (``lines``), the
DATA reader (``data``), SASL (``sasl``), MAIL/RCPT decisions (``envelope``), the client's
identity (``client``), the Received header (``received``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from pyqmail.protocol import helo as protocol_helo
from pyqmail.protocol import sasl
from pyqmail.protocol.address import AddressError
from pyqmail.protocol.client import Client
from pyqmail.protocol.data import Broken, DataReader
from pyqmail.protocol.envelope import Transaction, parse_mail, parse_rcpt
from pyqmail.protocol.events import (
    AuthRequest,
    Close,
    Event,
    MessageAbort,
    MessageData,
    MessageStart,
    Policy,
    Send,
    StartTLS,
    TLSInfo,
    coalesce,
)
from pyqmail.protocol.lines import InputBuffer, LineError, out_of_sync
from pyqmail.protocol.received import protocol_name, received_header
from pyqmail.protocol.states import (
    ALLOWED,
    INITIAL,
    INPUT,
    LINE_STATES,
    OUT_OF_SEQUENCE,
    REPLY_NEED_MAIL,
    TRANSITIONS,
    WAITING,
    Input,
    State,
    TransitionError,
)
from pyqmail.protocol.tally import REPLY_TOO_MANY_RCPTS, Tally

__all__ = ["ProtocolUsageError", "SMTPConnection"]

T = TypeVar("T")

_REPLY = re.compile(r"[2345]\d\d(?: [\x20-\x7e]*)?\Z")
_QUEUE_ID = re.compile(r"[\x21-\x7e]{1,128}\Z")

REPLY_HELP = "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
REPLY_SYNC = "554 5.5.0 Error: SMTP protocol synchronization"
REPLY_NEED_TLS = "530 5.7.0 Must issue a STARTTLS command first"
REPLY_AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure, try again later"
REPLY_QUEUE_FAILED = "451 4.3.0 Error: queue file write error"
REPLY_LINE_TOO_LONG = "500 5.5.2 Error: line too long"

_NO_ARGS = frozenset({"DATA", "RSET", "QUIT", "STARTTLS"})
#: Commands that move no mail (Postfix's junk commands, plus HELP, EXPN and TURN): past
#: Policy.max_junk each one counts as an error (``tally``). A repeated HELO/EHLO or RCPT
#: (same address) is counted where it happens.
_JUNK = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "ETRN", "TURN"})


class ProtocolUsageError(RuntimeError):
    """The server layer called the core out of turn (a bug in the caller, not the client)."""


class SMTPConnection:
    """One SMTP session, server side. Not thread-safe; one per connection."""

    #: The session's state: read it as ``state``; only ``_enter`` changes it (states Rule 1).
    _state: State = INITIAL

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._inbuf = InputBuffer(policy.max_line)
        self._pregreet = False
        self._client = Client.connected(policy)
        self._tally = Tally(policy)  # errors, failed logins, junk, deferrals
        self._shutting_down = False
        # the readers chosen by state: set on entering AUTH_INPUT / DATA, dropped on leaving
        self._sasl: sasl.Exchange | None = None
        self._data: DataReader | None = None
        self._tx: Transaction | None = None

    # ----- public properties -----------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the session is (``pyqmail.protocol.states``); read-only."""
        return self._state

    @property
    def paused(self) -> bool:
        """True while the core waits for the server: stop reading from the socket."""
        return self._state in WAITING

    @property
    def closed(self) -> bool:
        """True once the core said Close (or the connection was lost)."""
        return self._state is State.CLOSED

    @property
    def helo(self) -> str | None:
        """The HELO/EHLO name of the current TLS state (None before it, and after STARTTLS)."""
        return self._client.helo

    @property
    def tls(self) -> TLSInfo | None:
        """The handshake the session runs under, if the server reported one."""
        return self._client.tls

    @property
    def auth_user(self) -> str | None:
        """The AUTH login of the current TLS state, if any."""
        return self._client.auth_user

    # ----- the state -------------------------------------------------------------------

    def _enter(self, new: State) -> None:
        """The one place the state changes (states Rule 1): refuses a change missing from
        ``TRANSITIONS``, and drops a reader the new state does not use, so a finished
        message's buffers or a finished SASL exchange never outlive their state."""
        old = self._state
        if new not in TRANSITIONS[old]:
            raise TransitionError(f"SMTP core: no transition {old.value} -> {new.value}")
        self._state = new
        if old is not new:  # a reader lives in one state; it is set right after entering it
            self._data = None
            self._sasl = None

    # ----- server entry points ---------------------------------------------------------

    def start(self) -> list[Event]:
        """The greeting. Input received before this call is a pre-greeting violation."""
        self._require(State.CONNECTED, "start")
        out: list[Event] = []
        if self._pregreet and self.policy.reject_unauth_pipelining:
            self._close(out, REPLY_SYNC)
            return out
        self._enter(State.GREETED)
        self._reply(out, f"220 {self.policy.greeting}")
        self._run(out)
        return coalesce(out)

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the client; returns what to do about them."""
        mode = INPUT[self._state]
        if mode is Input.DISCARD or not data:
            return []
        out: list[Event] = []
        if mode is Input.HOLD:
            self._pregreet = self._pregreet or self._state is State.CONNECTED
            if len(self._inbuf) + len(data) > self.policy.max_pending:
                self._close(out, "421 4.7.0 Error: too much pipelined input")
                return out
            self._inbuf += data
            return out
        if mode is Input.DATA and not self._inbuf:
            rest = self._feed_data(data, out)
            if rest is None:
                return coalesce(out)
            self._inbuf += rest
        else:
            self._inbuf += data
        self._run(out)
        return coalesce(out)

    def auth_result(self, user: str | None, *, temporary: bool = False) -> list[Event]:
        """The verdict on the last AuthRequest: the canonical user name, or None; with
        ``temporary`` the server could not decide now (busy): 454, not a failure."""
        self._require(State.WAIT_AUTH, "auth_result")
        out: list[Event] = []
        self._enter(State.READY)
        if temporary:
            self._reply(out, REPLY_AUTH_TEMPFAIL)
        elif user is not None and sasl.valid_username(user):
            self._client.auth_user = user
            self._reply(out, "235 2.7.0 Authentication successful")
        else:
            self._tally.auth_failures += 1
            self._error(out, sasl.REPLY_AUTH_FAILED)
        self._run(out)
        return coalesce(out)

    def message_queued(self, queue_id: str) -> list[Event]:
        """The message after the last MessageEnd is on stable storage."""
        self._require(State.WAIT_QUEUE, "message_queued")
        if not _QUEUE_ID.match(queue_id):
            raise ProtocolUsageError(f"queue id must be printable ASCII: {queue_id!r}")
        out: list[Event] = []
        self._tx = None
        self._tally.delivered()  # Postfix: "reset after mail is delivered"
        self._enter(State.READY)
        self._reply(out, f"250 2.0.0 Ok: queued as {queue_id}")
        self._run(out)
        return coalesce(out)

    def message_failed(self, reply: str = REPLY_QUEUE_FAILED) -> list[Event]:
        """The commit failed: nothing was queued. ``reply`` is one 4xx/5xx reply line."""
        self._require(State.WAIT_QUEUE, "message_failed")
        if not _REPLY.match(reply) or reply[0] not in "45":
            raise ProtocolUsageError(f"not a 4xx/5xx SMTP reply line: {reply!r}")
        out: list[Event] = []
        self._tx = None
        self._enter(State.READY)
        self._reply(out, reply)
        self._run(out)
        return coalesce(out)

    def tls_started(self, info: TLSInfo) -> list[Event]:
        """The handshake after StartTLS succeeded: forget everything (RFC 3207 4.2)."""
        self._require(State.WAIT_TLS, "tls_started")
        self._inbuf.clear()
        self._client = Client.after_starttls(info)
        self._tx = None
        self._enter(State.GREETED)
        return []

    def timeout(self) -> list[Event]:
        """The server's idle timer fired."""
        if self._state is State.CLOSED:
            return []
        out: list[Event] = []
        self._abort_message(out, "timeout")
        self._close(out, f"421 4.4.2 {self.policy.hostname} Error: timeout exceeded")
        return out

    def shutdown(self) -> list[Event]:
        """The server is stopping: 421 now if idle, else at the next command boundary."""
        self._shutting_down = True
        out: list[Event] = []
        if self._state in LINE_STATES and not self._inbuf:
            self._close(out, self._shutdown_reply())
        return out

    def connection_lost(self) -> list[Event]:
        """The client went away; aborts a message being received."""
        out: list[Event] = []
        self._abort_message(out, "connection lost")
        if self._state is not State.CLOSED:
            self._enter(State.CLOSED)
        self._inbuf.clear()
        return out

    # ----- internals: plumbing ---------------------------------------------------------

    def _require(self, state: State, what: str) -> None:
        """Refuse an entry point called in the wrong state (the server's bug, not the client's)."""
        if self._state is not state:
            raise ProtocolUsageError(f"{what}() called in state {self._state.value}")

    def _reply(self, out: list[Event], line: str) -> None:
        out.append(Send(line.encode("utf-8") + b"\r\n"))

    def _error(self, out: list[Event], line: str) -> None:
        """A reply that counts towards ``Policy.max_errors``."""
        self._tally.errors += 1
        self._reply(out, line)

    def _close(self, out: list[Event], line: str) -> None:
        """Last reply, then Close; nothing the client sent after it is ever read."""
        self._reply(out, line)
        out.append(Close())
        self._enter(State.CLOSED)
        self._inbuf.clear()

    def _abort_message(self, out: list[Event], reason: str) -> None:
        """Tell the server to drop a message being received (unless it already was)."""
        if self._data is not None and self._data.refused is None:
            out.append(MessageAbort(reason))

    def _shutdown_reply(self) -> str:
        return f"421 4.3.2 {self.policy.hostname} Service shutting down, closing channel"

    def _run(self, out: list[Event]) -> None:
        """Process buffered input until it runs out or the core must wait; the state
        chooses how the input is read (``states.INPUT``)."""
        while True:
            mode = INPUT[self._state]
            if mode is Input.DATA:
                if not self._inbuf:
                    return
                rest = self._feed_data(self._inbuf.take(), out)
                if rest is not None:
                    self._inbuf += rest
                continue
            if mode is not Input.COMMAND and mode is not Input.SASL:
                return
            if self._shutting_down and not self._inbuf.discarding:
                self._close(out, self._shutdown_reply())
                return
            line = self._inbuf.next_line(bare_lf=self.policy.bare_lf) if self._inbuf else None
            if line is None:
                return
            if line is LineError.BARE_LF:
                self._close(out, f"550 5.5.2 {self.policy.hostname} Error: bare <LF> received")
                return
            if mode is Input.SASL:
                exchange = self._sasl
                assert exchange is not None  # noqa: S101 - set on entering AUTH_INPUT
                step: sasl.Step
                if line is LineError.TOO_LONG:
                    step = exchange.rejected(REPLY_LINE_TOO_LONG, "too-long")
                else:
                    step = exchange.respond(line)
                self._sasl_step(exchange, step, out)
            elif line is LineError.TOO_LONG:
                self._error(out, REPLY_LINE_TOO_LONG)
            else:
                self._command(line, out)

    # ----- commands --------------------------------------------------------------------

    def _command(self, raw: bytes, out: list[Event]) -> None:
        """Decode one command line, check it may run now, and run its handler."""
        if self._tally.exhausted:
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
        if (
            self.policy.reject_unauth_pipelining
            and self._inbuf
            and out_of_sync(verb, esmtp=self._client.esmtp)
        ):
            self._close(out, REPLY_SYNC)
            return
        if self._state not in ALLOWED[verb]:
            tx = self._tx
            if verb == "DATA" and self._state is State.MAIL and tx and tx.rcpt_attempted:
                self._error(out, "554 5.5.1 Error: no valid recipients")
            else:
                self._error(out, OUT_OF_SEQUENCE[verb, self._state])
            return
        if verb in _NO_ARGS and arg.strip():
            self._error(out, f"501 5.5.4 Syntax: {verb}")
            return
        if verb in _JUNK:
            self._tally.junk_command()
        handler(self, arg, out)

    def _cmd_helo(self, arg: str, out: list[Event], *, esmtp: bool = False) -> None:
        try:
            name = protocol_helo.parse_helo(arg, self.policy, esmtp=esmtp)
        except protocol_helo.HeloError as exc:
            self._error(out, exc.reply)
            return
        if self._client.helo is not None:
            self._tally.junk_command()  # a second HELO/EHLO in the same TLS state moves no mail
        self._tx = None
        self._client.helo = name
        self._client.esmtp = esmtp
        self._enter(State.READY)
        if esmtp:
            out.append(
                Send(protocol_helo.ehlo_reply(self.policy, tls_active=self._client.tls_active))
            )
        else:
            self._reply(out, f"250 {self.policy.hostname}")

    def _cmd_ehlo(self, arg: str, out: list[Event]) -> None:
        self._cmd_helo(arg, out, esmtp=True)

    def _cmd_mail(self, arg: str, out: list[Event]) -> None:
        if self.policy.force_tls and not self._client.tls_active:
            self._error(out, REPLY_NEED_TLS)
            return
        if self.policy.auth_required and not self._client.may_relay(self.policy):
            self._error(out, "530 5.7.0 Authentication required")
            return
        try:
            tx = parse_mail(arg, self.policy.databytes)
        except AddressError as exc:
            self._error(out, exc.reply)
            return
        if self._held(out, self.policy.sender_check, tx.sender.address, (tx.sender.address, None)):
            return
        self._tx = tx
        self._enter(State.MAIL)
        self._reply(out, "250 2.1.0 Ok")

    def _cmd_rcpt(self, arg: str, out: list[Event]) -> None:
        """Past the recipient limit, or the session's deferred RCPTs (``tally``), 452 at
        once, before any check (none is asked about a recipient that cannot be taken now);
        else the recipient's checks."""
        tx = self._tx
        assert tx is not None  # noqa: S101 - RCPT runs only in MAIL/RCPT (states.ALLOWED)
        tx.rcpt_attempted = True
        hard = self.policy.hard_max_recipients
        limit = min(self.policy.maxrcpt or hard, hard)
        refusal = REPLY_TOO_MANY_RCPTS if tx.taken >= limit else self._tally.rcpt_refusal()
        if refusal is not None:
            tx.overshoot += 1
            self._tally.overshoot(tx.overshoot)
            self._reply(out, refusal)
            return
        try:
            box = parse_rcpt(
                arg, self.policy, utf8=tx.utf8, may_relay=self._client.may_relay(self.policy)
            )
        except AddressError as exc:
            self._error(out, exc.reply)
            return
        if box.address in tx.recipients:
            self._tally.junk_command()
            self._reply(out, "250 2.1.5 Ok")
            return
        screen = (tx.sender.address, box.address)
        held = self._held(out, self.policy.rcpt_check, len(tx.recipients) + 1, screen)
        if held is not None:
            tx.deferred += held.startswith("4")  # it takes a place as an accepted one does
            return
        tx.recipients.append(box.address)
        self._enter(State.RCPT)
        self._reply(out, "250 2.1.5 Ok")

    def _held(self, out: list[Event], check: Callable[[str, T], str | None] | None, arg: T,
              screen: tuple[str, str | None]) -> str | None:  # fmt: skip
        """The server's check of an authenticated session's MAIL or RCPT, then Policy.screen
        for a client that may not relay; the refusal sent, or None: a 5xx counts as an
        error; a 4xx at MAIL only past ``Policy.max_deferred``, at RCPT never (``tally``)."""
        login, policy = self._client.auth_user, self.policy
        reply = None if check is None or login is None else check(login, arg)
        if reply is None and policy.screen and not self._client.may_relay(policy):
            reply = policy.screen(*screen)
        if reply is None:
            return None
        if reply.startswith("4"):
            self._tally.deferral(rcpt=screen[1] is not None)
            self._reply(out, reply)
        else:
            self._error(out, reply)
        return reply

    def _cmd_data(self, _arg: str, out: list[Event]) -> None:
        """354, then MessageStart and the Received header; the DATA reader takes over."""
        tx = self._tx
        if tx is None:  # unreachable by the state table; keeps mypy honest
            self._error(out, REPLY_NEED_MAIL)
            return
        client = self._client
        protocol = protocol_name(client, utf8=tx.utf8)
        start = MessageStart(
            sender=tx.sender.address,
            recipients=tuple(tx.recipients),
            params=dict(tx.params),
            helo=client.helo or "",
            auth_user=client.auth_user,
            tls=client.tls if client.tls_active else None,
            protocol=protocol,
        )
        header = received_header(self.policy, client, protocol)
        self._enter(State.DATA)
        self._data = DataReader(self.policy, after_crlf=self._inbuf.last_crlf, size=len(header))
        self._reply(out, "354 End data with <CR><LF>.<CR><LF>")
        out.extend((start, MessageData(header)))

    def _feed_data(self, chunk: bytes, out: list[Event]) -> bytes | None:
        """Feed the DATA reader; at the end of the message, act on how it ended. Returns
        the input after the end marker, or None while the message goes on (or closed)."""
        reader = self._data
        assert reader is not None  # noqa: S101 - set whenever the state is DATA
        step = reader.feed(chunk, out)
        if step is None:
            return None
        if isinstance(step, Broken):
            self._close(out, step.reply)
            return None
        if reader.refused is not None:
            self._tx = None
            self._enter(State.READY)
            self._error(out, reader.refused)
        else:
            self._enter(State.WAIT_QUEUE)
            out.append(reader.end())
        return step.rest

    def _cmd_rset(self, _arg: str, out: list[Event]) -> None:
        self._tx = None
        if self._state in (State.MAIL, State.RCPT):
            self._enter(State.READY)
        self._reply(out, "250 2.0.0 Ok")

    def _cmd_noop(self, _arg: str, out: list[Event]) -> None:
        self._reply(out, "250 2.0.0 Ok")

    def _cmd_quit(self, _arg: str, out: list[Event]) -> None:
        self._close(out, f"221 2.0.0 {self.policy.hostname} Bye")

    def _cmd_vrfy(self, _arg: str, out: list[Event]) -> None:
        self._reply(out, "252 2.0.0 Send some mail, I'll try my best")

    def _cmd_help(self, _arg: str, out: list[Event]) -> None:
        self._reply(out, REPLY_HELP)

    def _cmd_not_implemented(self, _arg: str, out: list[Event]) -> None:
        self._error(out, "502 5.5.1 Error: command not implemented")

    def _cmd_starttls(self, _arg: str, out: list[Event]) -> None:
        if self._client.tls_active:
            self._error(out, "503 5.5.1 Error: TLS already active")
            return
        if not self.policy.starttls_available:
            self._error(out, "502 5.5.1 Error: command not implemented")
            return
        self._inbuf.clear()  # CVE-2011-0411: pipelined plaintext is never executed
        self._reply(out, "220 2.0.0 Ready to start TLS")
        out.append(StartTLS())
        self._enter(State.WAIT_TLS)

    # ----- AUTH ------------------------------------------------------------------------

    def _cmd_auth(self, arg: str, out: list[Event]) -> None:
        """Check AUTH may run, then start the mechanism's exchange (``sasl``)."""
        if not self.policy.auth_mechanisms:
            self._error(out, "503 5.5.1 Error: authentication not enabled")
            return
        if self.policy.auth_needs_tls and not self._client.tls_active:
            self._error(out, REPLY_NEED_TLS)
            return
        if self._client.auth_user is not None:
            self._error(out, "503 5.5.1 Error: already authenticated")
            return
        try:
            exchange, initial = sasl.open_exchange(arg, self.policy)
        except sasl.AuthCommandError as exc:
            self._error(out, exc.reply)
            return
        self._sasl_step(exchange, exchange.begin(initial), out)

    def _sasl_step(self, exchange: sasl.Exchange, step: sasl.Step, out: list[Event]) -> None:
        """Turn what the exchange decided into a state change, a reply and events."""
        if isinstance(step, sasl.Challenge):
            self._enter(State.AUTH_INPUT)
            self._sasl = exchange
            self._reply(out, step.reply)
        elif isinstance(step, AuthRequest):
            self._enter(State.WAIT_AUTH)
            out.append(step)
        else:
            if self._state is State.AUTH_INPUT:
                self._enter(State.READY)
            if step.reply == sasl.REPLY_AUTH_FAILED:
                self._tally.auth_failures += 1
            self._error(out, step.reply)
            out.append(step.event)


_Handler = Callable[[SMTPConnection, str, list[Event]], None]
#: Commands the core knows but does not implement (they get 502 in the states they may run).
_NOT_IMPLEMENTED = frozenset({"EXPN", "BDAT", "ETRN", "TURN"})
#: Every command in the state table has its handler, ``_cmd_<verb>``.
_HANDLERS: dict[str, _Handler] = {
    verb: SMTPConnection._cmd_not_implemented
    if verb in _NOT_IMPLEMENTED
    else getattr(SMTPConnection, f"_cmd_{verb.lower()}")
    for verb in ALLOWED
}
