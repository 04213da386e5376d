"""Unknown local recipients, refused at RCPT (``550 5.1.1``) instead of bounced later.

A message accepted for an address that does not exist is bounced to its envelope sender:
on a public MX that sender is usually forged, so the bounce is backscatter. pyqmail-smtpd
therefore asks, at RCPT, the question local delivery would ask (``pyqmail.send.dotqmail``'s
``resolve``), from the same files the roles write:

1. is the address delivered locally at all? ``locals`` or ``virtualdomains``, exactly as
   pyqmail-send decides (``Control.is_local``: a virtual domain's ``local`` becomes
   ``prefix-local``). Other ``rcpthosts`` domains are relayed (backup MX, smtproutes) and
   are not judged here (``validrcptto`` still can);
2. a mailbox of ``users/mailboxes`` (roles/pyqmail_mailboxes), or ``mailbox-ext`` for any
   ``ext``: whether ``homedir/.qmail-ext`` (or a ``-default``) exists is known only to the
   mailbox user (homes are 0700), so an extension of a mailbox is accepted and delivery
   decides, as before. No valid address is ever refused;
3. an alias file ``alias/.qmail-NAME``, ``.qmail-PREFIX-default`` or ``.qmail-default``
   (roles/pyqmail_aliases; ``.`` becomes ``:``), the same search order as delivery, so
   ``name-ext`` is accepted exactly when a ``.qmail-name-ext`` or a matching ``-default``
   file would deliver it, and ``alias/.qmail-default`` accepts everything, as it delivers
   everything;
4. a domain listed in ``control/rcptcatchall`` accepts every local part (a per-domain
   catch-all, opt-in); ``control/validrcptto`` entries are accepted too.

``postmaster`` (any case) is accepted in every domain delivered here (``locals`` and
``virtualdomains``, as ``Control.is_local`` decides) whatever the lists say: RFC 5321 4.5.1
requires it of every domain we deliver. A local domain delivers it to
``alias/.qmail-postmaster`` (the pyqmail_aliases role always writes it); a virtual domain
to its own ``prefix-postmaster`` when delivery finds one, else to that same local
postmaster (``pyqmail.send.local``). A relayed ``rcpthosts`` domain gets no such pass: its
postmaster is judged like any address (``validrcptto``), since under a ``.example.com``
wildcard ``postmaster@<anything>.example.com`` would otherwise be accepted and, if nobody
delivers that name, bounced "loops back to myself" to a possibly forged sender.

Nothing needs regenerating or a reload: ``users/mailboxes`` is re-read when its mtime
changes and the alias files are looked up per RCPT (a few ``stat`` calls). A qmail root
with neither ``users/mailboxes`` nor ``alias/`` has no local addressing to consult (a
relay-only host, or a bare test root): the check is then inactive. ``control/rcptcheck``
``0`` turns it off. A mailboxes file that cannot be read or parsed accepts (delivery defers
such mail; refusing it here would lose mail that is valid).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.control.send import Control
from pyqmail.send.dotqmail import Mailboxes, MailboxesError, ext_candidates


@dataclass(frozen=True)
class Answer:
    """The check's answer for one recipient; ``reason`` goes into the refusal's log line."""

    known: bool
    reason: str = ""  # "mailbox", "mailbox-ext", "alias", "catchall", "not-local" ...


@dataclass
class LocalRecipients:
    """The local addresses of one qmail root, as local delivery would resolve them."""

    root: Path
    delivery: Control  # locals and virtualdomains, as pyqmail-send reads them
    catchall: frozenset[str] = frozenset()
    mailboxes: Mailboxes = field(init=False)

    _paths: tuple[str, str] = field(init=False)  # the mailboxes file, the alias directory

    def __post_init__(self) -> None:
        self.mailboxes = Mailboxes(self.root / "users" / "mailboxes")
        self._paths = (str(self.mailboxes.path), str(self.alias_dir))

    @property
    def alias_dir(self) -> Path:
        return self.root / "alias"

    def active(self) -> bool:
        """False on a root without local addressing (no mailboxes file, no alias dir).
        Asked at every RCPT: ``os.path`` on strings made once (pathlib's two stats
        rebuilt both paths' text each time). A path it cannot stat counts as absent, so
        a root whose files the daemon cannot see accepts, as an unreadable mailboxes
        file does (``mailboxes-unreadable``): never refuse mail on our own error."""
        mailboxes, alias_dir = self._paths
        return os.path.exists(mailboxes) or os.path.isdir(alias_dir)

    def lookup(self, address: str) -> Answer:
        """Would local delivery find ``address``? ``not-local`` answers are known=True."""
        domain = address.rpartition("@")[2].lower()
        local = self.delivery.is_local(address)
        if local is None:
            return Answer(True, "not-local")
        if domain in self.catchall:
            return Answer(True, "catchall")
        if not self.active():
            return Answer(True, "no-local-addressing")
        return self._resolve(local.lower())

    def _resolve(self, key: str) -> Answer:
        """``dotqmail.resolve``'s search, without reading what only delivery may read."""
        if not key or "/" in key or "\x00" in key:
            return Answer(False, "bad-local-part")
        try:
            boxes = self.mailboxes.get()
        except (MailboxesError, OSError, UnicodeDecodeError):
            return Answer(True, "mailboxes-unreadable")
        if key in boxes:
            return Answer(True, "mailbox")
        cut = len(key)
        while (cut := key.rfind("-", 0, cut)) > 0:
            if key[:cut] in boxes:
                return Answer(True, "mailbox-ext")
        for name in ext_candidates(key.replace(".", ":")):
            try:
                os.stat(self.alias_dir / name)
            except OSError as exc:
                if exc.errno in _ABSENT:
                    continue  # a name too long for a file is no alias either
                return Answer(True, "alias-unreadable")
            return Answer(True, "alias")
        return Answer(False, "unknown-recipient")


_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})


def judge(
    address: str,
    rcpthost: Callable[[str], bool],
    validrcptto: frozenset[str] | None,
    local: LocalRecipients | None,
    delivery: Control,
) -> str:
    """Why RCPT must refuse ``address`` (a reason for the log line), or "" to accept.

    ``validrcptto`` (when present) lists extra valid addresses and ``@domain`` entries;
    on its own, as before this module, it is the whole list for every rcpthosts domain.
    ``local`` (None: ``rcptcheck`` 0) judges the domains delivered here; a relayed
    rcpthosts domain is left to ``validrcptto``, or accepted without it. ``postmaster``
    is accepted in every domain ``delivery`` (locals, virtualdomains) delivers here."""
    addr = address.lower()
    name, _, domain = addr.rpartition("@")
    if not domain or not rcpthost(domain):
        return ""  # relayed mail is the relay rule's business
    if name == "postmaster" and delivery.is_local(addr) is not None:
        return ""  # RFC 5321 4.5.1: every domain we deliver has one
    if validrcptto is not None and (addr in validrcptto or "@" + domain in validrcptto):
        return ""
    answer = local.lookup(addr) if local is not None else Answer(True, "not-local")
    if answer.reason == "not-local":
        return "" if validrcptto is None else "not-in-validrcptto"
    return "" if answer.known else answer.reason
