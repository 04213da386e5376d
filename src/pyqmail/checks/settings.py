"""The inbound authentication checks' control files, read with pyqmail-smtpd's others.

=====================  ======================================================================
``authchecks``         1: SPF, DKIM and DMARC on mail that is neither from a relay client nor
                       from an AUTH login, with an Authentication-Results header; default 0
``authservid``         the authserv-id of that header (RFC 8601); default ``me``
``dmarcreject``        what a DMARC failure of a ``p=reject`` domain gets: ``reject``
                       (``550 5.7.1``, the default), ``quarantine`` (the Junk folder) or
                       ``none`` (delivered, the header says it)
``dmarcquarantine``    the same for ``p=quarantine``; default ``quarantine``
``authtimeout``        seconds all the checks of one message may take (DNS included): DNS
                       unanswered then is a temperror, work past it before DMARC's verdict a
                       451 (``pyqmail.checks.inbound``); default 10, 1 to 60
``dnsresolver``        ``host`` or ``host@port`` lines: the DNS servers the checks ask;
                       absent: the system's (/etc/resolv.conf)
=====================  ======================================================================

A bad value raises ``ControlError`` naming the file and line, before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pyqmail.checks import libraries
from pyqmail.control import table
from pyqmail.control.parsers import is_domain, nameservers
from pyqmail.control.reader import ControlError, Line, read_line, read_lines

if TYPE_CHECKING:
    import dns.resolver

ACTIONS = ("reject", "quarantine", "none")  # what a DMARC failure can get


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


def load(control: Path, me: str, *, inbound: bool = True) -> AuthSettings:
    """The settings in ``control`` (``me`` is the default authserv-id). ``inbound`` False:
    checked, but off (a listener whose mail all comes from logins and relay clients)."""
    ident = read_line(control / table.AUTHSERVID.name)
    if ident is not None and not is_domain(ident.text):
        raise ControlError(f"{ident.where}: {ident.text!r} is not a host name")
    servers = nameservers(read_lines(control / table.DNSRESOLVER.name) or [])
    seconds = table.AUTHTIMEOUT.read(control)
    on = bool(table.AUTHCHECKS.read(control)) and inbound
    return AuthSettings(
        enabled=on,
        authserv_id=ident.text if ident is not None else me,
        on_reject=_action(read_line(control / table.DMARCREJECT.name), "reject"),
        on_quarantine=_action(read_line(control / table.DMARCQUARANTINE.name), "quarantine"),
        timeout=seconds,
        servers=servers,
        resolver=_resolver(control, servers, seconds) if on else None,
    )


def _resolver(
    control: Path, servers: tuple[tuple[str, int], ...], seconds: int
) -> dns.resolver.Resolver:
    """The checks' resolver, once their libraries are loaded (``pyqmail.checks.libraries``;
    a ControlError naming ``authchecks`` if they cannot be), with the public suffix list
    parsed now: once per process, in the supervisor before it forks its workers."""
    libraries.require("auth", control / "authchecks")
    import dns.resolver  # noqa: PLC0415 - in sys.modules: loaded by require

    from pyqmail.checks.dmarc import org_domain  # noqa: PLC0415 - the same
    from pyqmail.checks.resolver import make_resolver  # noqa: PLC0415 - the same

    org_domain("warm.example")
    try:
        return make_resolver(list(servers), timeout=min(seconds, 5))
    except dns.resolver.NoResolverConfiguration:
        raise ControlError(
            f"{control / 'authchecks'}: checks on, but no DNS server: /etc/resolv.conf names "
            f"none and {control / 'dnsresolver'} is absent"
        ) from None
