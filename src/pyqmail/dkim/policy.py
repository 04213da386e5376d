"""Which queued messages pyqmail-send signs, and with which keys.

Signed: a message whose envelope says it was submitted here (queue meta ``origin``:
``auth`` for SMTP AUTH, ``relay`` for a relay client by IP or certificate, ``local`` for
pyqmail-sendmail, ``bounce`` for pyqmail-send's own DSNs) and whose one From header names a
signing domain (a domain of ``control/dkimkeys``; exactly that domain, lower-cased; an
internationalised one compared, and written in ``d=``, as its A-labels: RFC 8616 4). Never
signed: inbound mail and mail relayed for others (a backup MX), which carry no ``origin``;
a message with no From header or several (RFC 5322 allows one; signing one of them would
vouch for a message whose author a reader cannot tell), or a From naming several mailboxes
or none; a message whose header section is longer than ``HEADER_SIZE_LIMIT`` (100 KiB,
``pyqmail.headers``: signing reads the whole section, on pyqmail-send's one main loop). Those
are logged with the reason; a message from a domain without keys is logged too (an admin
wondering why mail is unsigned finds the answer in the log).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pyqmail.dkim import sign
from pyqmail.dkim.keys import Key
from pyqmail.headers import HEADER_SIZE_LIMIT, mailbox_addresses
from pyqmail.queue.format import Envelope

ORIGINS: Final = frozenset({"auth", "relay", "local", "bounce"})


@dataclass(frozen=True)
class Decision:
    """What to put in front of the message (empty: nothing), and the reason for the log
    (empty: nothing to say, e.g. inbound mail)."""

    headers: bytes = b""
    note: str = ""


def _unfold(field: bytes) -> str:
    value = field.split(b":", 1)[1] if b":" in field else b""
    return value.replace(b"\r\n", b"").decode("utf-8", "replace").strip()


def from_domain(fields: Sequence[sign.Field]) -> tuple[str | None, str]:
    """The domain of the message's one author (From), or None and why there is none."""
    froms = [text for name, text in fields if name.strip(b" \t").lower() == b"from"]
    if len(froms) != 1:
        return None, "no From header" if not froms else f"{len(froms)} From headers"
    mailboxes = mailbox_addresses(_unfold(froms[0]))
    if mailboxes is None:  # the reading the sender rules and DMARC use, so all three agree
        return None, "the From header cannot be read unambiguously"
    if len(mailboxes) != 1:
        return None, f"the From header names {len(mailboxes)} mailboxes"
    local, at, domain = mailboxes[0].rpartition("@")
    if not at or not local or not domain:
        return None, f"the From address {mailboxes[0]!r} has no domain"
    return domain.lower().rstrip("."), ""


def a_label(domain: str) -> str | None:
    """``domain`` as ``control/dkimkeys`` names it (LDH only): an internationalised name as
    its A-labels, so mail from bücher.example is signed by xn--bcher-kva.example's keys
    (RFC 8616 4). None when the name has none to be sure of.

    Python's ``idna`` codec (IDNA 2003; the ``idna`` package is not a dependency) maps some
    names to others (straße to strasse, where IDNA 2008 keeps the ß): a name that does not
    come back from its A-labels unchanged is not signed rather than signed for another
    domain."""
    if domain.isascii():
        return domain
    name = unicodedata.normalize("NFC", domain)
    try:
        ace = name.encode("idna").decode("ascii")
        back = ace.encode("ascii").decode("idna")
    except UnicodeError:
        return None
    return ace if back == name else None


def decide(env: Envelope, message: bytes, keys: Mapping[str, Sequence[Key]]) -> Decision:
    """Sign or not, and the signatures. Cheap for what is not signed: inbound mail (no
    ``origin``) costs one dict lookup, no parsing."""
    origin = env.meta.get("origin")
    if origin not in ORIGINS or not keys:
        return Decision()
    if sign.header_too_long(message):
        return Decision(note=f"not signed: header section longer than {HEADER_SIZE_LIMIT} bytes")
    fields, _ = sign.split_message(message)
    domain, why = from_domain(fields)
    if domain is None:
        return Decision(note=f"not signed: {why}")
    ace = a_label(domain)
    if ace is None:
        return Decision(note=f"not signed: From domain {domain} has no unambiguous A-label")
    domain_keys = keys.get(ace)
    if not domain_keys:
        return Decision(note=f"not signed: From domain {ace} has no DKIM key")
    headers = sign.sign(message, domain_keys, int(env.received))
    selectors = ",".join(k.selector for k in domain_keys)
    return Decision(headers, f"signed d={ace} s={selectors} origin={origin}")
