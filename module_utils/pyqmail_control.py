"""The preflight checks of the control files (rows of CHECKS in ``pyqmail_inventory``: the role
``pyqmail_control``'s variables).

Why its own module: these are the values pyqmail-smtpd and pyqmail-send read from control/,
checked for what they would refuse or read otherwise than written: the local and relay
domains, the routes and their credentials (``control/smtproutes-auth``), the pinned TLS
certificates, the DNS lists and resolvers, the greylisting times, the valid recipients and
catch-alls (domains delivered here: ``pyqmail_dkim``'s ``is_local``; ``check_locals`` is the
DKIM rows' too), and the extra files the role does not write itself (their values by
the rule of the module that writes them, ``pyqmail_controlfiles``'s ``value_problem``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

try:
    from pyqmail.dnslistspec import SpecError, entries
except ImportError:  # pragma: no cover - the controller without the pyqmail package
    from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_dnslistspec import (  # type: ignore[import-not-found,no-redef,unused-ignore]
        SpecError,
        entries,
    )
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_checkbase import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    PEM_CERT,
    Problems,
    domain,
    each,
    in_range,
    shown,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_controlfiles import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    value_problem,
)
from ansible_collections.pyqmail.mail.plugins.module_utils.pyqmail_dkim import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
    domain_problem,
    is_local,
    virtual_keys,
)

CONTROL_NAME_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
HOST_RE = re.compile(r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def relay_problem(relay: str) -> str:
    """What is wrong with a route's relay ("" = fine; "" itself is the MX lookup): an IP
    address (IPv6 unbracketed: the template brackets it) or a host name whose last label is
    not a number, without the root's trailing dot, which pyqmail-send would keep in the name
    its TLS certificate check compares."""
    if not relay:
        return ""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(relay)
        return ""
    if relay.endswith("."):
        return "ends with a dot: write the host name without it (smarthost.example.net)"
    if len(relay) > 253 or not HOST_RE.match(relay.lower()):
        return (
            "is not a host name (letters, digits and '-' in dot-separated labels) nor an IP address"
        )
    return ""


def dns_server(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A DNS server of control/dnsresolver: an IP address, optionally @port (1-65535)."""
    del values
    host, _at, port = str(value).partition("@")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        yield f"{name}: {shown(value)} is not an IP address (host or host@port)"
        return
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        yield f"{name}: {shown(value)} has no port from 1 to 65535 after the @"


def check_authservid(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """The Authentication-Results authserv-id: a host name, or "" for pyqmail__me."""
    if value:
        yield from domain(name, value, values)


def check_locals(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__locals: at least one local domain, each a domain name."""
    if not value:
        yield f"{name}: is empty; name at least one local domain"
    yield from each(domain)(name, value, values)


def check_smtproutes(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__smtproutes: domain ('' = all others), relay host and port."""
    for index, route in enumerate(value):
        where = f"{name}[{index}]"
        if route["domain"]:
            yield from domain(f"{where}.domain", route["domain"], values)
        problem = relay_problem(route["relay"])
        if problem:
            yield f"{where}.relay: {route['relay']!r} {problem}"
        yield from in_range(1, 65535)(f"{where}.port", route["port"], values)
        yield from route_auth_problems(where, route)


def route_auth_problems(where: str, route: Mapping[str, Any]) -> Problems:
    """The credentials of one route, as pyqmail-send reads control/smtproutes-auth
    (``relay:user:password``, one line, stripped): what it would refuse at its next start, or
    read otherwise than written, is refused here. The password is never shown."""
    user, password = route.get("user") or "", route.get("password") or ""
    if not user and not password:
        return
    if user and not password:
        yield f"{where}.password: is missing; user {user!r} needs a password at the relay"
    if password and not user:
        yield f"{where}.user: is missing; a password is only sent with a user"
    if not route["relay"]:
        yield f"{where}.relay: is empty (MX lookup); credentials need a named relay host"
    if re.search(r"[:\x00-\x1f\x7f]", user):
        yield (
            f"{where}.user: {user!r} has a ':' or a control character such as a line break "
            "(smtproutes-auth is relay:user:password, one line)"
        )
    if "\n" in password or "\r" in password or "\0" in password:
        yield f"{where}.password: has a line break or NUL (smtproutes-auth is one line per relay)"
    elif password != password.strip():
        yield f"{where}.password: starts or ends with whitespace, which pyqmail-send strips"


def check_tlshosts(name: str, value: list[dict[str, Any]], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__tlshosts: an FQDN and a PEM certificate each."""
    for index, pin in enumerate(value):
        yield from domain(f"{name}[{index}].name", pin["name"], values)
        if PEM_CERT not in pin["pem"]:
            yield f"{name}[{index}].pem: is not a PEM certificate ({PEM_CERT} missing)"


def check_extra(name: str, value: Mapping[str, Any], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__extra: plain names of control files the role does not write itself,
    each with a value pyqmail_control_files writes (its own rule: ``value_problem``)."""
    managed = values.get("pyqmail_control__managed") or []
    for key, content in value.items():
        if not CONTROL_NAME_RE.match(str(key)):
            yield f"{name}.{key}: not a control file name (lower-case letters, digits and '-')"
        elif key in managed:
            yield f"{name}.{key}: written by the role itself; set its own variable instead"
        problem = value_problem(content)
        if problem:
            yield f"{name}.{key}: {problem}"


def dns_lists(name: str, value: list[Any], values: Mapping[str, Any]) -> Problems:
    """control/dnsbl or control/dnswl: each entry ``zone[=filter][*weight]`` (dnswl: no
    weight) by the daemon's own parser, ``pyqmail_dnslistspec`` (Postfix's filters such as
    ``127.0.0.[2..11]``), a zone twice with the same filter included."""
    del values
    allow = name.startswith("pyqmail_control__dnswl")
    for index, got in entries([str(item) for item in value], allow=allow):
        if isinstance(got, SpecError):
            yield f"{name}[{index}]: {got}"


def check_greylistdelay(name: str, value: int, values: Mapping[str, Any]) -> Problems:
    """0 to 86400, and shorter than pyqmail_control__greylistlifetime when on."""
    yield from in_range(0, 86400, " (0 = off)")(name, value, values)
    lifetime = values.get("pyqmail_control__greylistlifetime")
    if 0 < value <= 86400 and isinstance(lifetime, int) and value >= lifetime:
        yield (
            f"{name}: {value} seconds is not shorter than pyqmail_control__greylistlifetime"
            f" ({lifetime}): a deferred sender would be forgotten before it may pass"
        )


def check_validrcptto(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """One valid recipient: user@domain or @domain, one line."""
    del values
    if "@" not in value or re.search(r"\s", value):
        yield f"{name}: {value!r} is not user@domain or @domain"


def check_rcptcatchall(name: str, value: list[str], values: Mapping[str, Any]) -> Problems:
    """pyqmail_control__rcptcatchall: domain names delivered here (locals or virtualdomains);
    a catch-all for a domain that is relayed would accept what the next hop refuses."""
    local = values.get("pyqmail_control__locals") or []
    known = not any(True for _problem in check_locals("", local, values))
    virtual = virtual_keys(
        str((values.get("pyqmail_control__extra") or {}).get("virtualdomains") or "")
    )
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        problem = domain_problem(item)
        if problem:
            yield f"{where}: {problem}"
        elif known and not is_local(item, local, virtual):
            yield (
                f"{where}: {item!r} is not a local domain (pyqmail_control__locals or "
                "pyqmail_control__extra.virtualdomains)"
            )
