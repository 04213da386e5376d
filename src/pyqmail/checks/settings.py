"""The inbound authentication checks' control files, read with pyqmail-smtpd's others.

=====================  ======================================================================
``authchecks``         1: SPF, DKIM and DMARC on mail that is neither from a relay client nor
                       from an AUTH login, with an Authentication-Results header; default 0
``authservid``         the authserv-id of that header (RFC 8601); default ``me``
``dmarcreject``        what a DMARC failure of a ``p=reject`` domain gets: ``reject``
                       (``550 5.7.1``, the default), ``quarantine`` (the Junk folder) or
                       ``none`` (delivered, the header says it)
``dmarcquarantine``    the same for ``p=quarantine``; default ``quarantine``
``authtimeout``        seconds all the checks of one message may take (DNS included); what is
                       left unanswered then is a temperror; default 10, 1 to 60
``dnsresolver``        ``host`` or ``host@port`` lines: the DNS servers the checks ask;
                       absent: the system's (/etc/resolv.conf)
=====================  ======================================================================

A bad value raises ``ControlError`` naming the file and line, before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import dns.resolver

from pyqmail.checks.authresults import ACTIONS
from pyqmail.checks.dmarc import org_domain
from pyqmail.checks.resolver import make_resolver, parse_servers
from pyqmail.control import table
from pyqmail.control.parsers import is_domain
from pyqmail.control.reader import ControlError, Line, read_line, read_lines


@dataclass(frozen=True)
class AuthSettings:
    """The checks' configuration; ``resolver`` is built once per load."""

    enabled: bool = False
    authserv_id: str = "localhost"
    on_reject: str = "reject"
    on_quarantine: str = "quarantine"
    timeout: int = 10
    servers: tuple[tuple[str, int], ...] = ()
    resolver: dns.resolver.Resolver | None = field(default=None, compare=False)


def _action(line: Line | None, default: str) -> str:
    """One of ACTIONS, or an error naming the file."""
    if line is None:
        return default
    if line.text not in ACTIONS:
        raise ControlError(
            f"{line.where}: {line.text!r} is not a DMARC action (one of {', '.join(ACTIONS)})"
        )
    return line.text


def load(control: Path, me: str) -> AuthSettings:
    """The settings in ``control`` (``me`` is the default authserv-id)."""
    ident = read_line(control / table.AUTHSERVID.name)
    if ident is not None and not is_domain(ident.text):
        raise ControlError(f"{ident.where}: {ident.text!r} is not a host name")
    lines = read_lines(control / table.DNSRESOLVER.name) or []
    try:
        servers = tuple(parse_servers([ln.text for ln in lines], str(control / "dnsresolver")))
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    seconds = table.AUTHTIMEOUT.read(control)
    on = bool(table.AUTHCHECKS.read(control))
    if on:  # the public suffix list (and the codecs it needs) before the privilege drop
        org_domain("warm.example")
    try:
        resolver = make_resolver(list(servers), timeout=min(seconds, 5)) if on else None
    except dns.resolver.NoResolverConfiguration:
        raise ControlError(
            f"{control / 'authchecks'}: checks on, but no DNS server: /etc/resolv.conf names "
            f"none and {control / 'dnsresolver'} is absent"
        ) from None
    return AuthSettings(
        enabled=on,
        authserv_id=ident.text if ident is not None else me,
        on_reject=_action(read_line(control / table.DMARCREJECT.name), "reject"),
        on_quarantine=_action(read_line(control / table.DMARCQUARANTINE.name), "quarantine"),
        timeout=seconds,
        servers=servers,
        resolver=resolver,
    )
