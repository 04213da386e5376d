"""The AUTH check of pyqmail-smtpd: from the core's ``AuthRequest`` to a verdict.

Why its own module: a session only hands over the request and waits for an ``Outcome``;
which users exist (``UsersCache``, re-read when control/smtpusers changes), how a password
or a CRAM-MD5 response is verified (``verify_auth``, in a thread: scrypt is slow on purpose)
and the guessing limits every worker of every listener shares (``authguard``) are decided
here, in one place a reviewer can read without the socket code around it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from pyqmail.authdb import AuthDB
from pyqmail.control import smtpd as configmod
from pyqmail.log import log
from pyqmail.protocol import AuthRequest
from pyqmail.smtpd.authguard import AuthGuard, Outcome
from pyqmail.smtpd.authguard import Settings as AuthSettings
from pyqmail.smtpd.policy import UsersCache


def verify_auth(db: AuthDB | None, req: AuthRequest) -> bool:
    """Runs in a thread: scrypt is slow on purpose."""
    if db is None or not req.username:
        return False
    if req.mechanism == "CRAM-MD5":
        secret = db.cram_secret(req.username)
        key = (secret if secret is not None else "unknown user").encode()
        expected = hmac.new(key, (req.challenge or "").encode(), hashlib.md5).hexdigest()
        return secret is not None and hmac.compare_digest(expected, (req.response or "").lower())
    return db.verify(req.username, req.password or "")


def auth_settings(cfg: configmod.Config) -> AuthSettings:
    """The AUTH limits' knobs from the control files."""
    return AuthSettings(cfg.authlockfails, cfg.authlocktime, cfg.authconcurrency)


class Authenticator:
    """One worker's AUTH checks: its users and its way to the shared limits (one
    ``AuthGuard`` per worker, shared by all its sessions)."""

    def __init__(self, cfg: configmod.Config) -> None:
        self.users = UsersCache(cfg)
        self.guard = AuthGuard(cfg.root, auth_settings(cfg))  # shared with every listener

    def reload(self, cfg: configmod.Config) -> None:
        """HUP: the users file and the limits of the new configuration, for new attempts."""
        self.users = UsersCache(cfg)
        self.guard.configure(auth_settings(cfg))

    async def check(self, ip: str, req: AuthRequest) -> Outcome:
        """Through the shared AUTH limits (``pyqmail.smtpd.authguard``): one attempt per client
        at a time over every worker and listener, a penalty delay after a failure, locked
        names refused without a password check (the same 535, after the same delay)."""
        db = self.users.current()
        return await self.guard.attempt(ip, req.username, lambda: verify_auth(db, req))

    async def verdict(self, ip: str, port: int, req: AuthRequest) -> Outcome:
        """``check``, and for a failure its ``auth-fail`` line and then its penalty delay:
        what a session waits for before it answers the client."""
        outcome = await self.check(ip, req)
        if not outcome.ok:
            log_auth_fail(
                ip,
                port,
                mech=req.mechanism,
                user=req.username,
                reason=outcome.reason,
                delay=outcome.delay,
            )
            await asyncio.sleep(outcome.delay)
        return outcome

    def shutdown(self) -> None:
        """The worker stops: no new password checks, the state file closed."""
        self.guard.shutdown()


def log_auth_fail(
    ip: str, port: int, *, mech: str, user: str | None, reason: str, delay: float | None = None
) -> None:
    """One ``auth-fail`` line per failed attempt, ``ip=`` first after the event: the
    fixed prefix the fail2ban filter in files/fail2ban matches."""
    log(
        "auth-fail",
        ip=ip,
        port=port,
        mech=mech or "-",
        user=user if user is not None else "-",
        reason=reason,
        delay=None if delay is None else f"{delay:g}",
    )
