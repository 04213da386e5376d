"""Per-client policy of pyqmail-smtpd: the rules and users caches, and the core's Policy.

Why its own module: what a client may do (relay, AUTH, STARTTLS required, message size) is
decided once per connection from three inputs, and this is where they meet: the listener
mode, the tcprules entry that matched the client's address (``RulesCache``, re-read when
the cdb changes, as tcpserver opens it per connection) and the control files. The users
database (``UsersCache``) is re-read when control/smtpusers changes, as qmail's
checkpassword reads its file per AUTH.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pyqmail.authdb import AuthDB, AuthDBError
from pyqmail.checks import greet
from pyqmail.control import smtpd as configmod
from pyqmail.control.check import load_rules
from pyqmail.control.reader import file_stamp
from pyqmail.log import log
from pyqmail.protocol import Policy
from pyqmail.queue.store import MAX_MESSAGE
from pyqmail.rules import Rules

if TYPE_CHECKING:
    from pyqmail.smtpd.senders import SenderRules


class UsersCache:
    """control/smtpusers as of now: a changed file is re-read at the next AUTH, so a new
    password or a removed user takes effect at once, as with qmail's checkpassword. A
    broken new file keeps the users loaded before (and is logged). Whether AUTH is offered
    at all is decided at start and on HUP."""

    def __init__(self, cfg: configmod.Config) -> None:
        self.path = cfg.control / "smtpusers"
        self.db = cfg.authdb
        self._stamp = file_stamp(self.path)

    def current(self) -> AuthDB | None:
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return self.db
        self._stamp = stamp
        if stamp is None:  # the file was removed: nobody may log in any more
            self.db = AuthDB() if self.db is not None else None
            return self.db
        try:
            self.db = AuthDB.load(str(self.path))
        except AuthDBError as exc:
            log("warning", text=f"{exc}; keeping the users loaded before")
        return self.db


class RulesCache:
    """The rules cdb, re-read when the file changes (tcpserver reads it per connection)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._rules: Rules | None = None
        self._stamp: tuple[int, int, int] | None = None
        if path is not None:
            self._rules, self._stamp = self._read(path)

    @staticmethod
    def _read(path: Path) -> tuple[Rules, tuple[int, int, int]]:
        """The rules and the stamp they were read at; ``ConfigError`` as ``--check`` says it
        (a cdb with host-name rules whose libraries cannot be loaded is one)."""
        try:
            st = path.stat()
        except OSError as exc:
            raise configmod.ConfigError(f"{path}: cannot read rules: {exc.strerror}") from exc
        return load_rules(path), (st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> None:
        """Re-read if changed; a broken new file keeps the old rules (and is logged)."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except OSError as exc:
            log("warning", text=f"{self.path}: {exc.strerror}; keeping the loaded rules")
            return
        if (st.st_ino, st.st_size, st.st_mtime_ns) == self._stamp:
            return
        try:
            self._rules, self._stamp = self._read(self.path)
        except configmod.ConfigError as exc:
            self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)  # log once per change
            log("warning", text=f"{exc}; keeping the loaded rules")

    def current(self) -> Rules | None:
        """The rules as of now (None: no cdb, every client is allowed as it is)."""
        self.refresh()
        return self._rules


# --- per-connection policy ---------------------------------------------------------------


def _env_flag(env: Mapping[str, str], name: str) -> bool | None:
    """A rule's ``NAME=1`` switch: True, False (any other value) or None (not set)."""
    value = env.get(name)
    return None if value is None else value.strip() == "1"


def _env_int(env: Mapping[str, str], name: str, default: int, ip: str) -> int:
    """A rule's number; a malformed one is logged and the control file's value used."""
    value = env.get(name)
    if value is None:
        return default
    if value.strip().isdigit():
        return int(value.strip())
    log("warning", ip=ip, text=f"rule sets {name}={value!r}, not a number; using {default}")
    return default


def _databytes(limit: int) -> int:
    """databytes (0: unlimited, as in qmail) within what the queue can hold and deliver
    (``MAX_MESSAGE``): a larger message gets 552 instead of a 250 for a file that pickup
    would set aside as too large."""
    return min(limit, MAX_MESSAGE) if limit > 0 else MAX_MESSAGE


def auth_mechanisms(cfg: configmod.Config) -> tuple[str, ...]:
    """PLAIN and LOGIN with a user database; CRAM-MD5 too once any user has its secret."""
    if cfg.authdb is None:
        return ()
    return ("PLAIN", "LOGIN", "CRAM-MD5") if cfg.cram_md5 else ("PLAIN", "LOGIN")


def build_policy(
    cfg: configmod.Config,
    mode: str,
    ip: str,
    env: Mapping[str, str],
    senders: SenderRules | None = None,
    *,
    screen: Callable[[str, str | None], str | None] | None = None,
    host: str | None = None,
) -> Policy:
    """The listener mode and the client's rule environment, as the core's Policy;
    ``senders`` holds authenticated sessions to their addresses and sending limits,
    ``screen`` the other clients to the blocklists and greylisting (``pyqmail.checks``);
    ``host``: the client's forward-confirmed name, for the Received header (looked up only
    for a rules cdb with host names: ``pyqmail.smtpd.remotehost``)."""
    relay = "RELAYCLIENT" in env
    smtpauth = _env_flag(env, "SMTPAUTH")
    forcetls = _env_flag(env, "FORCETLS")
    if mode == "smtp":
        auth_on = smtpauth is True
        force_tls = forcetls is True
    else:
        auth_on = smtpauth is not False
        force_tls = mode == "submission" and forcetls is not False
    return Policy(
        hostname=cfg.me,
        greeting=f"{cfg.greeting} ESMTP",  # qmail's 220 line
        client_ip=ip,
        client_host=host,
        tls_active=mode == "smtps",
        starttls_available=mode != "smtps" and cfg.server_tls is not None,
        auth_mechanisms=auth_mechanisms(cfg) if auth_on else (),
        force_tls=force_tls,  # fail closed: FORCETLS without a certificate refuses MAIL
        auth_required=mode != "smtp" and not relay,  # 465 is submission too (RFC 8314)
        relay_client=relay,
        bare_lf=_env_flag(env, "BARELF") is True,
        databytes=_databytes(_env_int(env, "DATABYTES", cfg.databytes, ip)),
        maxrcpt=_env_int(env, "MAXRCPT", cfg.maxrcpt, ip),
        maxhops=cfg.maxhops,
        rcpthosts=cfg.rcpthost,
        validrcptto=_rcpt_check(cfg, ip),
        max_errors=cfg.maxerrors,
        max_junk=cfg.knobs.max_junk,
        postmaster_domain=cfg.postmaster_domain,
        auth_header=cfg.knobs.auth_header,
        notice=lambda event, text: log(event, ip=ip, text=text),
        sender_check=None if senders is None else lambda login, addr: senders.mail(login, addr, ip),
        rcpt_check=None if senders is None else lambda login, n: senders.rcpt(login, n, ip),
        screen=screen,
    )


def _rcpt_check(cfg: configmod.Config, ip: str) -> Callable[[str], bool] | None:
    """The core's recipient check; each refusal logs ``rcpt-refused`` with its reason."""
    judge = cfg.valid_recipient()
    if judge is None:
        return None

    def check(address: str) -> bool:
        reason = judge(address)
        if reason:
            log("rcpt-refused", ip=ip, rcpt=address, status="5.1.1", reason=reason)
        return not reason

    return check


def greet_delay(cfg: configmod.Config, mode: str, env: Mapping[str, str]) -> int:
    """Seconds to hold the greeting back (``pyqmail.checks.greet``)."""
    if greet.bad_value(env.get("GREETDELAY")):
        log("warning", text=f"rule sets GREETDELAY={env['GREETDELAY']!r}, not 0..60; ignored")
    return greet.pause(mode, env, cfg.knobs.greet_delay)


Loader = Callable[[], tuple[configmod.Config, RulesCache]]
"""Loads the configuration and the rules the way the daemon does at start (``cli.load``);
the supervisor and the workers call it again on HUP. Raises ``configmod.ConfigError``."""
