"""Which HELO/EHLO arguments the SMTP core accepts, and why the others are refused.

RFC 5321 section 4.1.1.1: the argument is a domain or an address literal. Real clients are
sloppier: Windows hosts send bare machine names (``DESKTOP-4711``), some send underscores
or a trailing dot. Postfix accepts anything by default and quotes it in the Received
header; pyqmail instead accepts a lenient superset of the RFC syntax whose every accepted
value is unambiguous in a Received header without quoting:

- a name: dot-separated labels of ASCII letters, digits, ``-`` and ``_`` (1 to 63 each),
  with one optional trailing dot; a bare word counts (``localhost``); at most 253
  characters besides that dot, the longest name DNS has (RFC 1035 2.3.4's 255 octets in
  wire form; RFC 5321 4.5.3.1.2 takes its limit from there): a longer name can never be
  looked up, so SPF could only have said ``none`` of it;
- an address literal: ``[192.0.2.1]`` (dotted quad, no leading zeros) or ``[IPv6:...]``
  (a valid IPv6 address, no zone index).

Everything else is refused with ``501 5.5.4``: comment or header delimiters
(``( ) ; < > "`` etc.), blanks, control characters, non-ASCII (RFC 6531 keeps EHLO in
A-labels), empty labels, over-long labels or names, general address literals with other
tags. ``refusal`` returns a short reason for the log, never the reply text.

``parse_helo`` applies this to the command and logs a refusal through ``Policy.notice``;
``ehlo_reply`` is the answer to an accepted EHLO: the extensions this session may use.
"""

from __future__ import annotations

import ipaddress
import re

from pyqmail.protocol.events import Policy

MAX_HELO = 253  # characters of a DNS name (RFC 1035 2.3.4: 255 octets in wire form)
_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?\Z")


class HeloError(ValueError):
    """A HELO/EHLO argument refused; carries the complete reply line."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def _literal_refusal(inner: str) -> str | None:
    """Why the inside of ``[...]`` is not an IPv4 or IPv6 address literal (None if it is)."""
    if inner.lower().startswith("ipv6:"):
        text = inner[5:]
        if "%" in text:
            return "IPv6 literal with a zone index"
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return "invalid IPv6 address literal"
        return None
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return "invalid address literal"
    return None


def refusal(name: str) -> str | None:
    """None if ``name`` (the HELO/EHLO argument, blanks stripped) is acceptable, else why not."""
    if not name:
        return "empty"
    if len(name.removesuffix(".")) > MAX_HELO:  # the trailing dot is not part of the name
        return f"longer than {MAX_HELO} characters"
    if not name.isascii():
        return "non-ASCII characters"
    if not name.isprintable() or any(c.isspace() for c in name):
        return "control characters or blanks"
    if name.startswith("["):
        if not name.endswith("]") or len(name) < 3:
            return "unterminated address literal"
        return _literal_refusal(name[1:-1])
    if _NAME.match(name) is None:
        return "not a host name or address literal"
    return None


def parse_helo(arg: str, policy: Policy, *, esmtp: bool) -> str:
    """The name HELO/EHLO gave (blanks around it stripped), or HeloError. A refused name
    is logged (``helo-refused``) with the reason; the client only hears ``501``."""
    name = arg.strip(" ")
    verb = "EHLO" if esmtp else "HELO"
    if not name:
        raise HeloError(f"501 5.5.4 Syntax: {verb} hostname")
    why = refusal(name)
    if why is not None:
        policy.notice("helo-refused", f"{verb} {name[:MAX_HELO]!r}: {why}")
        raise HeloError(f"501 5.5.4 Error: invalid {verb} hostname")
    return name


def ehlo_reply(policy: Policy, *, tls_active: bool) -> bytes:
    """The multi-line 250 to EHLO. STARTTLS only before TLS; AUTH only where it may be
    used (after TLS when TLS can be had: ``Policy.auth_needs_tls``), so no client is
    invited to send a password in clear."""
    lines = [policy.hostname, "PIPELINING"]
    lines.append(f"SIZE {policy.databytes}" if policy.databytes else "SIZE")
    if policy.starttls_available and not tls_active:
        lines.append("STARTTLS")
    if policy.auth_mechanisms and (tls_active or not policy.auth_needs_tls):
        lines.append("AUTH " + " ".join(policy.auth_mechanisms))
    lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
    text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
    return text.encode("ascii", "replace")
