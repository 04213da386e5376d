"""The sans-I/O SMTP core: bytes in, events out (``connection``), and its parts.

One module per concept: ``states`` (the states, the transition table, which command and
which reader runs in which state), ``connection`` (``SMTPConnection``: dispatch and the one
``_enter``), ``events`` (what goes in and out), ``data`` (the DATA reader), ``sasl`` (the AUTH
exchanges), ``received`` (the Received header), ``address`` (paths and parameters) and
``helo`` (HELO/EHLO names). The names below are the core's public interface; the submodules
import each other, never this package, so importing it cannot create a cycle.
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
