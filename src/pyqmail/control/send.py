"""The qmail root's control files, as pyqmail-send (and pyqmail-sendmail) read them.

``Control.load(root)`` reads ``<root>/control/*`` through ``pyqmail.control.reader`` and
``pyqmail.control.table`` (the same reader and table as pyqmail-smtpd's
``pyqmail.control.smtpd``): first line only unless noted, ``#`` lines and blank lines
ignored, a malformed file is a ``ControlError`` naming file and line.

=====================  ===========================================================
``me``                 this host's name (required, a host name; see the table)
``locals``             domains delivered locally, one per line (default: ``me``)
``virtualdomains``     ``domain:prefix``, ``.suffix:prefix`` or ``user@domain:prefix``:
                       ``local@domain`` is delivered as the local address
                       ``prefix-local`` (qmail semantics; an empty prefix is an exception)
``concurrencylocal``   parallel local deliveries (default 10)
``concurrencyremote``  parallel remote SMTP connections (default 20)
``concurrencydestination``  of them, at most this many to one destination: a recipient
                       domain (its MX hosts) or one ``smtproutes`` relay (default 5, see
                       ``pyqmail.send.scheduler``; above ``concurrencyremote`` it is that)
``queuelifetime``      seconds before a temporary failure becomes permanent (default 604800)
``bouncefrom``         local part of the bounce author (default ``MAILER-DAEMON``)
``bouncehost``         its domain (default ``me``)
``doublebounceto``     where failed bounces go (default ``postmaster``; empty line = drop)
``doublebouncehost``   its domain (default ``me``)
``helohost``           name sent in EHLO (default ``me``)
``maxhops``           Received/Delivered-To lines a message may have (default 100, as
                       pyqmail-smtpd); local delivery bounces a message with more than
                       ``maxhops`` + 1 (its own Received line is not held against it)
``timeoutconnect``     seconds to wait for a TCP connection (default 60)
``timeoutremote``      seconds for each whole SMTP reply, the greeting's included, and for
                       each write of the message to make progress; the STARTTLS handshake
                       gets it capped at 300 (default 1200). A delivery's own deadline is
                       derived from it (``pyqmail.send.smtpclient``)
``smtproutes``         ``domain:relay[:port]`` lines, see ``Route``
``smtproutes-auth``    ``relay:user:password`` lines (mode 0400 pyqmails:root: the manager's
                       user alone reads it), see ``Route``
``clientcert.pem``     private key then certificate (then chain), offered when asked
``tlshosts/<fqdn>.pem``  TLS required to that host, its certificate must verify against it
``dkimkeys``           ``domain:selector:algorithm:keyfile``: the DKIM keys that sign now;
                       read, with the key files, by the manager alone (``pyqmail.dkim.keys``),
                       not part of ``Control`` (which the delivery children receive)
=====================  ===========================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.control import table
from pyqmail.control.reader import ControlError, Line
from pyqmail.headers import DEFAULT_MAXHOPS
from pyqmail.send.delivery import split_address

__all__ = ["Control", "ControlError", "Route", "parse_port"]


@dataclass(frozen=True)
class Route:
    """Where mail for a domain goes: ``host`` empty means MX lookup.

    ``smtproutes`` lines are qmail's: ``domain:relay[:port]``; ``.example.com:relay``
    matches every subdomain; ``:relay`` is the default route; an empty relay means "use MX".
    IPv6 relays are bracketed: ``example.com:[2001:db8::1]:587``.
    ``smtproutes-auth`` lines are ``relay:user:password`` (the password is the rest of the
    line, so it may contain ``:``); the credentials are used for that relay only, and only
    over TLS (STARTTLS, or from the first byte on port 465) with a certificate that
    verified (system CAs, or the relay's ``tlshosts/<relay>.pem`` pin); otherwise the
    delivery is deferred.
    """

    host: str = ""
    port: int = 25
    user: str = ""
    password: str = field(default="", repr=False)

    @property
    def key(self) -> str:
        return f"[{self.host}]:{self.port}" if self.host else ""


def _bracketed(text: str, origin: str) -> tuple[str, str]:
    """Split ``[host]rest`` or ``host:rest`` -> (host, rest after the colon)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ControlError(f"{origin}: unterminated '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ControlError(f"{origin}: expected ':' after ']' in {text!r}")
        return host, rest[1:]
    host, _, rest = text.partition(":")
    return host, rest


def _relay_host(host: str, origin: str) -> str:
    """A relay as written, refused with a trailing dot: the name is the one the certificate
    check compares (server_hostname), and OpenSSL fails ``smarthost.example.net.``."""
    if host.endswith("."):
        raise ControlError(
            f"{origin}: relay {host!r} ends with a dot: write the host name without it"
        )
    return host


def parse_port(text: str, origin: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ControlError(f"{origin}: port must be a number, got {text!r}") from None
    if not 0 < port < 65536:
        raise ControlError(f"{origin}: port {port} out of range 1..65535")
    return port


def _virtualdomains(lines: list[Line]) -> dict[str, str]:
    """``key:prefix`` lines -> {lower-cased key: prefix}."""
    virtual: dict[str, str] = {}
    for line in lines:
        text = line.text.strip()
        key, sep, prefix = text.rpartition(":")
        if not sep or not key:
            raise ControlError(f"{line.where}: expected domain:prefix, got {text!r}")
        virtual[key.lower()] = prefix
    return virtual


virtualdomains = _virtualdomains  # pyqmail-smtpd reads the file too (pyqmail.checks.recipients)


def _relay_auth(lines: list[Line]) -> dict[str, tuple[str, str]]:
    """``relay:user:password`` lines -> {lower-cased relay: (user, password)}."""
    auth: dict[str, tuple[str, str]] = {}
    for line in lines:
        host, rest = _bracketed(line.text.strip(), line.where)
        host = _relay_host(host, line.where)
        user, sep, password = rest.partition(":")
        if not host or not user or not sep or not password:
            raise ControlError(f"{line.where}: expected relay:user:password")
        auth[host.lower()] = (user, password)
    return auth


def _routes(lines: list[Line], auth: dict[str, tuple[str, str]]) -> dict[str, Route]:
    """``domain:relay[:port]`` lines -> {lower-cased domain: Route with its credentials}."""
    routes: dict[str, Route] = {}
    for line in lines:
        text = line.text.strip()
        domain, sep, rest = text.partition(":")
        if not sep:
            raise ControlError(f"{line.where}: expected domain:relay[:port], got {text!r}")
        host, port_text = _bracketed(rest, line.where)
        host = _relay_host(host, line.where)
        port = parse_port(port_text, line.where) if port_text else 25
        user, password = auth.get(host.lower(), ("", ""))
        routes[domain.lower()] = Route(host, port, user, password)
    return routes


@dataclass
class Control:
    """The delivery side's view of ``<root>/control``; ``load`` validates everything."""

    root: Path
    me: str
    locals: frozenset[str]
    virtualdomains: dict[str, str]
    concurrencylocal: int = 10
    concurrencyremote: int = 20
    concurrencydestination: int = 5
    queuelifetime: int = 604800
    bouncefrom: str = "MAILER-DAEMON"
    bouncehost: str = ""
    doublebounceto: str = "postmaster"
    doublebouncehost: str = ""
    helohost: str = ""
    maxhops: int = DEFAULT_MAXHOPS
    timeoutconnect: int = 60
    timeoutremote: int = 1200
    routes: dict[str, Route] = field(default_factory=dict)

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def alias_dir(self) -> Path:
        return self.root / "alias"

    @property
    def mailboxes_file(self) -> Path:
        return self.root / "users" / "mailboxes"

    @classmethod
    def load(cls, root: str | os.PathLike[str], *, relay_auth: bool = True) -> Control:
        """Read the control files. ``relay_auth=False`` leaves out ``smtproutes-auth``
        (the routes then carry no credentials): pyqmail-sendmail runs as users who may
        not read it and needs no route."""
        root = Path(root)
        c = root / "control"
        me = table.ME.read(c)
        auth = _relay_auth(table.SMTPROUTES_AUTH.read(c)) if relay_auth else {}
        return cls(
            root=root,
            me=me,
            locals=table.LOCALS.read(c) or frozenset({me}),
            virtualdomains=_virtualdomains(table.VIRTUALDOMAINS.read(c)),
            concurrencylocal=table.CONCURRENCYLOCAL.read(c),
            concurrencyremote=table.CONCURRENCYREMOTE.read(c),
            concurrencydestination=table.CONCURRENCYDESTINATION.read(c),
            queuelifetime=table.QUEUELIFETIME.read(c),
            bouncefrom=table.BOUNCEFROM.read(c, me),
            bouncehost=table.BOUNCEHOST.read(c, me),
            doublebounceto=table.DOUBLEBOUNCETO.read(c, me),
            doublebouncehost=table.DOUBLEBOUNCEHOST.read(c, me),
            helohost=table.HELOHOST.read(c, me),
            maxhops=table.MAXHOPS.read(c),
            timeoutconnect=table.TIMEOUTCONNECT.read(c),
            timeoutremote=table.TIMEOUTREMOTE.read(c),
            routes=_routes(table.SMTPROUTES.read(c), auth),
        )

    def route(self, domain: str) -> Route:
        """qmail-remote's smtproutes search: exact, then ``.parent`` suffixes, then default."""
        domain = domain.lower()
        if domain in self.routes:
            return self.routes[domain]
        parts = domain.split(".")
        for i in range(1, len(parts)):
            suffix = "." + ".".join(parts[i:])
            if suffix in self.routes:
                return self.routes[suffix]
        return self.routes.get("", Route())

    def is_local(self, address: str) -> str | None:
        """The local address to deliver ``address`` as, or None when it goes remote."""
        local, domain = split_address(address)
        if not domain or domain in self.locals:
            return local
        prefix = self.virtualdomains.get(f"{local.lower()}@{domain}")
        if prefix is None:
            prefix = self.virtualdomains.get(domain)
        if prefix is None:
            parts = domain.split(".")
            for i in range(1, len(parts)):
                prefix = self.virtualdomains.get("." + ".".join(parts[i:]))
                if prefix is not None:
                    break
        if not prefix:
            return None
        return f"{prefix}-{local}"
