"""The SMTP core's states: where a session can be, where it can go, what runs where.

Two written rules, after h11's ``_state.py``:

Rule 1: every state change of an ``SMTPConnection`` goes through its one ``_enter`` method,
which refuses a change that is not in ``TRANSITIONS``; nothing else assigns the state (a test
scans the package's source for assignments). So ``TRANSITIONS`` is the whole map of where a
session can go, and a change missing from it is a bug in the core, raised as
``TransitionError`` where it happens instead of an odd reply three commands later.

Rule 2: this module knows SMTP sessions in the abstract: no policy, no sockets, no queue. It
says which commands may run in which state (``ALLOWED``, and the fixed replies when they may
not) and which framing reads the client's input in each state (``INPUT``); the connection
chooses its reader by looking the state up here, never by remembering how it got there.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

REPLY_NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
REPLY_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
REPLY_NEED_MAIL = "503 5.5.1 Error: need MAIL command"


class TransitionError(RuntimeError):
    """The core tried a state change that ``TRANSITIONS`` does not allow (a bug in the core)."""


class State(enum.Enum):
    """Where one SMTP session is; the value is what logs and error messages show."""

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

    # Members are singletons compared by identity, so hashing by identity is consistent;
    # it runs in C, where Enum's own __hash__ is Python code run on every table lookup.
    __hash__ = object.__hash__


#: Every connection starts here.
INITIAL = State.CONNECTED

_CLOSE = "Close: QUIT, a fatal error, timeout, shutdown or the client went away"

#: The transition table: for each state, the states ``_enter`` may move to, and why.
#: A state listed under itself is re-entered (a second EHLO, another recipient, LOGIN's
#: second prompt): the transaction or exchange it carries is renewed, the state is not.
TRANSITIONS: Mapping[State, Mapping[State, str]] = {
    State.CONNECTED: {
        State.GREETED: "start(): the greeting was sent",
        State.CLOSED: _CLOSE + "; or input before the greeting",
    },
    State.GREETED: {
        State.READY: "HELO/EHLO accepted",
        State.CLOSED: _CLOSE,
    },
    State.READY: {
        State.READY: "HELO/EHLO again (the transaction is reset)",
        State.MAIL: "MAIL accepted",
        State.AUTH_INPUT: "AUTH without an initial response: 334 challenge sent",
        State.WAIT_AUTH: "AUTH with a complete initial response: AuthRequest out",
        State.WAIT_TLS: "STARTTLS accepted: 220 sent, StartTLS out",
        State.CLOSED: _CLOSE,
    },
    State.MAIL: {
        State.READY: "HELO/EHLO or RSET ends the transaction",
        State.RCPT: "the first recipient accepted",
        State.CLOSED: _CLOSE,
    },
    State.RCPT: {
        State.READY: "HELO/EHLO or RSET ends the transaction",
        State.RCPT: "another recipient accepted",
        State.DATA: "DATA: 354 sent, MessageStart out",
        State.CLOSED: _CLOSE,
    },
    State.DATA: {
        State.WAIT_QUEUE: "end of data: MessageEnd out",
        State.READY: "end of data of a message already refused (size, NUL, hops)",
        State.CLOSED: _CLOSE + "; or a bare CR/LF in the content",
    },
    State.AUTH_INPUT: {
        State.AUTH_INPUT: "LOGIN: the user name came, the password prompt is sent",
        State.WAIT_AUTH: "the response is complete: AuthRequest out",
        State.READY: "the response was refused, cancelled or too long",
        State.CLOSED: _CLOSE,
    },
    State.WAIT_AUTH: {
        State.READY: "auth_result(): 235, 535 or 454",
        State.CLOSED: _CLOSE,
    },
    State.WAIT_QUEUE: {
        State.READY: "message_queued() or message_failed()",
        State.CLOSED: _CLOSE,
    },
    State.WAIT_TLS: {
        State.GREETED: "tls_started(): everything is forgotten (RFC 3207 4.2)",
        State.CLOSED: _CLOSE,
    },
    State.CLOSED: {},
}


class Input(enum.Enum):
    """How the client's bytes are read in a state (h11 picks its readers the same way)."""

    DISCARD = "discard"  # closed, or plaintext after STARTTLS (CVE-2011-0411)
    HOLD = "hold"  # buffered, bounded, until the server answers (or start() is called)
    COMMAND = "command"  # CRLF lines, each one command
    SASL = "sasl"  # CRLF lines, each one SASL response to the exchange in progress
    DATA = "data"  # message content up to <CR><LF>.<CR><LF>, by the DATA reader

    __hash__ = object.__hash__  # as State's


#: The framing chosen by state.
INPUT: Mapping[State, Input] = {
    State.CONNECTED: Input.HOLD,
    State.GREETED: Input.COMMAND,
    State.READY: Input.COMMAND,
    State.MAIL: Input.COMMAND,
    State.RCPT: Input.COMMAND,
    State.DATA: Input.DATA,
    State.AUTH_INPUT: Input.SASL,
    State.WAIT_AUTH: Input.HOLD,
    State.WAIT_QUEUE: Input.HOLD,
    State.WAIT_TLS: Input.DISCARD,
    State.CLOSED: Input.DISCARD,
}

#: States in which the core waits for the server: it should stop reading (``paused``).
WAITING = frozenset({State.WAIT_AUTH, State.WAIT_QUEUE, State.WAIT_TLS})
#: States that read input as lines (a shutdown takes effect at the next line boundary).
LINE_STATES = frozenset(s for s, i in INPUT.items() if i in (Input.COMMAND, Input.SASL))

_ANY = frozenset({State.GREETED, State.READY, State.MAIL, State.RCPT})
#: The states in which each command runs.
ALLOWED: Mapping[str, frozenset[State]] = {
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
OUT_OF_SEQUENCE: Mapping[tuple[str, State], str] = {
    ("MAIL", State.GREETED): REPLY_NEED_HELO,
    ("MAIL", State.MAIL): "503 5.5.1 Error: nested MAIL command",
    ("MAIL", State.RCPT): "503 5.5.1 Error: nested MAIL command",
    ("RCPT", State.GREETED): REPLY_NEED_MAIL,
    ("RCPT", State.READY): REPLY_NEED_MAIL,
    ("DATA", State.GREETED): REPLY_NEED_MAIL,
    ("DATA", State.READY): REPLY_NEED_MAIL,
    ("DATA", State.MAIL): "503 5.5.1 Error: need RCPT command",
    ("STARTTLS", State.GREETED): REPLY_NEED_HELO,
    ("STARTTLS", State.MAIL): REPLY_IN_TRANSACTION,
    ("STARTTLS", State.RCPT): REPLY_IN_TRANSACTION,
    ("AUTH", State.GREETED): REPLY_NEED_HELO,
    ("AUTH", State.MAIL): REPLY_IN_TRANSACTION,
    ("AUTH", State.RCPT): REPLY_IN_TRANSACTION,
}
