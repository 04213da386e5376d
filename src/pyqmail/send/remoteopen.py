"""Opening the connection of a remote delivery: the addresses in order (``pyqmail.send.mx``,
then ``pyqmail.send.peers``' back-off), for each the TLS mode to start with and where a
failure leads, the greeting, EHLO, STARTTLS, AUTH.

TLS modes, per address: ``pinned`` (``control/tlshosts/<fqdn>.pem``: verify against the pin
or send nothing), ``verify`` (system CAs and the host name), ``none`` (TLS without
verification, ``verified=no``) and ``plain`` (no TLS). Without a pin a connection starts
at ``verify`` and falls back, each time on a new connection:

- the certificate did not verify -> ``none`` (and the address starts there for an hour);
- the handshake failed otherwise (stalled, reset, no common protocol), or the STARTTLS
  reply never came -> ``plain`` at once: ``none`` would do the same handshake again and
  fail the same way, a second full wait for nothing. The address starts at ``plain``
  for an hour (``pyqmail.send.peers``), so the next messages pay no wait at all;
- STARTTLS refused (a 4xx/5xx reply) -> ``plain`` (not remembered: it costs one reply).

A handshake may take ``min(timeoutremote, 300 s)`` (``pyqmail.send.smtpclient``). A pinned
host never falls back and never gets plaintext: a failure defers the mail. Port 465 has no
``plain``: TLS from the first byte, ``verify`` then ``none``.

A route with AUTH (``smtproutes-auth``) has ``verify`` only, and ignores what is remembered
about the address: credentials go only over TLS with a verified certificate, so on such a
route a TLS failure of any kind (no STARTTLS, refused, stalled, a certificate that does not
verify) defers the mail, never sends it in clear or unverified, and the next message tries
verified TLS again.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pyqmail.control.send import Route
from pyqmail.send.delivery import Kind, Result, one_line
from pyqmail.send.mx import Destination, DnsError, LoopError, destinations
from pyqmail.send.smtpclient import GREETING, ConnectError, SMTPClient, SMTPTimeoutError
from pyqmail.tls import TLSConfigError

if TYPE_CHECKING:
    from pyqmail.send.remote import RemoteDelivery


class OpenError(Exception):
    """No connection: ``result`` says why (for every recipient of the job)."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.detail)
        self.result = result


class _RetryError(OpenError):
    """This address again, on a new connection, in TLS mode ``then``."""

    def __init__(self, result: Result, then: str) -> None:
        super().__init__(result)
        self.then = then


@dataclass
class Opened:
    """A connection ready for MAIL, and how it is secured (for the log)."""

    smtp: SMTPClient
    dest: Destination
    tls: str
    verified: str


def reply_text(code: int, text: bytes | str) -> str:
    """A server's reply as one printable line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return one_line(f"{code} {text}")


def close_quietly(smtp: SMTPClient) -> None:
    """QUIT (its reply waited for a few seconds at most), then close, whatever happens."""
    try:
        if smtp.sock is not None:
            smtp.set_deadline(None)
            smtp.quit()
    except (OSError, smtplib.SMTPException):
        pass
    finally:
        smtp.close()


class Opener:
    """Opens one connection for the jobs of ``domain`` (``route``); ``budget``: the seconds
    the delivery may take on it (``smtpclient.delivery_deadline``); ``implicit_port``: the
    port that speaks TLS from the first byte (465)."""

    def __init__(
        self,
        delivery: RemoteDelivery,
        domain: str,
        route: Route,
        *,
        implicit_port: int,
        budget: float,
    ) -> None:
        self.delivery = delivery
        self.domain = domain
        self.route = route
        self.implicit_port = implicit_port
        self.budget = budget
        self.dest: Destination | None = None
        self.tls = "none"
        self.verified = "-"

    def _result(self, kind: Kind, detail: str, status: str) -> Result:
        remote = str(self.dest) if self.dest else self.domain
        return Result(kind, detail, status, remote, "", self.tls, self.verified)

    def open(self) -> Opened:
        """The first address that takes the mail's connection; OpenError with the last
        failure otherwise (DNS, every address failed, or every one resting)."""
        delivery = self.delivery
        try:
            dests = destinations(self.domain, self.route, delivery.resolver, delivery.myself)
        except DnsError as exc:
            status = exc.status or ("5.4.6" if isinstance(exc, LoopError) else "5.1.2")
            raise OpenError(
                Result.perm(f"{exc} (#{status})", status, remote=self.domain)
                if exc.permanent
                else Result.temp(f"{exc} (#4.4.3)", "4.4.3", remote=self.domain)
            ) from None
        tries, resting = delivery.peers.order(dests)
        last = self._not_tried(resting)
        for dest in tries:
            self.dest = dest
            try:
                return self._try(dest)
            except OpenError as exc:
                last = exc.result
        raise OpenError(last)

    def _not_tried(self, resting: list[Destination]) -> Result:
        """The result when no address is tried: all of them rest after a timeout."""
        if not resting:
            return Result.temp(f"no usable mail host for {self.domain} (#4.4.1)", "4.4.1")
        peers = self.delivery.peers
        names = ", ".join(f"{d} (again in {peers.resting(d):.0f} s)" for d in resting)
        return Result.temp(
            f"not tried: every address of {self.domain} timed out recently, connecting or "
            f"waiting for the greeting, and rests for a while (tcpto): {names} (#4.4.1)",
            "4.4.1",
            remote=str(resting[0]),
        )

    def _try(self, dest: Destination) -> Opened:
        """``dest`` in its first TLS mode, then in those failures lead to."""
        pin = self.delivery.tls.pin(dest.fqdn)
        modes = self._modes(dest, pin)
        mode = modes[0]
        while True:
            try:
                return self._connect(dest, mode, pin)
            except _RetryError as exc:
                if exc.then not in modes:
                    raise OpenError(self._no_fallback(exc.result)) from None
                mode = exc.then

    def _no_fallback(self, result: Result) -> Result:
        """A TLS failure the route allows no fallback from; on an AUTH route the detail
        says why (a pin says so in its own words already)."""
        if not self.route.user:
            return result
        why = (
            "; no fallback on a route with AUTH: credentials are only sent over TLS with a "
            "verified or pinned certificate"
        )
        return replace(result, detail=result.detail + why)

    def _modes(self, dest: Destination, pin: Path | None) -> list[str]:
        """The TLS modes ``dest`` may be tried in, the first one first. An AUTH route gets
        ``verify`` alone, whatever the address's memories say: AUTH goes only over
        verified TLS (``_auth``), so unverified TLS or plaintext could only end in a
        deferral, and starting there because of an earlier failure (a stalled handshake
        an hour ago) would defer every message of that hour without trying TLS again."""
        peers = self.delivery.peers
        if pin is not None:
            return ["pinned"]
        if self.route.user:
            return ["verify"]
        if dest.port == self.implicit_port:  # no cleartext on that port
            return ["none"] if peers.unverifiable(dest) else ["verify", "none"]
        if peers.tls_failed(dest):
            return ["plain"]
        return ["none", "plain"] if peers.unverifiable(dest) else ["verify", "none", "plain"]

    def _connect(self, dest: Destination, mode: str, pin: Path | None) -> Opened:
        """Connect and negotiate; _RetryError = this address in another mode, OpenError =
        the next address."""
        control = self.delivery.control
        self.tls, self.verified = "none", "-"
        try:
            implicit = self._implicit_context(dest, mode, pin)
        except TLSConfigError as exc:
            raise OpenError(self._result("temp", f"TLS set-up: {exc} (#4.7.5)", "4.7.5")) from None
        smtp = SMTPClient(
            dest.address,
            control.helohost,
            control.timeoutconnect,
            implicit,
            reply_timeout=control.timeoutremote,
        )
        smtp.set_deadline(self.budget)
        try:
            self._negotiate(smtp, dest, mode, pin)
        except TLSConfigError as exc:
            close_quietly(smtp)
            raise OpenError(self._result("temp", f"TLS set-up: {exc} (#4.7.5)", "4.7.5")) from None
        except BaseException:
            close_quietly(smtp)
            raise
        return Opened(smtp, dest, self.tls, self.verified)

    def _implicit_context(
        self, dest: Destination, mode: str, pin: Path | None
    ) -> ssl.SSLContext | None:
        """The context of TLS from the first byte (port 465), None elsewhere."""
        if dest.port != self.implicit_port:
            return None
        tls = self.delivery.tls
        if pin is not None:
            return tls.pinned(pin)
        return tls.verifying() if mode == "verify" else tls.unverified()

    def _negotiate(self, smtp: SMTPClient, dest: Destination, mode: str, pin: Path | None) -> None:
        where = str(dest)
        code, text = self._greeting(smtp, dest, pin)
        if code != 220:
            if code == 421:
                smtp.close()  # the server is closing the channel (RFC 5321 section 3.8): no QUIT
            detail = f"{where} greeted {reply_text(code, text)}"
            raise OpenError(self._result("temp", detail, "4.4.2"))
        self._hello(smtp, where)
        offers_tls = smtp.has_extn("starttls")
        if isinstance(smtp.sock, ssl.SSLSocket):  # port 465: TLS is up already
            self.tls = smtp.sock.version() or "TLS"
            self.verified = "no" if mode == "none" else "yes"
        elif pin is not None:
            if not offers_tls:
                raise OpenError(
                    self._result(
                        "temp",
                        f"TLS required for {dest.fqdn} (tlshosts) but {where} does not "
                        "offer STARTTLS; nothing sent",
                        "4.7.5",
                    )
                )
            self._pinned_tls(smtp, self.delivery.tls.pinned(pin), where)
        elif mode in ("verify", "none") and offers_tls:
            self._opportunistic_tls(smtp, dest, mode)
        if self.route.user:
            self._auth(smtp, where)

    def _greeting(self, smtp: SMTPClient, dest: Destination, pin: Path | None) -> tuple[int, bytes]:
        """Connect (and, on port 465, shake hands) and read the greeting. A handshake that
        fails tries the next mode, as a failed STARTTLS does, except on a pinned relay. An
        address that cannot be reached, or sends no greeting, is remembered (tcpto)."""
        where = str(dest)
        peers = self.delivery.peers
        started = peers.now()
        try:
            reply = smtp.connect(dest.fqdn, dest.port)
        except ConnectError as exc:
            peers.connect_failed(dest, timed_out=exc.timed_out, started=started)
            raise OpenError(
                self._result("temp", f"cannot connect to {where}: {exc}", "4.4.1")
            ) from None
        except ssl.SSLCertVerificationError as exc:
            if pin is not None:
                raise self._tls_failed(where, exc) from None
            peers.mark_unverifiable(dest)
            detail = f"{where}: certificate not verified: {exc}"
            raise _RetryError(self._result("temp", detail, "4.7.5"), then="none") from None
        except SMTPTimeoutError as exc:
            if exc.what != GREETING:  # the handshake on port 465
                detail = f"{where}: TLS handshake failed: {exc}"
                raise OpenError(self._result("temp", detail, "4.7.5")) from None
            peers.connect_failed(dest, timed_out=True, started=started)
            raise OpenError(self._result("temp", f"{where}: {exc}", "4.4.1")) from None
        except ssl.SSLError as exc:
            detail = f"{where}: TLS handshake failed: {exc}"
            raise OpenError(self._result("temp", detail, "4.7.5")) from None
        except (OSError, smtplib.SMTPException) as exc:
            detail = f"{where}: no greeting: {exc}"
            raise OpenError(self._result("temp", detail, "4.4.2")) from None
        peers.connected(dest)
        return reply

    def _tls_failed(self, where: str, exc: BaseException) -> OpenError:
        """A required TLS (pinned relay, port 465 or STARTTLS) whose handshake failed."""
        return OpenError(
            self._result(
                "temp", f"TLS required for {where} but it failed: {exc}; nothing sent", "4.7.5"
            )
        )

    def _hello(self, smtp: SMTPClient, where: str) -> None:
        try:
            code, text = smtp.ehlo()
            if code not in (250, 421):  # after a 421 the server is gone: no HELO
                code, text = smtp.helo()
        except (OSError, smtplib.SMTPException) as exc:
            lost = "" if isinstance(exc, SMTPTimeoutError) else "lost during EHLO: "
            raise OpenError(self._result("temp", f"{where}: {lost}{exc}", "4.4.2")) from None
        if code != 250:
            if code == 421:
                smtp.close()  # no QUIT either
            detail = f"{where} refused EHLO/HELO: {reply_text(code, text)}"
            raise OpenError(self._result("temp", detail, "4.4.2"))
        if self.delivery.myself.greeted_by_me(text):
            reply = reply_text(code, text.split(b"\n", 1)[0])
            raise OpenError(
                self._result(
                    "perm",
                    f"mail for {self.domain} loops back to myself ({where} answered EHLO "
                    f"with my own name: {reply}) (#5.4.6)",
                    "5.4.6",
                )
            )

    def _pinned_tls(self, smtp: SMTPClient, ctx: ssl.SSLContext, where: str) -> None:
        """STARTTLS to a ``tlshosts`` host: any failure defers, nothing is sent in clear."""
        try:
            code, text = smtp.start_tls(ctx)
        except (OSError, smtplib.SMTPException) as exc:  # ssl.SSLError is an OSError
            raise self._tls_failed(where, exc) from None
        if code != 220:
            detail = f"TLS required for {where}, STARTTLS refused: {reply_text(code, text)}"
            raise OpenError(self._result("temp", detail, "4.7.5"))
        self._secured(smtp, where)
        self.verified = "yes"

    def _opportunistic_tls(self, smtp: SMTPClient, dest: Destination, mode: str) -> None:
        """STARTTLS without a pin; a failure tries the address again in the mode it leads
        to (the module's docstring), and a failed handshake is remembered."""
        where = str(dest)
        tls, peers = self.delivery.tls, self.delivery.peers
        ctx = tls.verifying() if mode == "verify" else tls.unverified()
        try:
            code, text = smtp.start_tls(ctx)
        except ssl.SSLCertVerificationError as exc:
            peers.mark_unverifiable(dest)
            detail = f"{where}: certificate not verified: {exc}"
            raise _RetryError(self._result("temp", detail, "4.7.5"), then="none") from None
        except (OSError, smtplib.SMTPException) as exc:
            peers.mark_tls_failed(dest)
            detail = f"{where}: TLS handshake failed: {exc}"
            raise _RetryError(self._result("temp", detail, "4.7.5"), then="plain") from None
        if code != 220:
            detail = f"{where}: STARTTLS refused: {reply_text(code, text)}"
            raise _RetryError(self._result("temp", detail, "4.7.5"), then="plain")
        self._secured(smtp, where)
        self.verified = "yes" if mode == "verify" else "no"

    def _secured(self, smtp: SMTPClient, where: str) -> None:
        """TLS is up: its version for the log, and EHLO again (RFC 3207 4.2)."""
        sock = smtp.sock
        self.tls = sock.version() or "TLS" if isinstance(sock, ssl.SSLSocket) else "none"
        self._hello(smtp, where)

    def _auth(self, smtp: SMTPClient, where: str) -> None:
        if self.verified != "yes":
            raise OpenError(
                self._result(
                    "temp",
                    f"AUTH to {where} refused: credentials are only sent over TLS with a "
                    "verified or pinned certificate",
                    "4.7.5",
                )
            )
        try:
            smtp.login(self.route.user, self.route.password)
        except smtplib.SMTPAuthenticationError as exc:
            raise OpenError(
                self._result(
                    "temp",
                    f"{where} rejected AUTH: {reply_text(exc.smtp_code, exc.smtp_error)}",
                    "4.7.8",
                )
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise OpenError(
                self._result("temp", f"AUTH to {where} failed: {exc}", "4.7.8")
            ) from None
