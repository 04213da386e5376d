"""What a session may use of its worker: ``SessionContext``, which ``server.Server`` provides.

Why its own module: a reader can tell what a session can touch without reading the server,
and ``session.py`` stays glue (it was at its 600-line limit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pyqmail.checks.screen import Checks
from pyqmail.control import smtpd as configmod
from pyqmail.rules import Rules
from pyqmail.smtpd.auth import Authenticator
from pyqmail.smtpd.intake import Spool
from pyqmail.smtpd.limits import Admission
from pyqmail.smtpd.senders import SenderRules

if TYPE_CHECKING:
    from pyqmail.smtpd.session import Session


class SessionContext(Spool, Protocol):
    """What a session may use of its worker (``server.Server`` provides it). Properties
    are read when needed, so a HUP's new rules, users and queue reach sessions in
    progress exactly where they did before; the configuration a session started with
    stays its own (``Session.cfg``)."""

    @property
    def mode(self) -> str:
        """The listener mode: smtp, smtps or submission."""

    @property
    def cfg(self) -> configmod.Config:
        """The configuration as of now (a new session keeps it for its whole life)."""

    @property
    def read_buffer(self) -> memoryview:
        """The worker's one receive buffer (every session reads into it, one at a time)."""

    @property
    def auth(self) -> Authenticator:
        """The worker's AUTH check."""

    @property
    def senders(self) -> SenderRules:
        """The worker's sender rules and sending limits (``pyqmail.smtpd.senders``)."""

    @property
    def checks(self) -> Checks:
        """The worker's blocklist resolver and greylist (``pyqmail.checks.screen``)."""

    def rules_now(self) -> Rules | None:
        """The tcprules cdb as of now (None: none; every client is allowed as it is)."""

    def admit(self, key: bytes, cfg: configmod.Config) -> Admission:
        """Count a new connection against maxconn and maxconnip (all workers)."""

    def release(self, key: bytes, *, counted: bool) -> None:
        """Uncount a connection that ``admit`` let in."""

    def connections(self) -> int:
        """The listener's connections now, over all workers (for the stress timeout)."""

    def joined(self, session: Session) -> None:
        """An admitted session: the worker waits for it when it stops."""

    def left(self, session: Session) -> None:
        """A session is over."""
