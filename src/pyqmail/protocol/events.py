"""What the sans-I/O SMTP core (``pyqmail.protocol.connection``) takes in and gives out.

``Policy`` is everything the server layer knows about one connection before the first byte
(control files, the tcprules environment, the listener mode). ``TLSInfo`` describes a
finished handshake. The event classes are what ``SMTPConnection`` methods return; the
server acts on them in order (see ``pyqmail.protocol.connection`` for the contract of each).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pyqmail.headers import DEFAULT_MAXHOPS

#: SASL mechanisms the core implements.
KNOWN_MECHANISMS = frozenset({"PLAIN", "LOGIN", "CRAM-MD5"})


def _no_domain(_domain: str) -> bool:
    return False


def _no_notice(_event: str, _text: str) -> None:
    """Policy.notice default: the caller keeps no log."""


@dataclass(frozen=True)
class TLSInfo:
    """A completed TLS handshake, for the Received header, the log and relay rights.

    ``client_cert_relay`` is True only when the client presented a certificate that
    chains to ``control/clientca.pem`` and whose address is listed in ``tlsclients``:
    the server verifies that; the core only honours it for the relay decision.
    """

    version: str
    cipher: str
    bits: int | None = None
    client_cert_relay: bool = False
    peer: str | None = None


@dataclass(frozen=True)
class Policy:
    """Per-connection settings the core enforces.

    Limits (documented choices):

    - ``max_line`` bounds one command line or AUTH continuation line including CRLF.
      RFC 5321 asks for 512 for commands; its extensions (SIZE, BODY, AUTH=, SMTPUTF8)
      and RFC 4954 AUTH PLAIN initial responses need more, so 4096 by default
      (a 255-byte user name and a ~2.8 KiB password fit). Longer: ``500 5.5.2``.
    - Message lines have no length limit of their own (like Postfix and qmail, which
      accept and store long body lines); ``databytes`` bounds the whole message.
    - ``maxrcpt``: 0 means "no configured limit", but ``hard_max_recipients`` always
      applies so memory stays bounded (RFC 5321 asks servers to take at least 100).
    - ``maxhops``: a message whose header has more ``Received``/``Delivered-To`` lines is
      read to its end, dropped and refused with ``554 5.4.6`` (``pyqmail.headers``).
      Messages containing a NUL byte are refused the same way (``554 5.6.0``).
    - ``max_pending`` bounds input buffered while the core waits for the server
      (AUTH check, queue commit, handshake) and before the greeting.
    - ``max_junk``: junk commands (NOOP, RSET, VRFY, ...; ``pyqmail.smtpd.knobs``)
      allowed before each further one counts towards ``max_errors``; 0 = no limit.
    - ``max_deferred``: MAIL commands a check answered with a 4xx (greylisting, a sending
      limit) allowed before each further one counts towards ``max_errors``;
      ``max_deferred_rcpt``: RCPTs a check deferred in a session (until a message is
      queued) before every further RCPT gets ``452`` unchecked; ``max_rcpt_overshoot``:
      RCPTs per transaction answered that ``452`` or one past the recipient limit allowed
      before each further one counts towards ``max_errors`` (``pyqmail.protocol.tally``).
      A deferred RCPT counts towards the recipient limit as an accepted one does.
    - ``postmaster_domain``: where a bare ``RCPT TO:<postmaster>`` goes (RFC 5321 4.5.1):
      a domain delivered here (the server's ``locals``); empty: ``hostname``.
    - ``auth_header``: name the AUTH login in the Received header.
    - ``notice(event, text)`` is how the core asks the server to log something the client
      did that has no reply of its own worth logging (a refused HELO).
    - ``sender_check(login, sender)`` and ``rcpt_check(login, count)``: for an authenticated
      session only, after MAIL's (RCPT's) own checks passed: a reply line refuses the
      command (``pyqmail.smtpd.senders``: the login's addresses, its sending limits; a 4xx
      is an error only past ``max_deferred``), None lets it through. ``count`` includes
      this recipient.
    - ``screen(sender, recipient)``: for a client that may not relay, after MAIL's
      (``recipient`` None) and RCPT's own checks: a reply line refuses the command
      (``pyqmail.checks.screen``: blocklists, greylisting), counted as ``sender_check``'s.
    """

    hostname: str
    greeting: str
    client_ip: str
    client_host: str | None = None
    tls_active: bool = False
    tls_info: TLSInfo | None = None
    starttls_available: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    force_tls: bool = False
    auth_required: bool = False
    relay_client: bool = False
    bare_lf: bool = False
    databytes: int = 0
    maxrcpt: int = 0
    maxhops: int = DEFAULT_MAXHOPS
    rcpthosts: Callable[[str], bool] = _no_domain
    validrcptto: Callable[[str], bool] | None = None
    max_line: int = 4096
    max_errors: int = 10
    max_auth_failures: int = 3
    max_pending: int = 256 * 1024
    hard_max_recipients: int = 1000
    reject_unauth_pipelining: bool = True
    clock: Callable[[], float] = time.time
    max_junk: int = 100
    max_deferred: int = 10
    max_deferred_rcpt: int = 100
    max_rcpt_overshoot: int = 1000
    postmaster_domain: str = ""
    auth_header: bool = False
    notice: Callable[[str, str], None] = _no_notice
    sender_check: Callable[[str, str], str | None] | None = None
    rcpt_check: Callable[[str, int], str | None] | None = None
    screen: Callable[[str, str | None], str | None] | None = None

    @property
    def auth_needs_tls(self) -> bool:
        """AUTH only inside TLS whenever TLS can be had (``force_tls``, or STARTTLS offered):
        a password is never invited in clear where it could have been protected, whatever
        the listener (Postfix's ``smtpd_tls_auth_only``). A listener with no certificate
        keeps AUTH in clear, as its configuration asks."""
        return self.force_tls or self.starttls_available

    def __post_init__(self) -> None:
        for name in ("hostname", "greeting", "client_ip"):
            value = getattr(self, name)
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"Policy.{name} contains CR, LF or NUL: {value!r}")
        if not all(" " <= c <= "~" for c in self.hostname):
            raise ValueError(f"Policy.hostname must be printable ASCII: {self.hostname!r}")
        if not self.greeting.isprintable():  # UTF-8 is sent as is, control characters never
            raise ValueError(f"Policy.greeting must be printable: {self.greeting!r}")
        if not self.hostname or any(c.isspace() for c in self.hostname):
            raise ValueError(f"Policy.hostname must be one non-empty word: {self.hostname!r}")
        unknown = set(self.auth_mechanisms) - KNOWN_MECHANISMS
        if unknown:
            raise ValueError(
                f"Policy.auth_mechanisms has unknown mechanisms {sorted(unknown)};"
                f" known: {sorted(KNOWN_MECHANISMS)}"
            )
        if len(set(self.auth_mechanisms)) != len(self.auth_mechanisms):
            raise ValueError(f"Policy.auth_mechanisms repeats a name: {self.auth_mechanisms}")
        if not all("!" <= c <= "~" for c in self.postmaster_domain):
            raise ValueError(
                "Policy.postmaster_domain must be printable ASCII without blanks: "
                f"{self.postmaster_domain!r}"
            )
        for name in ("databytes", "maxrcpt", "max_junk", "max_deferred", "max_rcpt_overshoot"):
            if getattr(self, name) < 0:
                raise ValueError(f"Policy.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_line < 512:
            raise ValueError(f"Policy.max_line must be >= 512 (RFC 5321), got {self.max_line}")
        at_least_one = ("maxhops", "max_errors", "max_auth_failures", "hard_max_recipients")
        for name in (*at_least_one, "max_deferred_rcpt"):
            if getattr(self, name) < 1:
                raise ValueError(f"Policy.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pending < self.max_line:
            raise ValueError("Policy.max_pending must be at least Policy.max_line")


@dataclass(frozen=True)
class Send:
    """Bytes to write to the client (complete reply lines, CRLF-terminated)."""

    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Write every ``Send`` before this one, then run the server side of the handshake
    and call ``tls_started`` (or close the connection if it fails). The core has already
    discarded any plaintext received after the STARTTLS line (CVE-2011-0411) and keeps
    discarding input until ``tls_started``."""


@dataclass(frozen=True)
class AuthRequest:
    """Verify credentials (off the event loop) and answer with ``auth_result``.

    PLAIN/LOGIN: ``username`` + ``password``. CRAM-MD5: ``username`` + ``challenge``
    (the exact challenge string the core sent) + ``response`` (lowercase hex HMAC-MD5
    the client computed). The password is kept out of ``repr`` so it never reaches a log.
    """

    mechanism: str
    username: str
    password: str | None = field(default=None, repr=False)
    challenge: str | None = None
    response: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AuthRejected:
    """An AUTH attempt the core answered itself, without an ``AuthRequest`` (undecodable
    or malformed response, a name that fails validation, a foreign authorization
    identity, a cancelled exchange): the server only logs it (``auth-fail``), so that
    every failure leaves a line a fail2ban filter can count. Nothing to answer."""

    mechanism: str
    username: str | None
    reason: str


@dataclass(frozen=True)
class MessageStart:
    """A message begins: open a queue writer. ``MessageData`` chunks follow.

    ``params`` are the accepted MAIL FROM ESMTP parameters (``SIZE``, ``BODY``,
    ``SMTPUTF8`` with value ``""``, ``AUTH``). ``protocol`` is the RFC 3848 / 6531 "with"
    keyword (``SMTP``, ``ESMTP``, ``ESMTPS``, ``ESMTPSA``, ``UTF8SMTPS``...).
    """

    sender: str
    recipients: tuple[str, ...]
    params: Mapping[str, str]
    helo: str
    auth_user: str | None
    tls: TLSInfo | None
    protocol: str


@dataclass(frozen=True)
class MessageData:
    """Message bytes to append: CRLF line ends, dot-unstuffed, no end marker.

    The first chunk of every message is the Received header the core built."""

    chunk: bytes


@dataclass(frozen=True)
class MessageEnd:
    """The client sent ``<CRLF>.<CRLF>``: commit durably, then call ``message_queued``
    (or ``message_failed``). ``size`` is the total of the ``MessageData`` chunks;
    ``client_size`` the part the client sent (without the Received header the core put
    first), dot-unstuffed: what ``databytes`` bounds, and what the scanners' size limits
    are compared with (``pyqmail.scan.stage``)."""

    size: int
    message_id: str | None
    client_size: int


@dataclass(frozen=True)
class MessageAbort:
    """Discard the message in progress (nothing was acknowledged). The core answers the
    client itself (552 after reading to the end for oversize, 550 + close for bare LF/CR)."""

    reason: str


@dataclass(frozen=True)
class Close:
    """Write every ``Send`` before this one, then close the connection."""


Event = (
    Send
    | StartTLS
    | AuthRequest
    | AuthRejected
    | MessageStart
    | MessageData
    | MessageEnd
    | MessageAbort
    | Close
)


def coalesce(events: list[Event]) -> list[Event]:
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
