"""Value parsers for control files: text from ``pyqmail.control.reader`` in, typed value out.

Each parser gets what the reader found (``None``: the file is absent) and raises
``ControlError`` naming the file and line of the first bad value. ``pyqmail.control.table``
binds each control file to one of these.
"""

from __future__ import annotations

import ipaddress
import re

from pyqmail.control.reader import ControlError, Line

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
INT_MAX = 2**63 - 1


def is_domain(name: str) -> bool:
    """A DNS host name in lower case: dot-separated LDH labels, at most 253 characters."""
    if not name or len(name) > 253 or name.endswith("."):
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def integer(line: Line, minimum: int = 0, maximum: int = INT_MAX) -> int:
    """A non-negative decimal integer in ``minimum..maximum`` (qmail's scan_ulong, strict:
    qmail silently keeps the default for text it cannot scan)."""
    if not line.text:
        raise ControlError(f"{line.where}: file is empty")
    text = line.text.strip()
    if not text.isdigit() or not text.isascii():
        raise ControlError(f"{line.where}: not a non-negative integer: {line.text!r}")
    value = int(text)
    if value < minimum or value > maximum:
        top = "" if maximum == INT_MAX else f", max {maximum}"
        raise ControlError(f"{line.where}: {value} is out of range (min {minimum}{top})")
    return value


def host_name(line: Line) -> str:
    """A host name (``me``): lower-cased, and it must be one."""
    name = line.text.strip().lower()
    if not is_domain(name):
        raise ControlError(f"{line.where}: not a valid host name: {name!r}")
    return name


def nameservers(lines: list[Line]) -> tuple[tuple[str, int], ...]:
    """``dnsresolver``: ``host`` or ``host@port`` per line, the host an IPv4 or IPv6 address
    (port 53 when absent). The one parser of that file: the blocklists and the
    authentication checks both ask the servers it names."""
    servers = []
    for line in lines:
        host, _, port_text = line.text.strip().partition("@")
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            raise ControlError(f"{line.where}: {host!r} is not an IP address") from None
        port = 53
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ControlError(
                    f"{line.where}: port {port_text!r} of {host} is not a port (1-65535)"
                )
            port = int(port_text)
        servers.append((address, port))
    return tuple(servers)


def printable(line: Line) -> str:
    """One line of text that goes on the wire (greeting, EHLO name, bounce address)."""
    text = line.text.strip()
    if not text.isprintable():
        raise ControlError(f"{line.path}: contains control characters")
    return text


def domains(lines: list[Line], *, wildcard: bool) -> frozenset[str]:
    """Domain names, one per line, lower-cased; ``.suffix`` entries when ``wildcard``."""
    out = set()
    for line in lines:
        name = line.text.strip().lower()
        bare = name[1:] if wildcard and name.startswith(".") else name
        if not is_domain(bare):
            raise ControlError(f"{line.where}: not a valid domain name: {line.text!r}")
        out.add(name)
    return frozenset(out)


def recipients(lines: list[Line]) -> frozenset[str]:
    """validrcptto: ``user@domain`` or ``@domain`` per line, lower-cased."""
    entries = set()
    for line in lines:
        entry = line.text.strip().lower()
        local, at, domain = entry.rpartition("@")
        if not at or not is_domain(domain) or any(c.isspace() for c in local):
            raise ControlError(f"{line.where}: expected user@domain or @domain, got {line.text!r}")
        entries.add(entry)
    return frozenset(entries)


def identities(lines: list[Line]) -> frozenset[str]:
    """tlsclients: certificate identities (e-mail, CN or SAN), one per line, lower-cased."""
    out = set()
    for line in lines:
        ident = line.text.strip()
        if not ident or any(c.isspace() or not c.isprintable() for c in ident):
            raise ControlError(f"{line.where}: not a certificate identity: {line.text!r}")
        out.add(ident.lower())
    return frozenset(out)
