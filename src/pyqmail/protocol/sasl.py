"""SASL exchanges for SMTP AUTH (RFC 4954): one object per AUTH command, one class per mechanism.

An exchange turns the client's base64 lines into one of three steps, and nothing else: a
``Challenge`` (send ``334`` and read one more line), an ``AuthRequest`` (the credentials are
complete: the server verifies them) or ``Rejected`` (refused here, without asking the server:
undecodable or malformed input, a name that fails validation, a foreign authorization identity,
a cancelled exchange). The connection turns the step into a state change and a reply, so the
exchange never touches the session's state and the state table stays in one place.

Strict on input, like the rest of the core: base64 must be canonical (no stray padding or
whitespace), the decoded text UTF-8, the user name 1..255 printable characters without blanks
or ``:``. A refused name gets the same reply as a wrong password, so names cannot be probed.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from typing import ClassVar

from pyqmail.protocol.events import AuthRejected, AuthRequest, Policy

MAX_USERNAME = 255
REPLY_AUTH_FAILED = "535 5.7.8 Error: authentication failed"
_BAD_BASE64 = "501 5.5.2 Error: cannot decode response"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{32}")


class AuthCommandError(ValueError):
    """The AUTH command itself is refused; carries the complete reply line."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <base64 of text>``; the client's next line goes to the same exchange."""

    text: bytes

    @property
    def reply(self) -> str:
        """The 334 reply line."""
        return "334 " + base64.b64encode(self.text).decode("ascii")


@dataclass(frozen=True, slots=True)
class Rejected:
    """Answer ``reply`` and report ``event`` for the log: the exchange is over."""

    reply: str
    event: AuthRejected


Step = Challenge | AuthRequest | Rejected


def valid_username(name: str) -> bool:
    """A name the core passes on: bounded, printable, no blanks, no ``:`` (authdb's separator)."""
    return (
        0 < len(name) <= MAX_USERNAME
        and ":" not in name
        and all(c.isprintable() and not c.isspace() for c in name)
    )


def _b64decode(text: str) -> bytes | None:
    """Canonical base64 only (``=`` is the empty response); None for anything else."""
    if text == "=":
        return b""
    try:
        raw = text.encode("ascii")
        data = binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    # canonical form only: no stray padding or whitespace that strict_mode lets through
    return data if base64.b64encode(data) == raw else None


class Exchange:
    """One AUTH exchange in progress; subclasses implement one mechanism each.

    ``username`` is what the client has claimed so far, for the log line of a refusal.
    """

    mechanism: ClassVar[str]
    #: False if the mechanism starts with a server challenge (RFC 4954: no initial response).
    takes_initial: ClassVar[bool] = True
    _first_prompt: ClassVar[bytes] = b""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.username = ""

    def begin(self, initial: str | None) -> Step:
        """The AUTH command itself: the initial response if there is one, else a prompt."""
        if initial is None:
            return Challenge(self._first_prompt)
        return self._decode(initial)

    def respond(self, raw: bytes) -> Step:
        """One continuation line from the client (its CRLF removed)."""
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return self.rejected(_BAD_BASE64, "bad-base64")
        if text == "*":
            return self.rejected("501 5.7.0 Error: authentication aborted", "aborted")
        return self._decode(text)

    def rejected(self, reply: str, reason: str, user: str | None = None) -> Rejected:
        """End the exchange here: ``reply`` to the client, an ``AuthRejected`` for the log."""
        return Rejected(reply, AuthRejected(self.mechanism, user or self.username or None, reason))

    def _decode(self, response: str) -> Step:
        """base64, then UTF-8, then the mechanism's own parsing."""
        data = _b64decode(response)
        if data is None:
            return self.rejected(_BAD_BASE64, "bad-base64")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self.rejected("501 5.5.2 Error: response is not UTF-8", "bad-utf8")
        return self._step(text)

    def _step(self, text: str) -> Step:
        """The mechanism's reading of one decoded response."""
        raise NotImplementedError

    def _request(self, request: AuthRequest) -> Step:
        """Hand complete credentials to the server, unless the name is not one we pass on."""
        if not valid_username(request.username):
            # same answer as a wrong password: no user probing
            return self.rejected(REPLY_AUTH_FAILED, "bad-name", request.username)
        return request


class Plain(Exchange):
    """RFC 4616: ``authzid NUL authcid NUL password`` in one response."""

    mechanism = "PLAIN"

    def _step(self, text: str) -> Step:
        parts = text.split("\0")
        if len(parts) != 3:
            return self.rejected("501 5.5.2 Error: malformed PLAIN response", "malformed")
        authzid, user, password = parts
        if authzid and authzid != user:  # acting as someone else is never allowed
            return self.rejected(REPLY_AUTH_FAILED, "authzid", user)
        return self._request(AuthRequest("PLAIN", user, password=password))


class Login(Exchange):
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""

    mechanism = "LOGIN"
    _first_prompt = b"Username:"

    def _step(self, text: str) -> Step:
        if not self.username:
            if not text:
                return self.rejected("501 5.5.2 Error: empty user name", "bad-name")
            self.username = text
            return Challenge(b"Password:")
        return self._request(AuthRequest("LOGIN", self.username, password=text))


class CramMD5(Exchange):
    """RFC 2195: the server's challenge, then ``user <hex HMAC-MD5 of it>``.

    The challenge is unique per exchange (random part, milliseconds, host name); the server
    checks the digest against it, so the exchange keeps it for the ``AuthRequest``.
    """

    mechanism = "CRAM-MD5"
    takes_initial = False

    challenge = ""

    def begin(self, initial: str | None) -> Step:  # noqa: ARG002 - None: takes_initial
        """Always the challenge first (``takes_initial`` is False)."""
        stamp = int(self.policy.clock() * 1000)
        self.challenge = f"<{secrets.token_hex(8)}.{stamp}@{self.policy.hostname}>"
        return Challenge(self.challenge.encode())

    def _step(self, text: str) -> Step:
        user, _, digest = text.rpartition(" ")
        if not _HEX_DIGEST.fullmatch(digest):
            return self.rejected("501 5.5.2 Error: malformed CRAM-MD5 response", "malformed")
        return self._request(
            AuthRequest("CRAM-MD5", user, challenge=self.challenge, response=digest.lower())
        )


#: The exchange class for each mechanism (``events.KNOWN_MECHANISMS`` names the same set).
EXCHANGES: dict[str, type[Exchange]] = {cls.mechanism: cls for cls in (Plain, Login, CramMD5)}


def open_exchange(arg: str, policy: Policy) -> tuple[Exchange, str | None]:
    """AUTH's argument (``mechanism [initial-response]``) -> the exchange and the initial
    response; AuthCommandError for bad syntax or a mechanism this session does not offer."""
    words = arg.split(" ")
    mech = words[0].upper()
    if not mech or len(words) > 2:
        raise AuthCommandError("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
    if mech not in policy.auth_mechanisms:
        raise AuthCommandError("504 5.5.4 Error: unsupported authentication mechanism")
    initial = words[1] if len(words) == 2 else None
    exchange = EXCHANGES[mech](policy)
    if initial is not None and not exchange.takes_initial:
        raise AuthCommandError(f"501 5.5.4 Error: {mech} takes no initial response")
    return exchange, initial
