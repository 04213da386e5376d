"""Every control file pyqmail reads: name -> parser -> default -> which daemons read it.

The readers (``pyqmail.control.smtpd`` for pyqmail-smtpd, ``pyqmail.control.send`` for
pyqmail-send, ``pyqmail.smtpd.knobs``) take each value from an entry here, so a file cannot
mean one thing to one daemon and another to the other; the role's reload routing
(``roles/pyqmail/vars/main.yml``, ``pyqmail__reload_routes``) is tested
against ``TABLE`` (``tests/unit/test_role_reload_handlers.py``): a change to a file reloads
exactly the daemons listed in ``readers``.

``me`` -- decided here for both daemons (they used to disagree):

- **required**. qmail-send needs it (``locals`` and the bounce hosts default to it; without
  it and without ``locals`` it does not start), qmail-remote needs it for ``helohost``, and
  qmail-smtpd dies with "unable to read controls" when neither ``smtpgreeting`` nor ``me``
  exists (``control_rldef(&greeting, "control/smtpgreeting", 1, 0)``). qmail's install
  writes it (``config-fast``); so does the role. pyqmail-smtpd used to fall back to the
  machine's FQDN: a listener greeting with a guessed name while pyqmail-send refuses to
  start on the same root helps nobody. Missing or empty: ``ControlError`` in both.
- **a host name**, lower-cased: a carriage return (or any control character, blank or
  invalid label) is refused by both. qmail strips only blanks, tabs and the newline, so a
  DOS line end would end up in the greeting, in every Received line and in bounces.

Defaults marked ``me`` are the value of ``me``. ``pyqmail-sendmail`` reads pyqmail-send's
files (``Control.load(relay_auth=False)``) once per message; it needs no reload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pyqmail.control import parsers
from pyqmail.control.reader import ControlError, Line, read_line, read_lines
from pyqmail.headers import DEFAULT_MAXHOPS

SMTPD: Final = "smtpd"
SEND: Final = "send"
BOTH: Final = frozenset({SMTPD, SEND})
_SMTPD: Final = frozenset({SMTPD})
_SEND: Final = frozenset({SEND})


@dataclass(frozen=True)
class ControlFile:
    """One control file: its name, the daemons that read it, its documented default."""

    name: str
    readers: frozenset[str]
    default: str  # as documented: "0", "me", "(none)"
    doc: str


@dataclass(frozen=True)
class Number(ControlFile):
    """A single non-negative integer in ``minimum..maximum``; absent: ``value``."""

    value: int = 0
    minimum: int = 0
    maximum: int = parsers.INT_MAX

    def read(self, control: Path) -> int:
        line = read_line(control / self.name)
        if line is None:
            return self.value
        return parsers.integer(line, self.minimum, self.maximum)


@dataclass(frozen=True)
class HostName(ControlFile):
    """``me``: required, a host name."""

    def read(self, control: Path) -> str:
        path = control / self.name
        line = read_line(path)
        if line is None or not line.text.strip():
            raise ControlError(f"{path}: missing or empty; it must name this host")
        return parsers.host_name(line)


@dataclass(frozen=True)
class Text(ControlFile):
    """One line of printable text; absent: ``value`` (``None``: the value of ``me``).

    ``empty`` says what a present file without a value line means: ``"error"``,
    ``"default"`` (as if absent) or ``"value"`` (the empty string is the value)."""

    value: str | None = None
    empty: Literal["error", "default", "value"] = "default"

    def read(self, control: Path, me: str) -> str:
        line = read_line(control / self.name)
        default = me if self.value is None else self.value
        if line is None:
            return default
        if not line.text.strip():
            if self.empty == "error":
                raise ControlError(f"{line.where}: file is empty")
            return default if self.empty == "default" else ""
        return parsers.printable(line)


@dataclass(frozen=True)
class Domains(ControlFile):
    """Domain names, one per line; absent: ``None`` (the reader decides what that means)."""

    wildcard: bool = False

    def read(self, control: Path) -> frozenset[str] | None:
        lines = read_lines(control / self.name)
        return None if lines is None else parsers.domains(lines, wildcard=self.wildcard)


@dataclass(frozen=True)
class LineSet(ControlFile):
    """A set of entries, one per line, checked by ``parse``; absent: ``None``."""

    parse: Callable[[list[Line]], frozenset[str]] = parsers.identities

    def read(self, control: Path) -> frozenset[str] | None:
        lines = read_lines(control / self.name)
        return None if lines is None else self.parse(lines)


@dataclass(frozen=True)
class Lines(ControlFile):
    """Lines with a syntax of their own, parsed by the reader named in ``doc``; absent: []."""

    def read(self, control: Path) -> list[Line]:
        return read_lines(control / self.name) or []


@dataclass(frozen=True)
class Loaded(ControlFile):
    """A file (or directory) not made of lines: PEM, the user database, TLS pins. Loaded by
    the module named in ``doc``; listed here for the reload routing."""


def _smtpd_number(
    name: str, value: int, doc: str, lo: int = 0, hi: int = parsers.INT_MAX
) -> Number:
    return Number(name, _SMTPD, str(value), doc, value, lo, hi)


def _send_number(name: str, value: int, doc: str, lo: int, hi: int) -> Number:
    return Number(name, _SEND, str(value), doc, value, lo, hi)


ME: Final = HostName("me", BOTH, "(required)", "this host's name")
LOCALS: Final = Domains("locals", BOTH, "me", "domains delivered locally")
MAXHOPS: Final = Number(
    "maxhops", BOTH, str(DEFAULT_MAXHOPS), "Received/Delivered-To lines allowed",
    DEFAULT_MAXHOPS, 1, 10000,
)  # fmt: skip

# pyqmail-smtpd (pyqmail.control.smtpd)
SMTPGREETING: Final = Text("smtpgreeting", _SMTPD, "me", "text after 220", None, "error")
RCPTHOSTS: Final = Domains("rcpthosts", _SMTPD, "(none)", "domains accepted", wildcard=True)
DATABYTES: Final = _smtpd_number("databytes", 0, "maximum message size, 0 = unlimited")
MAXRCPT: Final = _smtpd_number("maxrcpt", 0, "maximum recipients, 0 = unlimited")
TIMEOUTSMTPD: Final = _smtpd_number("timeoutsmtpd", 300, "seconds to make progress", 1)
TIMEOUTTLS: Final = _smtpd_number("timeouttls", 30, "seconds for a TLS handshake", 1)
TIMEOUTDATA: Final = _smtpd_number("timeoutdata", 3600, "seconds for a DATA phase", 1)
TIMEOUTTERM: Final = _smtpd_number("timeoutterm", 10, "seconds to finish after TERM")
MAXCONNIP: Final = _smtpd_number("maxconnip", 50, "connections per client", 1)
MAXCONN: Final = _smtpd_number("maxconn", 1000, "connections per listener", 1)
MAXERRORS: Final = _smtpd_number("maxerrors", 10, "protocol errors per session", 1)
COMMITDELAY: Final = _smtpd_number("commitdelay", 10, "group commit wait (ms)", 0, 1000)
AUTHLOCKFAILS: Final = _smtpd_number("authlockfails", 10, "AUTH failures that lock", 0, 1000)
AUTHLOCKTIME: Final = _smtpd_number("authlocktime", 600, "AUTH lock seconds", 1, 86400)
AUTHCONCURRENCY: Final = _smtpd_number("authconcurrency", 2, "password checks at once", 1, 64)
TLSCLIENTS: Final = LineSet("tlsclients", _SMTPD, "(none)", "identities that may relay")
VALIDRCPTTO: Final = LineSet(
    "validrcptto", _SMTPD, "(none)", "valid local recipients", parsers.recipients
)
RCPTCHECK: Final = _smtpd_number("rcptcheck", 1, "refuse unknown local recipients", 0, 1)
RCPTCATCHALL: Final = Domains(
    "rcptcatchall", _SMTPD, "(none)", "local domains accepting every local part"
)
SERVERCERT: Final = Loaded("servercert.pem", _SMTPD, "(none)", "pyqmail.tls.server_context")
CLIENTCA: Final = Loaded("clientca.pem", _SMTPD, "(none)", "pyqmail.tls.server_context")
SMTPUSERS: Final = Loaded("smtpusers", _SMTPD, "(none)", "pyqmail.authdb.AuthDB")

# pyqmail-smtpd's session knobs (pyqmail.smtpd.knobs)
AUTHHEADER: Final = _smtpd_number("authheader", 0, "AUTH login in Received", 0, 1)
MAXJUNK: Final = _smtpd_number("maxjunk", 100, "junk commands before errors")
GREETDELAY: Final = _smtpd_number("greetdelay", 0, "seconds before the greeting", 0, 60)
TIMEOUTSTRESS: Final = _smtpd_number("timeoutstress", 10, "idle seconds under stress", 1)
STRESSPERCENT: Final = _smtpd_number("stresspercent", 80, "stress threshold (%)", 1, 100)
AUTHMSGSPERHOUR: Final = _smtpd_number(
    "authmsgsperhour", 200, "messages per AUTH login and hour, 0 = no limit", 0, 10**6
)
AUTHRCPTSPERHOUR: Final = _smtpd_number(
    "authrcptsperhour", 1000, "recipients per AUTH login and hour, 0 = no limit", 0, 10**7
)

# pyqmail-smtpd's blocklists and greylisting (pyqmail.checks.dnsbl, pyqmail.checks.greylist)
DNSBL: Final = Lines("dnsbl", _SMTPD, "(none)", "pyqmail.checks.dnsbl: zone[=weight] lines")
DNSWL: Final = Lines("dnswl", _SMTPD, "(none)", "pyqmail.checks.dnsbl: allow list zones")
DNSBLTHRESHOLD: Final = _smtpd_number("dnsblthreshold", 1, "list weights that refuse", 1, 1000)
DNSBLTIMEOUT: Final = _smtpd_number("dnsbltimeout", 5, "seconds for a client's lookups", 1, 60)
DNSBLTEMPFAIL: Final = _smtpd_number("dnsbltempfail", 0, "1: 451 when a list fails", 0, 1)
GREYLISTDELAY: Final = _smtpd_number("greylistdelay", 0, "greylist seconds, 0 = off", 0, 86400)
GREYLISTLIFETIME: Final = _smtpd_number(
    "greylistlifetime", 2_592_000, "seconds a triplet is kept", 60, 31_536_000
)

# pyqmail-smtpd's inbound authentication checks (pyqmail.checks.settings)
AUTHCHECKS: Final = _smtpd_number("authchecks", 0, "SPF/DKIM/DMARC on inbound mail", 0, 1)
AUTHTIMEOUT: Final = _smtpd_number("authtimeout", 10, "seconds for a message's checks", 1, 60)
AUTHSERVID: Final = Lines("authservid", _SMTPD, "me", "pyqmail.checks.settings")
DMARCREJECT: Final = Lines("dmarcreject", _SMTPD, "reject", "pyqmail.checks.settings")
DMARCQUARANTINE: Final = Lines("dmarcquarantine", _SMTPD, "quarantine", "pyqmail.checks.settings")
DNSRESOLVER: Final = Lines("dnsresolver", _SMTPD, "(system)", "pyqmail.checks.settings")

# pyqmail-smtpd's content scanners (pyqmail.scan.settings)
RSPAMD: Final = Lines("rspamd", _SMTPD, "(none)", "pyqmail.scan.settings: rspamd's address")
CLAMD: Final = Lines("clamd", _SMTPD, "(none)", "pyqmail.scan.settings: clamd's address")
SCANTIMEOUT: Final = _smtpd_number("scantimeout", 20, "seconds for a message's scans", 1, 300)
SCANTEMPFAIL: Final = _smtpd_number("scantempfail", 1, "1: 451 when a scanner fails", 0, 1)
SCANCLIENTS: Final = Lines("scanclients", _SMTPD, "inbound", "pyqmail.scan.settings")
RSPAMDACTIONS: Final = Lines("rspamdactions", _SMTPD, "(defaults)", "pyqmail.scan.settings")
# Bytes a scanner must take beyond rspamdmaxsize/clamdmaxsize, which are compared with what
# the client sent (pyqmail.scan.stage): the copy it is sent carries our Received field (under
# 1 KiB) and Authentication-Results, one result per DKIM-Signature field, at most
# dkimverify.MAX_HEADER_FIELDS (1,000) of them, some 50 bytes each: under 100 KiB. The role
# sets the scanners' own limits that much higher (pyqmail_scanners__headroom); the defaults
# here are the scanners' own defaults (rspamd's max_message, clamd's StreamMaxLength) less it.
SCANNER_HEADROOM: Final = 1_048_576
RSPAMDMAXSIZE: Final = _smtpd_number(
    "rspamdmaxsize",
    52_428_800 - SCANNER_HEADROOM,
    "larger messages are not spam-scanned",
    1,
    parsers.INT_MAX,
)
CLAMDMAXSIZE: Final = _smtpd_number(
    "clamdmaxsize",
    104_857_600 - SCANNER_HEADROOM,
    "larger messages are not virus-scanned",
    1,
    parsers.INT_MAX,
)

# pyqmail-send (pyqmail.control.send); virtualdomains is read by pyqmail-smtpd too
# (pyqmail.checks.recipients: which recipients are local)
CONCURRENCYLOCAL: Final = _send_number("concurrencylocal", 10, "local deliveries", 1, 1000)
CONCURRENCYREMOTE: Final = _send_number("concurrencyremote", 20, "remote deliveries", 1, 1000)
CONCURRENCYDESTINATION: Final = _send_number(
    "concurrencydestination", 5, "remote deliveries to one destination", 1, 1000
)
QUEUELIFETIME: Final = _send_number("queuelifetime", 604800, "seconds in the queue", 0, 10**9)
TIMEOUTCONNECT: Final = _send_number("timeoutconnect", 60, "seconds to connect", 1, 3600)
TIMEOUTREMOTE: Final = _send_number("timeoutremote", 1200, "seconds per reply", 1, 86400)
BOUNCEFROM: Final = Text("bouncefrom", _SEND, "MAILER-DAEMON", "bounce author", "MAILER-DAEMON")
BOUNCEHOST: Final = Text("bouncehost", _SEND, "me", "its domain")
DOUBLEBOUNCETO: Final = Text(
    "doublebounceto", _SEND, "postmaster", "empty = drop", "postmaster", "value"
)
DOUBLEBOUNCEHOST: Final = Text("doublebouncehost", _SEND, "me", "its domain")
HELOHOST: Final = Text("helohost", _SEND, "me", "name sent in EHLO")
VIRTUALDOMAINS: Final = Lines("virtualdomains", BOTH, "(none)", "pyqmail.control.send")
SMTPROUTES: Final = Lines("smtproutes", _SEND, "(none)", "pyqmail.control.send.Route")
SMTPROUTES_AUTH: Final = Lines("smtproutes-auth", _SEND, "(none)", "pyqmail.control.send.Route")
CLIENTCERT: Final = Loaded("clientcert.pem", _SEND, "(none)", "pyqmail.send.remote")
TLSHOSTS: Final = Loaded("tlshosts", _SEND, "(none)", "pyqmail.send.remote (<fqdn>.pem pins)")
DKIMKEYS: Final = Lines("dkimkeys", _SEND, "(none)", "pyqmail.dkim.keys")

TABLE: Final[dict[str, ControlFile]] = {
    entry.name: entry
    for entry in [value for value in list(globals().values()) if isinstance(value, ControlFile)]
}


def readers(name: str) -> frozenset[str]:
    """The daemons that read control file ``name`` (empty: none, e.g. a misspelled name)."""
    entry = TABLE.get(name)
    return entry.readers if entry is not None else frozenset()
