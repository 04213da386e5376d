"""The sans-I/O SMTP core: bytes in, events out (``connection``), and its parts.

One module per concept:

- ``states``: the states, the transition table (its two written rules), which command may
  run and which reader reads input in which state;
- ``connection``: ``SMTPConnection``, the server's entry points, command dispatch and the
  one ``_enter`` through which every state change goes;
- ``events``: what the server passes in (``Policy``, ``TLSInfo``) and gets out (events);
- ``lines``: the input buffer, command-line framing and the pipelining rules;
- ``data``: the DATA reader (end marker, dot-unstuffing, bare CR/LF, size, NUL, hops);
- ``sasl``: the AUTH exchanges, one class per mechanism;
- ``envelope``: MAIL/RCPT parameters, the relay and mailbox decisions, the transaction;
- ``client``: what the client established in the current TLS state;
- ``tally``: errors, junk, deferrals and RCPTs past the limit, and when they end a session;
- ``received``: the Received header; ``address``: path syntax; ``helo``: HELO/EHLO names.

The names below are the core's public interface. The submodules import each other, never
this package's names, so importing it cannot create a cycle (a test checks the graph).
"""

from pyqmail.protocol.connection import ProtocolUsageError, SMTPConnection
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
from pyqmail.protocol.states import State, TransitionError

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
    "TransitionError",
]
