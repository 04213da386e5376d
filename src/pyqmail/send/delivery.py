"""What every part of pyqmail-send shares: control files, delivery outcomes, addresses.

Control files read by the delivery side (``<root>/control/``; first line only unless noted,
``#`` lines and blank lines ignored in the multi-line files):

=====================  ===========================================================
``me``                 this host's name (required)
``locals``             domains delivered locally, one per line (default: ``me``)
``virtualdomains``     ``domain:prefix``, ``.suffix:prefix`` or ``user@domain:prefix``:
                       ``local@domain`` is delivered as the local address
                       ``prefix-local`` (qmail semantics; an empty prefix is an exception)
``concurrencylocal``   parallel local deliveries (default 10)
``concurrencyremote``  parallel remote SMTP connections (default 20)
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
``timeoutremote``      seconds to wait for each SMTP reply (default 1200)
``smtproutes``         ``domain:relay[:port]`` lines, see ``Route``
``smtproutes-auth``    ``relay:user:password`` lines (mode 0400 pyqmails:root: the manager's
                       user alone reads it), see ``Route``
``clientcert.pem``     private key then certificate (then chain), offered when asked
``tlshosts/<fqdn>.pem``  TLS required to that host, its certificate must verify against it
=====================  ===========================================================
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyqmail.headers import DEFAULT_MAXHOPS

Kind = Literal["ok", "temp", "perm"]
DOUBLE_BOUNCE_SENDER = "#@[]"


class ControlError(Exception):
    """A control file is unreadable or malformed; the message names file and line."""


@dataclass(frozen=True)
class Result:
    """The outcome of one delivery attempt to one recipient."""

    kind: Kind
    detail: str
    status: str = ""  # RFC 3463 enhanced status, e.g. 5.1.1
    remote: str = "local"  # host that answered, for the log and the DSN Remote-MTA
    diagnostic: str = ""  # DSN Diagnostic-Code, e.g. "smtp; 550 5.1.1 unknown user"
    tls: str = "-"
    verified: str = "-"

    @classmethod
    def ok(cls, detail: str, **kw: str) -> Result:
        return cls("ok", detail, kw.pop("status", "2.0.0"), **kw)

    @classmethod
    def temp(cls, detail: str, status: str = "4.0.0", **kw: str) -> Result:
        return cls("temp", detail, status, **kw)

    @classmethod
    def perm(cls, detail: str, status: str = "5.0.0", **kw: str) -> Result:
        return cls("perm", detail, status, **kw)


def one_line(text: str, limit: int = 400) -> str:
    """Make remote-controlled text safe for a log line or a header: no control characters."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(cleaned.split())[:limit]


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, lowercased domain); no ``@`` -> (address, "")."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower()


@dataclass(frozen=True)
class Route:
    """Where mail for a domain goes: ``host`` empty means MX lookup.

    ``smtproutes`` lines are qmail's: ``domain:relay[:port]``; ``.example.com:relay``
    matches every subdomain; ``:relay`` is the default route; an empty relay means "use MX".
    IPv6 relays are bracketed: ``example.com:[2001:db8::1]:587``.
    ``smtproutes-auth`` lines are ``relay:user:password`` (the password is the rest of the
    line, so it may contain ``:``); the credentials are used for that relay only, and only
    after STARTTLS succeeded with a certificate that verified (system CAs, or the relay's
    ``tlshosts/<relay>.pem`` pin); otherwise the delivery is deferred.
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


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlError(f"{path}: cannot read: {exc}") from exc
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append((number, line))
    return out


def _first_line(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlError(f"{path}: cannot read: {exc}") from exc
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def _number(path: Path, default: int, low: int, high: int) -> int:
    value = _first_line(path)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ControlError(f"{path}: expected a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise ControlError(f"{path}: {number} is out of range {low}..{high}")
    return number


def parse_port(text: str, origin: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ControlError(f"{origin}: port must be a number, got {text!r}") from None
    if not 0 < port < 65536:
        raise ControlError(f"{origin}: port {port} out of range 1..65535")
    return port


@dataclass
class Control:
    """The delivery side's view of ``<root>/control``; ``load`` validates everything."""

    root: Path
    me: str
    locals: frozenset[str]
    virtualdomains: dict[str, str]
    concurrencylocal: int = 10
    concurrencyremote: int = 20
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
        me = _first_line(c / "me")
        if not me:
            raise ControlError(f"{c / 'me'}: missing or empty; it must name this host")
        local_domains = frozenset(line.lower() for _, line in _lines(c / "locals")) or frozenset(
            {me.lower()}
        )
        virtual: dict[str, str] = {}
        for number, line in _lines(c / "virtualdomains"):
            key, sep, prefix = line.rpartition(":")
            if not sep or not key:
                raise ControlError(
                    f"{c / 'virtualdomains'}:{number}: expected domain:prefix, got {line!r}"
                )
            virtual[key.lower()] = prefix
        routes: dict[str, Route] = {}
        auth: dict[str, tuple[str, str]] = {}
        for number, line in _lines(c / "smtproutes-auth") if relay_auth else []:
            origin = f"{c / 'smtproutes-auth'}:{number}"
            host, rest = _bracketed(line, origin)
            user, sep, password = rest.partition(":")
            if not host or not user or not sep or not password:
                raise ControlError(f"{origin}: expected relay:user:password")
            auth[host.lower()] = (user, password)
        for number, line in _lines(c / "smtproutes"):
            origin = f"{c / 'smtproutes'}:{number}"
            domain, sep, rest = line.partition(":")
            if not sep:
                raise ControlError(f"{origin}: expected domain:relay[:port], got {line!r}")
            host, port_text = _bracketed(rest, origin)
            port = parse_port(port_text, origin) if port_text else 25
            user, password = auth.get(host.lower(), ("", ""))
            routes[domain.lower()] = Route(host, port, user, password)
        return cls(
            root=root,
            me=me,
            locals=local_domains,
            virtualdomains=virtual,
            concurrencylocal=_number(c / "concurrencylocal", 10, 1, 1000),
            concurrencyremote=_number(c / "concurrencyremote", 20, 1, 1000),
            queuelifetime=_number(c / "queuelifetime", 604800, 0, 10**9),
            bouncefrom=_first_line(c / "bouncefrom") or "MAILER-DAEMON",
            bouncehost=_first_line(c / "bouncehost") or me,
            doublebounceto=_opt(_first_line(c / "doublebounceto"), "postmaster"),
            doublebouncehost=_first_line(c / "doublebouncehost") or me,
            helohost=_first_line(c / "helohost") or me,
            maxhops=_number(c / "maxhops", DEFAULT_MAXHOPS, 1, 10000),
            timeoutconnect=_number(c / "timeoutconnect", 60, 1, 3600),
            timeoutremote=_number(c / "timeoutremote", 1200, 1, 86400),
            routes=routes,
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


def _opt(value: str | None, default: str) -> str:
    """doublebounceto: absent -> default; present but empty -> '' (drop double bounces)."""
    return default if value is None else value


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
