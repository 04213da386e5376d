"""What the client has established in the current TLS state, and what that entitles it to.

Its HELO/EHLO name, whether it spoke ESMTP, the TLS handshake it runs under, its AUTH login
and whether its certificate grants relaying. RFC 3207 4.2: when TLS starts, all of it is
forgotten, so STARTTLS replaces the whole object (``after_starttls``) instead of resetting
fields one by one and missing one. The Received header, ``MessageStart`` and the relay
decision read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyqmail.protocol.events import Policy, TLSInfo


@dataclass(slots=True)
class Client:
    """The client's identity as far as this session knows it."""

    tls: TLSInfo | None
    tls_active: bool
    #: A verified client certificate listed in tlsclients (the server decides; see TLSInfo).
    cert_relay: bool
    helo: str | None = None
    esmtp: bool = False
    auth_user: str | None = None

    @classmethod
    def connected(cls, policy: Policy) -> Client:
        """A new connection: TLS from the start on smtps, else plaintext."""
        info = policy.tls_info
        return cls(info, policy.tls_active, bool(info and info.client_cert_relay))

    @classmethod
    def after_starttls(cls, info: TLSInfo) -> Client:
        """The handshake after STARTTLS: nothing from before it is kept."""
        return cls(info, tls_active=True, cert_relay=info.client_cert_relay)

    def may_relay(self, policy: Policy) -> bool:
        """Relaying to any domain: a relay client (tcprules), a login, or a listed cert."""
        return policy.relay_client or self.auth_user is not None or self.cert_relay
