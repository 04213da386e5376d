"""Strict parsing of envelope paths and ESMTP parameters for the SMTP core.

Strict on purpose: every address trick that once fooled relay checks is refused here,
before any relay decision is made:

- source routes ``<@a,@b:user@dom>`` are accepted and the route ignored (RFC 5321 4.1.1.3
  requires it); only ``user@dom`` is kept and the relay decision is made on ``dom``;
- a local part may not contain ``@`` (multiple ``@``), quoted local parts are refused
  (they exist to hide ``@``, ``%`` and spaces), and recipients with ``%`` or ``!`` are
  refused (the percent hack and bang paths route mail elsewhere);
- CR, LF, NUL, other control characters, spaces and ``<>`` never get through;
- address literals must be real IP addresses; domains are LDH labels (plus UTF-8 when
  the transaction declared SMTPUTF8) and are lowercased.

A recipient's domain in U-labels (``bücher.example``, SMTPUTF8) is the same domain as its
A-labels (``xn--bcher-kva.example``, RFC 5890), and every list it is compared with
(``rcpthosts``, ``locals``, ``virtualdomains``, ``validrcptto``, ``smtproutes``) holds
LDH names: ``a_labels`` turns it into A-labels once, at RCPT, and the envelope carries
that form, so the checks and pyqmail-send's delivery all see the name the lists use. The
local part is never converted (only its owner knows what it means). The conversion is
Python's IDNA 2003 codec after NFC (the ``idna`` package of IDNA 2008 is not a
dependency); a label that does not come back from its A-label unchanged (``ß``, which
IDNA 2003 maps to ``ss`` where IDNA 2008 keeps it; full-width letters) is refused rather
than taken for another domain.
"""

from __future__ import annotations

import encodings.idna
import encodings.punycode  # the codec ToASCII looks up: loaded before the privilege drop
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets, brackets included.
MAX_ADDRESS = 254
MAX_LOCAL = 64 * 4  # real-world VERP/SRS senders exceed RFC's 64; still bounded
MAX_PARAMS = 8
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~."
)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_ROUTE = re.compile(r"@[^,:@]+(?:,@[^,:@]+)*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
#: What IDNA reads as a label separator besides ".": inside a label they would make one
#: label of what a resolver takes for two.
_IDNA_DOTS = frozenset("\u3002\uff0e\uff61")


class AddressError(ValueError):
    """Carries the complete SMTP reply line for the bad input."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class Mailbox:
    """``address`` is ``local@domain`` (domain lowercased; a recipient's in A-labels:
    ``a_labels``), or ``""`` for the null path."""

    address: str
    local: str
    domain: str


NULL_PATH = Mailbox("", "", "")


def split_path(arg: str, keyword: str, code: str) -> tuple[str, str]:
    """``FROM:<path> params`` -> (path without brackets, params text)."""
    head = arg[: len(keyword)]
    if head.upper() != keyword:
        raise AddressError(
            f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM:' else 'RCPT TO'}:<address>"
        )
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise AddressError(f"501 {code} Bad address syntax: angle brackets required")
    close = rest.find(">")
    if close < 0:
        raise AddressError(f"501 {code} Bad address syntax: missing '>'")
    path, params = rest[1:close], rest[close + 1 :]
    if "<" in path:
        raise AddressError(f"501 {code} Bad address syntax: '<' inside the address")
    if params and not params.startswith(" "):
        raise AddressError(f"501 {code} Bad address syntax: text after '>'")
    return path, params.strip(" ")


def _check_domain(domain: str, code: str, utf8: bool) -> str:
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError(f"501 {code} Bad address syntax: unterminated address literal")
        body = domain[1:-1]
        try:
            if body[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(body[5:])
                return "[IPv6:" + body[5:].lower() + "]"
            ipaddress.IPv4Address(body)
        except ValueError as exc:
            raise AddressError(f"501 {code} Bad address syntax: bad address literal") from exc
        return domain
    if not domain or len(domain) > 253:
        raise AddressError(f"501 {code} Bad address syntax: bad domain")
    for label in domain.split("."):
        if _LABEL.match(label):
            continue
        if utf8 and label and not label.isascii() and _utf8_label_ok(label):
            continue
        raise AddressError(f"501 {code} Bad address syntax: bad domain {domain!a}")
    return domain.lower()


def a_labels(box: Mailbox, code: str) -> Mailbox:
    """``box`` with its domain's U-labels as A-labels (lower case); an ASCII domain as it
    is. AddressError naming the label that has no A-label to be sure of."""
    if box.domain.isascii():
        return box
    labels = []
    for label in box.domain.split("."):
        if label.isascii():
            labels.append(label)
            continue
        name = unicodedata.normalize("NFC", label.lower())
        try:
            ace = encodings.idna.ToASCII(name).decode("ascii")
            back = encodings.idna.ToUnicode(ace)
        except UnicodeError:
            ace = back = ""
        if back != name or not _LABEL.match(ace) or not _IDNA_DOTS.isdisjoint(name):
            raise AddressError(
                f"553 {code} sorry, the domain label {label!a} has no IDNA A-label form"
            )
        labels.append(ace.lower())
    domain = ".".join(labels)
    address = f"{box.local}@{domain}"
    if len(domain) > 253 or len(address) > MAX_ADDRESS:
        raise AddressError(f"501 {code} Bad address syntax: domain {domain} too long")
    return Mailbox(address, box.local, domain)


def _utf8_label_ok(label: str) -> bool:
    return (
        len(label.encode()) <= 63
        and not label.startswith("-")
        and not label.endswith("-")
        and all(c.isalnum() or c == "-" or not c.isascii() for c in label)
        and all(c.isprintable() and not c.isspace() for c in label)
    )


def parse_mailbox(path: str, code: str, *, utf8: bool, allow_null: bool) -> Mailbox:
    """Validate the inside of ``<...>``; ``code`` is the enhanced code for syntax errors."""
    if path == "":
        if allow_null:
            return NULL_PATH
        raise AddressError(f"501 {code} Bad address syntax: empty address")
    if path.startswith("@"):
        route = _ROUTE.match(path)
        if route is None:
            raise AddressError(f"501 {code} Bad address syntax: bad source route")
        path = path[route.end() :]
    if len(path) > MAX_ADDRESS:
        raise AddressError(f"501 {code} Bad address syntax: address longer than {MAX_ADDRESS}")
    if '"' in path or "\\" in path:
        raise AddressError(f"553 {code} sorry, quoted local parts are not accepted")
    if path.count("@") > 1:
        raise AddressError(f"501 {code} Bad address syntax: more than one '@'")
    local, at, domain = path.partition("@")
    if not local or len(local) > MAX_LOCAL:
        raise AddressError(f"501 {code} Bad address syntax: bad local part")
    for char in local:
        if char in _ATEXT:
            continue
        if utf8 and not char.isascii() and char.isprintable() and not char.isspace():
            continue
        if not char.isascii() and char.isprintable():
            raise AddressError("553 5.6.7 sorry, non-ASCII address needs SMTPUTF8")
        raise AddressError(f"501 {code} Bad address syntax: {char!a} not allowed")
    if not at:
        if local.lower() == "postmaster":
            return Mailbox("postmaster", "postmaster", "")
        raise AddressError(f"501 {code} Bad address syntax: domain required")
    if not domain.isascii() and not utf8:
        raise AddressError("553 5.6.7 sorry, non-ASCII address needs SMTPUTF8")
    domain = _check_domain(domain, code, utf8)
    return Mailbox(f"{local}@{domain}", local, domain)


def parse_params(text: str) -> list[tuple[str, str | None]]:
    """``KEY[=VALUE] ...`` -> [(KEY upper, VALUE or None)]; syntax/repeats -> 555 5.5.4."""
    if not text:
        return []
    words = text.split(" ")
    if len(words) > MAX_PARAMS:
        raise AddressError("555 5.5.4 Too many parameters")
    seen: set[str] = set()
    result: list[tuple[str, str | None]] = []
    for word in words:
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise AddressError(f"555 5.5.4 Bad parameter syntax: {_printable(word)}")
        key = key.upper()
        if key in seen:
            raise AddressError(f"555 5.5.4 Repeated parameter: {key}")
        seen.add(key)
        result.append((key, value if eq else None))
    return result


def _printable(text: str, limit: int = 40) -> str:
    clean = "".join(c if c.isascii() and c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")
