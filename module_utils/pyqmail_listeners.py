"""The preflight checks of where and how the daemons listen (rows of CHECKS in
``pyqmail_inventory``: ``pyqmail__listen_ip``, ``pyqmail_services__*``, Dovecot's ports and
address).

Why its own module: the SMTP listeners and Dovecot's share one host's addresses and ports, so
their rules are read together: one address each (a wildcard only when asked for), each
listener once, each on a port of its own, none on a port another uses on the same address.
The run settings of the supervised listeners are here too: the workers, the softlimit, and a
start timeout longer than the wait ``pyqmail_service`` watches a service up for.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_checkbase import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    Problems,
)

WORKERS_RE = re.compile(r"(auto|[1-9][0-9]*)\Z")
MAX_WORKERS = 256  # pyqmail-smtpd's own bound (pyqmail.smtpd.cli.parse_workers)
LISTENERS = ("smtp", "smtps", "submission")


def is_wildcard(value: str) -> bool:
    """Every address of the host, however written (0.0.0.0, ::, ::0, 0000::): what
    pyqmail-smtpd refuses without --allow-wildcard (``is_unspecified``)."""
    try:
        return ipaddress.ip_address(value).is_unspecified
    except ValueError:
        return False


def same_address(one: str, other: str) -> bool:
    """Two addresses that are one (::1 and 0:0:0:0:0:0:0:1), as parsed, not as written."""
    try:
        return ipaddress.ip_address(one) == ipaddress.ip_address(other)
    except ValueError:
        return one == other


def check_listen_ip(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """pyqmail__listen_ip: one address of this host, a wildcard only when asked for."""
    if not value:
        yield (
            f"{name}: is empty ({values.get('inventory_hostname', 'the host')} has no default "
            "IPv4 address); set the address the listeners should bind to"
        )
    elif is_wildcard(value):
        if not values.get("pyqmail__allow_wildcard"):
            yield (
                f"{name}: {value!r} listens on every address; set an address of the host, or "
                "pyqmail__allow_wildcard=true if that is really meant"
            )
    else:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            yield f"{name}: {value!r} is not an IPv4 or IPv6 address"


def check_ports(name: str, value: Mapping[str, int], values: Mapping[str, Any]) -> Problems:
    """Each wanted listener has its own port in 1-65535."""
    listeners = values["pyqmail_services__listeners"]
    defaults = {"smtp": 25, "smtps": 465, "submission": 587}
    owner: dict[int, str] = {}
    for listener in LISTENERS:
        if listener not in listeners:
            continue
        port = value.get(listener, defaults[listener])
        where = f"{name}.{listener}"
        if not 1 <= port <= 65535:
            yield f"{where}: {port} is out of range: must be from 1 to 65535"
            continue
        first = owner.setdefault(port, listener)
        if first != listener:
            yield f"{where}: {port} is already the port of {first}"


def check_listeners(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """Each listener once."""
    del values
    for index, listener in enumerate(value):
        if listener in value[:index]:
            yield f"{name}[{index}]: {listener!r} is listed twice"


def check_workers(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """auto, or a number of worker processes pyqmail-smtpd takes (1 to 256): the run script
    passes it as --workers, and a value the daemon refuses would stop the listener at its
    restart."""
    del values
    if not WORKERS_RE.match(value) or (value != "auto" and int(value) > MAX_WORKERS):
        yield f"{name}: {value!r}: expected 'auto' or a number from 1 to {MAX_WORKERS}"


def check_softlimit(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """0 (none), or enough address space for Python and TLS."""
    del values
    if value != 0 and value < 64 * 1024 * 1024:
        yield f"{name}: {value} is too small: 0 (no limit) or at least 67108864 (64 MiB)"


def check_timeout(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """pyqmail_service must be able to see a service up for ``wait`` seconds."""
    wait = values["pyqmail_services__wait"]
    if value <= wait:
        yield f"{name}: {value} must be larger than pyqmail_services__wait ({wait})"


def dovecot_on(values: Mapping[str, Any]) -> bool:
    """Dovecot runs (pyqmail_dovecot__enabled): its rows check only then."""
    return bool(values.get("pyqmail_dovecot__enabled"))


def check_dovecot_ports(name: str, value: Mapping[str, int], values: Mapping[str, Any]) -> Problems:
    """Dovecot's listeners: each on its own port in 1-65535, none taken by an SMTP listener
    on the same address (a wildcard on either side is the same address)."""
    if not dovecot_on(values):
        return
    used: dict[int, str] = {}
    for listener in values["pyqmail_dovecot__listeners"]:
        port = value[listener]
        if not 1 <= port <= 65535:
            yield f"{name}.{listener}: {port} is not a port number (1-65535)"
        elif port in used and used[port] != listener:
            yield f"{name}.{listener}: {port} is also the port of {used[port]}"
        used.setdefault(port, listener)
    ip, smtp_ip = values["pyqmail_dovecot__listen_ip"], values["pyqmail__listen_ip"]
    if not same_address(ip, smtp_ip) and not is_wildcard(ip) and not is_wildcard(smtp_ip):
        return
    smtp_ports = values["pyqmail_services__ports"]
    for smtp in values["pyqmail_services__listeners"]:
        port = smtp_ports.get(smtp)
        if port in used:
            yield (
                f"{name}.{used[port]}: {port} clashes with pyqmail_services__ports.{smtp} on "
                f"{ip} (pyqmail_dovecot__listen_ip); give Dovecot another port or address"
            )


def check_dovecot_ip(name: str, value: str, values: Mapping[str, Any]) -> Problems:
    """Dovecot's address: as the SMTP listeners' (one address, a wildcard only when asked)."""
    if dovecot_on(values):
        yield from check_listen_ip(name, value, values)
