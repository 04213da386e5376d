"""Senders held to their addresses: what an SMTP AUTH login may use as envelope sender and as
header From.

Why: without it, anyone holding one password (a leaked one, a compromised client) sends as
any address of any domain through our host, signed with our DKIM keys: the receivers'
checks pass and the mail damages every domain we serve. So an authenticated session may use
only the addresses its login owns, as Postfix's ``reject_sender_login_mismatch`` with
``smtpd_sender_login_maps`` does.

The map, ``<root>/users/senders`` (written by the pyqmail_mailboxes role from the mailboxes,
the aliases that deliver to them and each mailbox's ``senders`` list), one line per login::

    alice@example.org: alice@example.org alice@example.net sales@example.org @example.com

``@domain`` owns every address of that domain. ``#`` comments and blank lines are ignored;
addresses compare case-insensitively. pyqmail-smtpd re-reads the file when it changes (as
the users file), so no HUP is needed; a broken new file keeps the map loaded before (and is
logged); a broken file at start stops the daemon (``pyqmail.control.check``, also on HUP
and ``--check``). **No file: no sender rules** (the daemon as before; the role always writes
it, and removes it only when ``pyqmail_mailboxes__senders_enforced`` is false). A login the
file does not list owns nothing.

The rules (every refusal is logged ``sender-refused`` with the login and the address):

- ``MAIL FROM`` of an authenticated session: an address the login owns, else ``553 5.7.1``.
- The null sender ``<>`` is accepted at MAIL, as Postfix's ``reject_sender_login_mismatch``
  does (it skips an empty sender): vacation replies and read receipts (RFC 8098) are sent
  with it. Such a message must then carry a header From the login owns.
- At the end of DATA every address of every ``From:`` field must be owned, else ``550 5.7.1``
  and nothing is queued. A From the parser cannot read without a defect (an unterminated
  ``<``, a bare word, an empty group) is refused the same way: a receiver's display of it is
  anybody's guess. A message without From is the envelope rule's business (accepted when
  the envelope sender was owned), except with the null sender (refused: nothing would tie
  the message to the login). From fields longer than 4 KiB together, or a header section
  longer than ``header_size_limit`` (100 KiB, ``pyqmail.headers``: a From after it would go
  unseen), are refused too. ``Sender:`` and ``Resent-From:`` are not checked.
- Sessions that did not authenticate (relay clients by IP or by client certificate, inbound
  mail) are not held to the map: their rules are unchanged. An authenticated relay client
  is held to it like any other login.

Sending limits per login are ``pyqmail.smtpd.sendlimits``; ``SenderRules`` ties both to a
worker's sessions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.control.reader import ControlError, file_stamp, read_lines
from pyqmail.headers import HEADER_SIZE_LIMIT, header_values, mailbox_addresses
from pyqmail.log import log
from pyqmail.smtpd.sendlimits import SendLimits, Settings

SENDERS_FILE = "users/senders"
MAX_FROM = 4096  # characters of From fields read; more is refused as unreadable
_END = b"\r\n\r\n"
_LABEL = re.compile(r"(?!-)(?:[^\W_]|-){1,63}(?<!-)")  # a domain label (UTF-8 letters too)


@dataclass(frozen=True)
class SenderMap:
    """Login -> the addresses (lower case) and ``@domain`` entries it owns."""

    owned: dict[str, frozenset[str]] = field(default_factory=dict)

    def owns(self, login: str, address: str) -> bool:
        """``login`` may use ``address`` (case-insensitive; ``@domain`` covers the domain)."""
        entries = self.owned.get(login)
        if not entries:
            return False
        addr = address.lower()
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain:
            return False
        return addr in entries or "@" + domain in entries


def valid_entry(entry: str) -> bool:
    """``local@domain`` or ``@domain``, one word: what the map and the role accept."""
    local, at, domain = entry.rpartition("@")
    if not at or "@" in local or any(c.isspace() or not c.isprintable() for c in entry):
        return False
    return all(_LABEL.fullmatch(label) for label in domain.split("."))


def load_map(path: Path) -> SenderMap | None:
    """The map at ``path``; None when it does not exist. ``ControlError`` names file and line."""
    lines = read_lines(path)
    if lines is None:
        return None
    owned: dict[str, frozenset[str]] = {}
    for line in lines:
        login, sep, rest = line.text.partition(":")
        login = login.strip()
        if not sep or not login or any(c.isspace() for c in login):
            raise ControlError(f"{line.where}: expected 'login: address ...', got {line.text!r}")
        entries = rest.split()
        bad = [e for e in entries if not valid_entry(e)]
        if bad:
            raise ControlError(f"{line.where}: {bad[0]!r} is neither an address nor @domain")
        if login in owned:
            raise ControlError(f"{line.where}: login {login!r} is listed twice")
        owned[login] = frozenset(e.lower() for e in entries)
    return SenderMap(owned)


class SendersCache:
    """users/senders as of now: re-read when it changes (stat per look, like the users
    file); a broken new file keeps the map loaded before and is logged once per change."""

    def __init__(self, root: Path) -> None:
        self.path = root / SENDERS_FILE
        self.map: SenderMap | None = None
        self._stamp = file_stamp(self.path)
        try:
            self.map = load_map(self.path) if self._stamp is not None else None
        except ControlError as exc:  # broken since the start-up check: fail closed
            log("warning", text=f"{exc}; no login owns any address until it is fixed")
            self.map = SenderMap()

    def current(self) -> SenderMap | None:
        """The map in force (None: no sender rules)."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return self.map
        self._stamp = stamp
        if stamp is None:
            self.map = None
            return None
        try:
            self.map = load_map(self.path)
        except ControlError as exc:
            log("warning", text=f"{exc}; keeping the senders loaded before")
        return self.map


def from_addresses(head: bytes, limit: int = HEADER_SIZE_LIMIT) -> list[str] | None:
    """Every address of every From field of a header section (its first ``limit`` bytes);
    None when a From field cannot be read unambiguously, names nobody (an empty group) or is
    too long; [] without From."""
    values = header_values(head, "from", limit)
    if sum(len(v) for v in values) > MAX_FROM:
        return None
    out: list[str] = []
    for value in values:
        addresses = mailbox_addresses(value)
        if not addresses:
            return None
        out.extend(addresses)
    return out


class HeadWatch:
    """The header section of one authenticated message, gathered while DATA streams in
    (at most ``HEADER_SIZE_LIMIT`` bytes), judged at its end against the login's map."""

    def __init__(self, login: str, sender: str, senders: SenderMap, ip: str) -> None:
        self.login, self.sender, self.senders, self.ip = login, sender, senders, ip
        self.head = bytearray()
        self.done = False
        self.complete = False  # the empty line after the header section was seen

    def feed(self, chunk: bytes) -> None:
        """Keep the bytes up to the empty line (or the limit); ignore the body."""
        if self.done:
            return
        start = max(len(self.head) - 3, 0)
        self.head += chunk[: HEADER_SIZE_LIMIT + 4 - len(self.head)]
        end = self.head.find(_END, start)
        if end >= 0:
            del self.head[end + 2 :]
            self.done = True
            # complete only if the whole section, last CRLF included, is within the limit
            # the parser reads: a section of limit + 1 or + 2 bytes lost its last line there
            # (a From put last went unseen, and no From passed)
            self.complete = len(self.head) <= HEADER_SIZE_LIMIT
        elif len(self.head) >= HEADER_SIZE_LIMIT + 4:  # no empty line could end in reach
            self.done = True

    def refusal(self) -> str | None:
        """The 550 reply when the header From is not the login's, else None (logged)."""
        if not self.complete and self.done:  # a From past the limit would go unseen
            return self._refuse("(header too long)", "550 5.7.1 header section too long")
        addresses = from_addresses(bytes(self.head), limit=len(self.head))
        if addresses is None:
            return self._refuse("(unreadable)", "550 5.7.1 header From not understood")
        if not addresses:
            if self.sender:
                return None  # the envelope sender was held to the map at MAIL
            return self._refuse("(none)", "550 5.7.1 a message with a null sender needs a From")
        for address in addresses:
            if not self.senders.owns(self.login, address):
                return self._refuse(address, f"550 5.7.1 {_short(address)}: From not owned by you")
        return None

    def _refuse(self, address: str, reply: str) -> str:
        log("sender-refused", ip=self.ip, user=self.login, address=address, where="from")
        return reply


def _short(address: str) -> str:
    """An address as a reply may quote it: printable ASCII, bounded."""
    text = "".join(c if " " < c <= "~" else "?" for c in address[:200])
    return f"<{text}>"


class SenderRules:
    """One worker's view of the sender map and the sending limits, for its sessions."""

    def __init__(self, root: Path, limits: Settings) -> None:
        self.senders = SendersCache(root)
        self.limits = SendLimits(root, limits)

    def mail(self, login: str, sender: str, ip: str) -> str | None:
        """MAIL FROM of an authenticated session: the refusal reply, or None."""
        senders = self.senders.current()
        if senders is not None and sender and not senders.owns(login, sender):
            log("sender-refused", ip=ip, user=login, address=sender, where="mail")
            return f"553 5.7.1 {_short(sender)}: sender address not owned by you"
        return self.limits.mail(login, ip)

    def rcpt(self, login: str, count: int, ip: str) -> str | None:
        """RCPT TO of an authenticated session (``count`` recipients with this one)."""
        return self.limits.rcpt(login, count, ip)

    def watch(self, login: str | None, sender: str, ip: str) -> HeadWatch | None:
        """A watcher of the message's header From, when the session is held to the map."""
        senders = self.senders.current()
        if login is None or senders is None:
            return None
        return HeadWatch(login, sender, senders, ip)

    def accepted(self, login: str | None, recipients: int) -> None:
        """A message of ``login`` is in the queue: count it against the limits."""
        if login is not None:
            self.limits.record(login, recipients)

    def reload(self, root: Path, limits: Settings) -> None:
        """HUP: the map read afresh, the new limits (the root is the daemon's --root)."""
        self.senders = SendersCache(root)
        self.limits.configure(limits)

    def shutdown(self) -> None:
        """The worker stops: pending counts written, the state closed."""
        self.limits.shutdown()
