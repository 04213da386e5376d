"""The qmail root's control files, as pyqmail-smtpd reads them.

``load(root)`` reads ``<root>/control/*`` once and returns an immutable ``Config``; the
daemon swaps the whole object on HUP, so a session sees one consistent configuration and
a bad new one is reported while the old one stays in force.

Files and defaults (qmail's names and defaults where qmail has the file):

=================  ===========================================================================
``me``             this host's name; default: the machine's FQDN (qmail's install default)
``smtpgreeting``   text after ``220 ``; default ``me``
``rcpthosts``      domains we accept mail for, one per line; ``.example.com`` matches every
                   subdomain (not ``example.com`` itself), as qmail. Absent: NO domain — qmail
                   accepts every recipient without it (an open relay); pyqmail refuses to be one
``locals``         domains delivered locally; default ``me`` (read here only to validate it)
``databytes``      maximum message size in bytes, 0 = unlimited; default 0 (qmail)
``maxrcpt``        maximum recipients per message, 0 = unlimited; default 0 (qmail-maxrcpt)
``maxhops``        most ``Received``/``Delivered-To`` lines a message may arrive with (RFC 5321
                   §6.3; qmail's MAXHOPS); more: ``554 5.4.6``. Default 100, 1..10000
``timeoutsmtpd``   seconds a client may take to make progress; default 300 (Postfix's
                   ``smtpd_timeout`` and RFC 5321's minimum; qmail's 1200 let idle clients
                   hold connections for 20 minutes)
``servercert.pem`` private key, then certificate, then chain (qmail-tls); absent: no TLS
``clientca.pem``   CAs whose client certificates may relay; absent: no certificate requested
``tlsclients``     certificate identities (e-mail, CN or SAN) allowed to relay, one per line
``validrcptto``    valid local recipients (``user@domain`` or ``@domain``), one per line;
                   absent: every recipient in rcpthosts is accepted
``smtpusers``      the SMTP AUTH user database (``pyqmail.authdb``); absent at start: no AUTH.
                   pyqmail-smtpd re-reads it when it changes (no HUP needed)
=================  ===========================================================================

pyqmail's own knobs (no qmail equivalent; the names follow qmail's style):

=================  ===========================================================================
``maxconnip``      simultaneous connections from one IPv4 address or IPv6 /64; default 50
``maxconn``        simultaneous connections per listener; default 1000
``maxerrors``      protocol errors before a session is dropped with 421; default 10
``timeouttls``     seconds for a TLS handshake; default 30
``timeoutdata``    seconds for a whole DATA phase (slow-drip defence); default 3600
``timeoutterm``    seconds sessions get to finish after TERM before ``421``; default 10
``commitdelay``    milliseconds a finished message may wait for others to share its fsyncs
                   (group commit, see ``queue_commit.Committer``); 0 = never wait; default 10,
                   at most 1000
``authlockfails``  failed AUTH for one account name within ``authlocktime`` that lock the
                   name for ``authlocktime`` seconds (``pyqmail.smtpd.authguard``); 0 = no lock;
                   default 10, at most 1000
``authlocktime``   seconds of that window and of the lock (bounded: failures during a lock
                   do not extend it); default 600, 1 to 86400
``authconcurrency`` password checks (scrypt) at once per worker; default 2, 1 to 64
=================  ===========================================================================

Session limits (``authheader``, ``maxjunk``, ``greetdelay``, ``timeoutstress``,
``stresspercent``) are read here too and documented in ``pyqmail.smtpd.knobs``.

Lines starting with ``#`` and blank lines are ignored; trailing blanks are stripped
(qmail's control_readfile). Anything malformed raises ``ConfigError`` naming the file and
line.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyqmail import tls
from pyqmail.authdb import AuthDB, AuthDBError
from pyqmail.headers import DEFAULT_MAXHOPS
from pyqmail.smtpd import knobs as session_knobs

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_INT_MAX = 2**63 - 1


class ConfigError(Exception):
    """A control file is missing, unreadable or malformed; the message names file and line."""


def _where(path: Path, lineno: int | None) -> str:
    return f"{path}:{lineno}" if lineno else str(path)


def is_domain(name: str) -> bool:
    """A DNS host name in lower case: dot-separated LDH labels, at most 253 characters."""
    if not name or len(name) > 253 or name.endswith("."):
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _read_lines(path: Path) -> list[tuple[int, str]] | None:
    """(line number, text) of the meaningful lines, or None if the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{lineno}: not valid UTF-8") from exc
    lines = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if "\r" in line:
            raise ConfigError(f"{path}:{lineno}: carriage return in line (DOS line ends?)")
        if "\x00" in line:
            raise ConfigError(f"{path}:{lineno}: NUL byte in line")
        stripped = line.rstrip(" \t")
        if stripped and not stripped.startswith("#"):
            lines.append((lineno, stripped))
    return lines


def _read_single(path: Path) -> tuple[int, str] | None:
    """The one line of a single-value file (qmail's control_readline)."""
    lines = _read_lines(path)
    if lines is None:
        return None
    if not lines:
        raise ConfigError(f"{path}: file is empty")
    if len(lines) > 1:
        raise ConfigError(f"{path}:{lines[1][0]}: only one line expected")
    return lines[0]


def _read_int(path: Path, default: int, *, minimum: int = 0, maximum: int = _INT_MAX) -> int:
    line = _read_single(path)
    if line is None:
        return default
    lineno, text = line
    if not text.strip().isdigit():
        raise ConfigError(f"{_where(path, lineno)}: not a non-negative integer: {text!r}")
    value = int(text.strip())
    if value < minimum or value > maximum:
        top = "" if maximum == _INT_MAX else f", max {maximum}"
        raise ConfigError(f"{_where(path, lineno)}: {value} is out of range (min {minimum}{top})")
    return value


def _read_domains(path: Path, *, wildcard: bool) -> frozenset[str] | None:
    lines = _read_lines(path)
    if lines is None:
        return None
    domains = set()
    for lineno, text in lines:
        name = text.strip().lower()
        bare = name[1:] if wildcard and name.startswith(".") else name
        if not is_domain(bare):
            raise ConfigError(f"{_where(path, lineno)}: not a valid domain name: {text!r}")
        domains.add(name)
    return frozenset(domains)


def _read_validrcptto(path: Path) -> frozenset[str] | None:
    lines = _read_lines(path)
    if lines is None:
        return None
    entries = set()
    for lineno, text in lines:
        entry = text.strip().lower()
        local, at, domain = entry.rpartition("@")
        if not at or not is_domain(domain) or any(c.isspace() for c in local):
            raise ConfigError(
                f"{_where(path, lineno)}: expected user@domain or @domain, got {text!r}"
            )
        entries.add(entry)
    return frozenset(entries)


def _read_identities(path: Path) -> frozenset[str]:
    lines = _read_lines(path)
    if lines is None:
        return frozenset()
    identities = set()
    for lineno, text in lines:
        ident = text.strip()
        if not ident or any(c.isspace() or not c.isprintable() for c in ident):
            raise ConfigError(f"{_where(path, lineno)}: not a certificate identity: {text!r}")
        identities.add(ident.lower())
    return frozenset(identities)


def domain_of(address: str) -> str:
    """The domain part of an address, lower case; empty if it has none."""
    _local, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


@dataclass(frozen=True, eq=False)
class Config:
    """One consistent snapshot of the control directory."""

    root: Path
    me: str
    greeting: str
    rcpthosts: frozenset[str]
    locals: frozenset[str]
    databytes: int
    maxrcpt: int
    maxhops: int
    timeoutsmtpd: int
    timeouttls: int
    timeoutdata: int
    timeoutterm: int
    maxconnip: int
    maxconn: int
    maxerrors: int
    commitdelay: int  # milliseconds
    authlockfails: int
    authlocktime: int  # seconds
    authconcurrency: int
    servercert: Path | None
    clientca: Path | None
    tlsclients: frozenset[str]
    validrcptto: frozenset[str] | None
    authdb: AuthDB | None
    cram_md5: bool  # some user has a CRAM-MD5 secret: offer the mechanism
    server_tls: ssl.SSLContext | None
    knobs: session_knobs.SessionKnobs

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    def rcpthost(self, domain: str) -> bool:
        """qmail's rcpthosts rule: the exact domain, or ``.suffix`` for any subdomain."""
        domain = domain.lower()
        if domain in self.rcpthosts:
            return True
        dot = domain.find(".")
        while dot >= 0:
            if domain[dot:] in self.rcpthosts:
                return True
            dot = domain.find(".", dot + 1)
        return False

    def address_in_rcpthosts(self, address: str) -> bool:
        """An address without a domain is ours (qmail); otherwise the domain decides."""
        domain = domain_of(address)
        return True if not domain else self.rcpthost(domain)

    def valid_recipient(self) -> Callable[[str], bool] | None:
        """The validrcptto check for the protocol core, or None when the file is absent."""
        valid = self.validrcptto
        if valid is None:
            return None

        def check(address: str) -> bool:
            addr = address.lower()
            domain = domain_of(addr)
            if not domain or not self.rcpthost(domain):
                return True  # relayed mail is the relay rule's business, not validrcptto's
            return addr in valid or "@" + domain in valid

        return check


def default_me() -> str:
    name = socket.getfqdn().lower()
    return name if is_domain(name) else "localhost"


def load(root: str | Path) -> Config:
    """Read and check every control file; raise ConfigError naming the first bad one."""
    root = Path(root)
    control = root / "control"
    if not control.is_dir():
        raise ConfigError(f"{control}: control directory does not exist")

    me_line = _read_single(control / "me")
    if me_line is None:
        me = default_me()
    else:
        me = me_line[1].strip().lower()
        if not is_domain(me):
            raise ConfigError(f"{control / 'me'}:{me_line[0]}: not a valid host name: {me!r}")

    greeting_line = _read_single(control / "smtpgreeting")
    greeting = me if greeting_line is None else greeting_line[1]
    if not greeting.isprintable():
        raise ConfigError(f"{control / 'smtpgreeting'}: contains control characters")

    rcpthosts = _read_domains(control / "rcpthosts", wildcard=True) or frozenset()
    local_domains = _read_domains(control / "locals", wildcard=False) or frozenset({me})

    servercert_path = control / "servercert.pem"
    clientca_path = control / "clientca.pem"
    servercert = servercert_path if servercert_path.exists() else None
    clientca = clientca_path if clientca_path.exists() else None
    server_tls = None
    if servercert is not None:
        try:
            server_tls = tls.server_context(servercert, clientca)
        except tls.TLSConfigError as exc:
            raise ConfigError(str(exc)) from exc
    elif clientca is not None:
        raise ConfigError(f"{clientca}: clientca.pem present but servercert.pem missing")

    authdb = None
    users_path = control / "smtpusers"
    if users_path.exists():
        try:
            authdb = AuthDB.load(str(users_path))
        except AuthDBError as exc:
            raise ConfigError(str(exc)) from exc
        except OSError as exc:
            raise ConfigError(f"{users_path}: cannot read: {exc.strerror}") from exc

    return Config(
        root=root,
        me=me,
        greeting=greeting,
        rcpthosts=rcpthosts,
        locals=local_domains,
        databytes=_read_int(control / "databytes", 0),
        maxrcpt=_read_int(control / "maxrcpt", 0),
        maxhops=_read_int(control / "maxhops", DEFAULT_MAXHOPS, minimum=1, maximum=10000),
        timeoutsmtpd=_read_int(control / "timeoutsmtpd", 300, minimum=1),
        timeouttls=_read_int(control / "timeouttls", 30, minimum=1),
        timeoutdata=_read_int(control / "timeoutdata", 3600, minimum=1),
        timeoutterm=_read_int(control / "timeoutterm", 10),
        maxconnip=_read_int(control / "maxconnip", 50, minimum=1),
        maxconn=_read_int(control / "maxconn", 1000, minimum=1),
        maxerrors=_read_int(control / "maxerrors", 10, minimum=1),
        commitdelay=_read_int(control / "commitdelay", 10, maximum=1000),
        authlockfails=_read_int(control / "authlockfails", 10, maximum=1000),
        authlocktime=_read_int(control / "authlocktime", 600, minimum=1, maximum=86400),
        authconcurrency=_read_int(control / "authconcurrency", 2, minimum=1, maximum=64),
        servercert=servercert,
        clientca=clientca,
        tlsclients=_read_identities(control / "tlsclients"),
        validrcptto=_read_validrcptto(control / "validrcptto"),
        authdb=authdb,
        cram_md5=authdb is not None and any(user.cram for user in authdb),
        server_tls=server_tls,
        knobs=session_knobs.load(control, _read_int),
    )
