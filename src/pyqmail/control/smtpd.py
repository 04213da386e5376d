"""The qmail root's control files, as pyqmail-smtpd reads them.

``load(root)`` reads ``<root>/control/*`` once and returns an immutable ``Config``; the
daemon swaps the whole object on HUP, so a session sees one consistent configuration and
a bad new one is reported while the old one stays in force.

Files and defaults (qmail's names and defaults where qmail has the file):

=================  ===========================================================================
``me``             this host's name; required (as by pyqmail-send: ``pyqmail.control.table``)
``smtpgreeting``   text after ``220 ``; default ``me``
``rcpthosts``      domains we accept mail for, one per line; ``.example.com`` matches every
                   subdomain (not ``example.com`` itself), as qmail. Absent: NO domain — qmail
                   accepts every recipient without it (an open relay); pyqmail refuses to be one
``locals``         domains delivered locally; default ``me`` (read here to validate it and
                   to deliver a bare ``RCPT TO:<postmaster>`` to one of them)
``databytes``      maximum message size in bytes, 0 = unlimited; default 0 (qmail); either
                   way no more than the queue holds (``queue.store.MAX_MESSAGE``, 2 GiB)
``maxrcpt``        maximum recipients per message, 0 = unlimited; default 0 (qmail-maxrcpt)
``maxhops``        most ``Received``/``Delivered-To`` lines a message may arrive with (RFC 5321
                   §6.3; qmail's MAXHOPS); more: ``554 5.4.6``. Default 100, 1..10000
``timeoutsmtpd``   seconds a client may take to make progress; default 300 (Postfix's
                   ``smtpd_timeout`` and RFC 5321's minimum; qmail's 1200 let idle clients
                   hold connections for 20 minutes)
``servercert.pem`` private key, then certificate, then chain (qmail-tls); absent: no TLS
``clientca.pem``   CAs whose client certificates may relay; absent: no certificate requested
``tlsclients``     certificate identities (e-mail, CN or SAN) allowed to relay, one per line
``validrcptto``    valid recipients (``user@domain`` or ``@domain``), one per line, accepted
                   besides the local addresses below; alone (``rcptcheck`` 0) the whole list
                   for every rcpthosts domain. Absent: no list
``rcptcheck``      1 (default): refuse a recipient local delivery would not find with ``550
                   5.1.1`` at RCPT (``pyqmail.checks.recipients``: ``locals`` and
                   ``virtualdomains``, ``users/mailboxes``, ``alias/.qmail-*``); 0: accept it
                   (and bounce it later)
``rcptcatchall``   local domains that accept every local part at RCPT (opt-in catch-all)
``virtualdomains`` read as pyqmail-send reads it (``pyqmail.control.send``), to tell which
                   recipients are local
``smtpusers``      the SMTP AUTH user database (``pyqmail.authdb``); absent at start: no AUTH.
                   pyqmail-smtpd re-reads it when it changes (no HUP needed)
=================  ===========================================================================

pyqmail's own knobs (no qmail equivalent; the names follow qmail's style):

=================  ===========================================================================
``maxconnip``      simultaneous connections from one IPv4 address or IPv6 /64; default 50
``maxconn``        simultaneous connections per listener; default 1000
``maxerrors``      protocol errors before a session is dropped with 421; default 10 (what
                   counts, junk and deferred RCPTs past their margins included:
                   ``pyqmail.protocol.tally``)
``timeouttls``     seconds for a TLS handshake; default 30
``timeoutdata``    seconds for a whole DATA phase (slow-drip defence); default 3600
``timeoutterm``    seconds sessions get to finish after TERM before ``421``; default 10
``commitdelay``    milliseconds a finished message may wait for others to share its fsyncs
                   (group commit, see ``queue_commit.Committer``); 0 = never wait; default 10,
                   at most 1000
``authlockfails``  failed logins for one account name within ``authlocktime`` that lock the
                   name for ``authlocktime`` seconds (``pyqmail.authlock``: SMTP AUTH, IMAP and
                   POP3 together; pyqmail-checkpassword reads both files at each login); 0 = no
                   lock; default 10, at most 1000
``authlocktime``   seconds of that window and of the lock (bounded: failures during a lock
                   do not extend it); default 600, 1 to 86400
``authconcurrency`` password checks (scrypt) at once per worker; default 2, 1 to 64
=================  ===========================================================================

Session limits (``authheader``, ``maxjunk``, ``greetdelay``, ``timeoutstress``,
``stresspercent``) are read here too and documented in ``pyqmail.smtpd.knobs``; so are the
blocklists and greylisting (``dnsbl``, ``dnswl``, ``dnsresolver``, ``dnsblthreshold``,
``dnsbltimeout``, ``dnsbltempfail``, ``greylistdelay``, ``greylistlifetime``), documented
in ``pyqmail.checks.dnsbl`` and ``pyqmail.checks.greylist``.
inbound authentication checks' files (``authchecks``, ``authservid``, ``dmarcreject``,
``dmarcquarantine``, ``authtimeout``, ``dnsresolver``: ``pyqmail.checks.settings``).
The content scanners' files (``rspamd``, ``clamd``, ``scantimeout``, ``scantempfail``,
``scanclients``, ``rspamdactions``, ``rspamdmaxsize``, ``clamdmaxsize``) are documented in
``pyqmail.scan.settings``.

Every file is read by ``pyqmail.control.reader`` (qmail's control_readline/readfile:
``#`` and blank lines ignored, trailing blanks stripped) and parsed as
``pyqmail.control.table`` says, the same table pyqmail-send's reader uses. Anything
malformed raises ``ControlError`` (alias ``ConfigError``) naming the file and line.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail import tls
from pyqmail.authdb import AuthDB, AuthDBError
from pyqmail.checks import recipients
from pyqmail.checks import screen as checks_screen
from pyqmail.checks import settings as auth_settings
from pyqmail.checks.recipients import LocalRecipients
from pyqmail.control import send as send_control
from pyqmail.control import table
from pyqmail.control.parsers import is_domain
from pyqmail.control.reader import ControlError
from pyqmail.scan import settings as scan_settings
from pyqmail.smtpd import knobs as session_knobs

ConfigError = ControlError  # the one error type of every control-file reader (old name)

__all__ = ["Config", "ConfigError", "ControlError", "domain_of", "is_domain", "load"]


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
    recipients: LocalRecipients | None  # None: rcptcheck 0
    delivery: send_control.Control  # locals and virtualdomains, as pyqmail-send reads them
    authdb: AuthDB | None
    cram_md5: bool  # some user has a CRAM-MD5 secret: offer the mechanism
    server_tls: ssl.SSLContext | None
    knobs: session_knobs.SessionKnobs
    screen: checks_screen.Settings  # blocklists and greylisting (pyqmail.checks)
    auth: auth_settings.AuthSettings = field(default_factory=auth_settings.AuthSettings)
    scan: scan_settings.ScanSettings = field(default_factory=scan_settings.ScanSettings)

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

    @property
    def postmaster_domain(self) -> str:
        """The domain of a bare ``RCPT TO:<postmaster>``: ``me`` when it is delivered
        here, else the first of ``locals`` (sorted: the file's order is not kept), so that
        pyqmail-send delivers it locally instead of finding it "loops back to myself"."""
        return self.me if self.me in self.locals else min(self.locals)

    def address_in_rcpthosts(self, address: str) -> bool:
        """An address without a domain is ours (qmail); otherwise the domain decides."""
        domain = domain_of(address)
        return True if not domain else self.rcpthost(domain)

    def valid_recipient(self) -> Callable[[str], str] | None:
        """The recipient check (``pyqmail.checks.recipients.judge``): the refusal's reason
        or "" for an address; None when neither ``rcptcheck`` nor ``validrcptto`` is on."""
        valid, local = self.validrcptto, self.recipients
        if valid is None and local is None:
            return None
        delivery = self.delivery
        return lambda address: recipients.judge(address, self.rcpthost, valid, local, delivery)


def _tls(control: Path) -> tuple[Path | None, Path | None, ssl.SSLContext | None]:
    """servercert.pem (and clientca.pem) into the server TLS context; none without a cert."""
    servercert_path = control / table.SERVERCERT.name
    clientca_path = control / table.CLIENTCA.name
    servercert = servercert_path if servercert_path.exists() else None
    clientca = clientca_path if clientca_path.exists() else None
    if servercert is None:
        if clientca is not None:
            raise ConfigError(f"{clientca}: clientca.pem present but servercert.pem missing")
        return None, None, None
    try:
        return servercert, clientca, tls.server_context(servercert, clientca)
    except tls.TLSConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _authdb(control: Path) -> AuthDB | None:
    """control/smtpusers, or None (no AUTH) when it does not exist."""
    users_path = control / table.SMTPUSERS.name
    if not users_path.exists():
        return None
    try:
        return AuthDB.load(str(users_path))
    except AuthDBError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise ConfigError(f"{users_path}: cannot read: {exc.strerror}") from exc


def _delivery(root: Path, me: str, local_domains: frozenset[str]) -> send_control.Control:
    """Which recipients are delivered here (``locals``, ``virtualdomains``), as pyqmail-send
    decides; a malformed ``virtualdomains`` fails here as it fails pyqmail-send."""
    virtual = send_control.virtualdomains(table.VIRTUALDOMAINS.read(root / "control"))
    return send_control.Control(root=root, me=me, locals=local_domains, virtualdomains=virtual)


def _recipients(root: Path, delivery: send_control.Control) -> LocalRecipients | None:
    """The local recipient check, as ``rcptcheck`` and ``rcptcatchall`` say."""
    c = root / "control"
    if table.RCPTCHECK.read(c) == 0:
        return None
    catchall = table.RCPTCATCHALL.read(c) or frozenset()
    for domain in sorted(catchall):
        if delivery.is_local(f"postmaster@{domain}") is None:
            raise ConfigError(
                f"{c / table.RCPTCATCHALL.name}: {domain} is not a local domain (locals or "
                "virtualdomains); a catch-all there would accept what the next hop refuses"
            )
    return LocalRecipients(root, delivery, catchall)


def inbound(mode: str) -> bool:
    """Whether a pyqmail-smtpd listener in ``mode`` takes mail from clients that neither
    log in nor relay: only ``smtp`` (smtps and submission want one of the two at MAIL),
    so only it runs the blocklists and the authentication checks."""
    return mode == "smtp"


def load(root: str | Path, *, inbound: bool = True) -> Config:
    """Read and check every control file; raise ConfigError naming the first bad one.

    ``inbound`` False: for a listener that takes mail only from logins and relay clients
    (smtps and submission, where MAIL needs one: RFC 8314), on which the blocklists and
    the authentication checks never run. Their files are read and checked all the same,
    but the checks stay off, so their libraries are not loaded (``pyqmail.checks.libraries``)."""
    root = Path(root)
    c = root / "control"
    if not c.is_dir():
        raise ConfigError(f"{c}: control directory does not exist")
    me = table.ME.read(c)
    greeting = table.SMTPGREETING.read(c, me)
    rcpthosts = table.RCPTHOSTS.read(c) or frozenset()
    local_domains = table.LOCALS.read(c) or frozenset({me})
    delivery = _delivery(root, me, local_domains)
    servercert, clientca, server_tls = _tls(c)
    authdb = _authdb(c)
    return Config(
        root=root,
        me=me,
        greeting=greeting,
        rcpthosts=rcpthosts,
        locals=local_domains,
        databytes=table.DATABYTES.read(c),
        maxrcpt=table.MAXRCPT.read(c),
        maxhops=table.MAXHOPS.read(c),
        timeoutsmtpd=table.TIMEOUTSMTPD.read(c),
        timeouttls=table.TIMEOUTTLS.read(c),
        timeoutdata=table.TIMEOUTDATA.read(c),
        timeoutterm=table.TIMEOUTTERM.read(c),
        maxconnip=table.MAXCONNIP.read(c),
        maxconn=table.MAXCONN.read(c),
        maxerrors=table.MAXERRORS.read(c),
        commitdelay=table.COMMITDELAY.read(c),
        authlockfails=table.AUTHLOCKFAILS.read(c),
        authlocktime=table.AUTHLOCKTIME.read(c),
        authconcurrency=table.AUTHCONCURRENCY.read(c),
        servercert=servercert,
        clientca=clientca,
        tlsclients=table.TLSCLIENTS.read(c) or frozenset(),
        validrcptto=table.VALIDRCPTTO.read(c),
        recipients=_recipients(root, delivery),
        delivery=delivery,
        authdb=authdb,
        cram_md5=authdb is not None and any(user.cram for user in authdb),
        server_tls=server_tls,
        knobs=session_knobs.load(c),
        screen=checks_screen.load(c, lookups=inbound),
        auth=auth_settings.load(c, me, inbound=inbound),
        scan=scan_settings.load(c),
    )
