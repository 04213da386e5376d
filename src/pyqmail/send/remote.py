"""Remote delivery (qmail-remote with the qmail-tls patch): routes, MX, SMTP, STARTTLS.

Where mail goes and the refusal of every destination that is this host: ``pyqmail.send.mx``.

TLS, per remote host name (``fqdn``: the MX or relay name):

- ``control/tlshosts/<fqdn>.pem`` exists: TLS is required. STARTTLS must be offered and the
  server certificate must verify against that file (and match ``fqdn``); otherwise the
  connection is closed before MAIL FROM and the delivery deferred. Nothing is sent in clear.
- otherwise, STARTTLS offered: TLS is used. The certificate is checked against the system CA
  store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured) and the host name; when it does not
  verify, the message is still sent encrypted over a second connection without verification,
  and the log says ``verified=no`` (the address is remembered for an hour, so later
  deliveries skip the failing first attempt). When STARTTLS is refused or the handshake
  itself fails, the message goes in clear over a fresh connection (opportunistic TLS, as in
  Postfix's ``may`` level); the log says ``tls=none``.
- ``control/clientcert.pem`` (key, then certificate, then chain) is offered when the server
  asks for a client certificate.
- a relay on port 465 gets TLS from the first byte (``pyqmail.send.smtpclient``), with the
  same verification rules and no cleartext fallback.
- AUTH (``smtproutes-auth``) is only ever sent over TLS with a verified or pinned
  certificate; otherwise the delivery is deferred.

Every context comes from ``TlsPolicy`` (``pyqmail.send.tlspolicy``), built with
``pyqmail.tls.client_context`` (Mozilla intermediate: TLS 1.2+, AEAD suites only). A broken
``clientcert.pem`` or pin file defers delivery with a message naming the file.

On the wire: lines end in CRLF (bare CR or LF in a queued message are normalized), lines
starting with ``.`` are dot-stuffed, lines longer than 998 octets are broken with CRLF + space
(Postfix's ``smtp_line_length_limit``; ``pyqmail.wirelines``, which the DKIM signer applies
too), server replies are read up to 64 KiB (``MAX_REPLY``),
``BODY=8BITMIME`` is declared when the message has 8-bit bytes and the server offers it
(otherwise it is sent as is, as qmail does), ``SMTPUTF8`` when an address is not ASCII; a
server without SMTPUTF8 gets no such message (permanent failure, 5.6.7). One connection
carries every job for the same destination the queue manager hands it
(``RemoteSession.deliver`` may be called repeatedly); RSET checks it before each further
job (a failure costs one new connection), and a 421 at any stage ends it (RFC 5321 3.8).
4xx -> temporary, 5xx -> permanent; a 5xx at RCPT stays permanent whatever follows.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pyqmail.control.send import Control
from pyqmail.queue.format import Envelope
from pyqmail.send.delivery import (
    DOUBLE_BOUNCE_SENDER,
    Kind,
    Result,
    one_line,
    split_address,
)
from pyqmail.send.ipme import LocalAddresses
from pyqmail.send.mx import (
    Destination,
    DnsError,
    DnsResolver,
    LoopError,
    Myself,
    Resolver,
    destinations,
)
from pyqmail.send.smtpclient import IMPLICIT_TLS_PORT, SMTPClient
from pyqmail.send.tlspolicy import TlsPolicy
from pyqmail.tls import TLSConfigError
from pyqmail.wirelines import wire_lines

UNVERIFIABLE_TTL = 3600.0


_LOCAL_ADDRESSES = LocalAddresses()
_unverifiable: dict[tuple[str, int], float] = {}
_unverifiable_lock = threading.Lock()


def _known_unverifiable(dest: Destination) -> bool:
    with _unverifiable_lock:
        until = _unverifiable.get((dest.address, dest.port), 0.0)
        return until > time.monotonic()


def _mark_unverifiable(dest: Destination) -> None:
    with _unverifiable_lock:
        _unverifiable[(dest.address, dest.port)] = time.monotonic() + UNVERIFIABLE_TTL


class _FailError(Exception):
    def __init__(self, result: Result) -> None:
        super().__init__(result.detail)
        self.result = result


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return one_line(f"{code} {text}")


def _status_of(code: int, text: str) -> str:
    match = re.match(r"\d{3} ([245])\.(\d{1,3})\.(\d{1,3})\b", text)
    if match:
        return ".".join(match.groups())
    return "5.0.0" if code >= 500 else "4.0.0"


def wire_data(message: bytes) -> bytes:
    """``pyqmail.wirelines.wire_lines`` (CRLF everywhere, no line over 998 octets:
    RFC 5321 4.5.3.1.6, RFC 5322 2.1.1; the bytes a DKIM signature made here covers),
    dot-stuffed, terminated: ready to follow a 354."""
    data = wire_lines(message)
    data = (b"." if data.startswith(b".") else b"") + data.replace(b"\n.", b"\n..")
    return data + b".\r\n"


def needs_smtputf8(env: Envelope, recipients: Sequence[str]) -> bool:
    return (
        not env.sender.isascii()
        or any(not r.isascii() for r in recipients)
        or env.meta.get("smtputf8", "") not in ("", "0", "no")
    )


class RemoteSession:
    """One SMTP connection to one destination, reused for consecutive jobs."""

    def __init__(self, delivery: RemoteDelivery, domain: str) -> None:
        self.delivery = delivery
        self.domain = domain
        self.route = delivery.control.route(domain)
        self.smtp: SMTPClient | None = None
        self.dest: Destination | None = None
        self.tls = "none"
        self.verified = "-"
        self.broken: Result | None = None
        self._used = False  # the connection has carried a transaction: a reused one
        self._dirty = False  # its last transaction did not end with a 250: RSET first

    # -- connection ---------------------------------------------------------------------
    def _result(self, kind: Kind, detail: str, status: str, diagnostic: str = "") -> Result:
        return Result(
            kind,
            detail,
            status,
            str(self.dest) if self.dest else self.domain,
            diagnostic,
            self.tls,
            self.verified,
        )

    def _open(self) -> None:
        control = self.delivery.control
        try:
            dests = destinations(
                self.domain, self.route, self.delivery.resolver, self.delivery.myself
            )
        except DnsError as exc:
            status = exc.status or ("5.4.6" if isinstance(exc, LoopError) else "5.1.2")
            raise _FailError(
                Result.perm(f"{exc} (#{status})", status, remote=self.domain)
                if exc.permanent
                else Result.temp(f"{exc} (#4.4.3)", "4.4.3", remote=self.domain)
            ) from None
        last = Result.temp(f"no usable mail host for {self.domain} (#4.4.1)", "4.4.1")
        for dest in dests:
            self.dest = dest
            pin = self.delivery.tls.pin(dest.fqdn)
            modes = ["pinned"] if pin else ["verify", "none", "plain"]
            if not pin and _known_unverifiable(dest):
                modes = ["none", "plain"]
            if dest.port == IMPLICIT_TLS_PORT:
                modes = [m for m in modes if m != "plain"]  # no cleartext on that port
            for mode in modes:
                try:
                    self._connect(dest, mode, pin, control)
                except _RetryError as exc:
                    last = exc.result
                    continue
                except _FailError as exc:
                    last = exc.result
                    break
                return
        raise _FailError(last)

    def _connect(self, dest: Destination, mode: str, pin: Path | None, control: Control) -> None:
        """Connect and negotiate; _RetryError = try the next TLS mode, _FailError = next host."""
        self.tls, self.verified = "none", "-"
        try:
            implicit = self._implicit_context(dest, mode, pin)
        except TLSConfigError as exc:
            raise _FailError(self._result("temp", f"TLS set-up: {exc} (#4.7.5)", "4.7.5")) from None
        smtp = SMTPClient(dest.address, control.helohost, control.timeoutconnect, implicit)
        try:
            self._negotiate(smtp, dest, mode, pin, control)
        except TLSConfigError as exc:
            _close(smtp)
            raise _FailError(self._result("temp", f"TLS set-up: {exc} (#4.7.5)", "4.7.5")) from None
        except BaseException:
            _close(smtp)
            raise
        self.smtp = smtp

    def _implicit_context(
        self, dest: Destination, mode: str, pin: Path | None
    ) -> ssl.SSLContext | None:
        """The context of TLS from the first byte (port 465), None elsewhere."""
        if dest.port != IMPLICIT_TLS_PORT:
            return None
        tls = self.delivery.tls
        if pin is not None:
            return tls.pinned(pin)
        return tls.verifying() if mode == "verify" else tls.unverified()

    def _negotiate(
        self, smtp: SMTPClient, dest: Destination, mode: str, pin: Path | None, control: Control
    ) -> None:
        where = str(dest)
        code, text = self._greeting(smtp, dest, pin)
        if smtp.sock is not None:
            smtp.sock.settimeout(control.timeoutremote)
        if code != 220:
            if code == 421:
                smtp.close()  # the server is closing the channel (RFC 5321 section 3.8): no QUIT
            raise _FailError(self._result("temp", f"{where} greeted {_reply(code, text)}", "4.4.2"))
        self._hello(smtp, where)
        offers_tls = smtp.has_extn("starttls")
        if isinstance(smtp.sock, ssl.SSLSocket):  # port 465: TLS is up already
            self.tls = smtp.sock.version() or "TLS"
            self.verified = "no" if mode == "none" else "yes"
        elif pin is not None:
            if not offers_tls:
                raise _FailError(
                    self._result(
                        "temp",
                        f"TLS required for {dest.fqdn} (tlshosts) but {where} does not "
                        "offer STARTTLS; nothing sent",
                        "4.7.5",
                    )
                )
            self._starttls(smtp, self.delivery.tls.pinned(pin), where, required=True)
            self.verified = "yes"
        elif mode in ("verify", "none") and offers_tls:
            tls = self.delivery.tls
            ctx = tls.verifying() if mode == "verify" else tls.unverified()
            try:
                self._starttls(smtp, ctx, where, required=False)
            except ssl.SSLCertVerificationError as exc:
                _mark_unverifiable(dest)
                raise _RetryError(
                    self._result("temp", f"{where}: certificate not verified: {exc}", "4.7.5")
                ) from None
            except (ssl.SSLError, OSError, smtplib.SMTPException) as exc:
                raise _RetryError(
                    self._result("temp", f"{where}: TLS handshake failed: {exc}", "4.7.5")
                ) from None
            self.verified = "yes" if mode == "verify" else "no"
        if self.route.user:
            self._auth(smtp, where)

    def _greeting(self, smtp: SMTPClient, dest: Destination, pin: Path | None) -> tuple[int, bytes]:
        """Connect (and, on port 465, shake hands) and read the greeting. A handshake that
        fails tries the next mode, as a failed STARTTLS does, except on a pinned relay."""
        where = str(dest)
        try:
            return smtp.connect(dest.fqdn, dest.port)
        except ssl.SSLCertVerificationError as exc:
            if pin is not None:
                raise self._tls_failed(where, exc) from None
            _mark_unverifiable(dest)
            raise _RetryError(
                self._result("temp", f"{where}: certificate not verified: {exc}", "4.7.5")
            ) from None
        except ssl.SSLError as exc:
            raise _FailError(
                self._result("temp", f"{where}: TLS handshake failed: {exc}", "4.7.5")
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise _FailError(
                self._result("temp", f"cannot connect to {where}: {exc}", "4.4.1")
            ) from None

    def _tls_failed(self, where: str, exc: BaseException) -> _FailError:
        """A required TLS (pinned relay, port 465 or STARTTLS) whose handshake failed."""
        return _FailError(
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
            raise _FailError(
                self._result("temp", f"{where}: lost during EHLO: {exc}", "4.4.2")
            ) from None
        if code != 250:
            if code == 421:
                smtp.close()  # no QUIT either
            raise _FailError(
                self._result("temp", f"{where} refused EHLO/HELO: {_reply(code, text)}", "4.4.2")
            )
        if self.delivery.myself.greeted_by_me(text):
            reply = _reply(code, text.split(b"\n", 1)[0] if isinstance(text, bytes) else text)
            raise _FailError(
                self._result(
                    "perm",
                    f"mail for {self.domain} loops back to myself ({where} answered EHLO "
                    f"with my own name: {reply}) (#5.4.6)",
                    "5.4.6",
                )
            )

    def _starttls(self, smtp: SMTPClient, ctx: ssl.SSLContext, where: str, required: bool) -> None:
        text: bytes | str
        try:
            code, text = smtp.starttls(context=ctx)
        except smtplib.SMTPResponseException as exc:  # smtplib raises on a non-220 reply
            code, text = exc.smtp_code, exc.smtp_error
        except (ssl.SSLError, OSError, smtplib.SMTPException) as exc:
            if required:
                raise self._tls_failed(where, exc) from None
            raise
        if code != 220:
            if required:
                raise _FailError(
                    self._result(
                        "temp",
                        f"TLS required for {where}, STARTTLS refused: {_reply(code, text)}",
                        "4.7.5",
                    )
                )
            raise smtplib.SMTPException(f"STARTTLS refused: {_reply(code, text)}")
        sock = smtp.sock
        self.tls = sock.version() or "TLS" if isinstance(sock, ssl.SSLSocket) else "none"
        self._hello(smtp, where)

    def _auth(self, smtp: SMTPClient, where: str) -> None:
        if self.verified != "yes":
            raise _FailError(
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
            raise _FailError(
                self._result(
                    "temp",
                    f"{where} rejected AUTH: {_reply(exc.smtp_code, exc.smtp_error)}",
                    "4.7.8",
                )
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise _FailError(
                self._result("temp", f"AUTH to {where} failed: {exc}", "4.7.8")
            ) from None

    # -- transactions -------------------------------------------------------------------
    def deliver(self, env: Envelope, message: bytes, recipients: Sequence[str]) -> list[Result]:
        """Send one message to ``recipients`` (all in ``self.domain``); one Result each.

        A server may drop an idle client or refuse more messages on one connection, and that
        must cost a reconnection, not the job (which would wait a whole retry cycle without
        ever having been attempted): on a reused connection, a MAIL that finds it closed or
        gets 421 is tried once more on a new one (``_StaleError``). RSET only follows a
        transaction that did not end with a 250 (a refused RSET costs a reconnection too),
        so a connection that carries message after message pays no extra round trip."""
        if self.smtp is not None and self._dirty and not self._reset(self.smtp):
            _close(self.smtp)
            self._drop()
        try:
            return self._attempt(env, message, recipients)
        except _StaleError:
            if self.smtp is not None:
                _close(self.smtp)
            self._drop()
            return self._attempt(env, message, recipients)

    def _attempt(self, env: Envelope, message: bytes, recipients: Sequence[str]) -> list[Result]:
        """The message on the connection there is, or on a new one."""
        if self.broken is None and self.smtp is None:
            try:
                self._open()
            except _FailError as exc:
                self.broken = exc.result
        if self.smtp is None:
            broken = self.broken or self._result("temp", "not connected", "4.4.1")
            return [broken] * len(recipients)
        reused, self._used, self._dirty = self._used, True, True
        return self._transaction(self.smtp, env, message, recipients, reused=reused)

    def _reset(self, smtp: SMTPClient) -> bool:
        """RSET on a reused connection: False when it is refused or the connection is gone."""
        try:
            code, _ = self._cmd(smtp, "RSET")
        except (OSError, smtplib.SMTPException):
            return False
        return code == 250

    def _drop(self) -> None:
        """Forget the connection (already closed); the next job opens a new one."""
        if self.smtp is not None:
            self.smtp.close()
        self.smtp = None
        self._used = self._dirty = False

    def _cmd(self, smtp: SMTPClient, line: str) -> tuple[int, str]:
        smtp.putcmd(line)
        code, text = smtp.getreply()
        return code, _reply(code, text)

    def _refusal(
        self, smtp: SMTPClient, env: Envelope, message: bytes, recipients: Sequence[str]
    ) -> Result | list[str]:
        """A permanent refusal known before MAIL (SMTPUTF8, SIZE), or MAIL's parameters."""
        utf8 = needs_smtputf8(env, recipients)
        if utf8 and not smtp.has_extn("smtputf8"):
            return self._result(
                "perm",
                f"{self.dest} does not support SMTPUTF8, which this message needs (#5.6.7)",
                "5.6.7",
            )
        params = []
        if smtp.has_extn("size"):
            limit = smtp.esmtp_features.get("size", "").strip()
            if limit.isdigit() and 0 < int(limit) < len(message):
                return self._result(
                    "perm",
                    f"message too big for {self.dest} (limit {limit} bytes) (#5.3.4)",
                    "5.3.4",
                )
            params.append(f"SIZE={len(message)}")
        if smtp.has_extn("8bitmime") and not message.isascii():
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        smtp.command_encoding = "utf-8" if utf8 else "ascii"
        return params

    def _transaction(
        self,
        smtp: SMTPClient,
        env: Envelope,
        message: bytes,
        recipients: Sequence[str],
        *,
        reused: bool = False,
    ) -> list[Result]:
        """One message; a recipient refused with 5xx at RCPT stays refused (permanent) whatever
        happens to the connection afterwards, as in qmail-remote."""
        params = self._refusal(smtp, env, message, recipients)
        if isinstance(params, Result):
            return [params] * len(recipients)
        results: list[Result | None] = []
        try:
            final = self._exchange(
                smtp, env, message, recipients, params=params, results=results, reused=reused
            )
        except (OSError, smtplib.SMTPException) as exc:
            self.broken = self._result("temp", f"connection to {self.dest} lost: {exc}", "4.4.2")
            _close(smtp)
            self._drop()
            final = self.broken
        if final is None:  # every recipient refused at RCPT
            return [r for r in results if r is not None]
        rest = [final] * (len(recipients) - len(results))
        return [final if r is None else r for r in results] + rest

    def _exchange(
        self,
        smtp: SMTPClient,
        env: Envelope,
        message: bytes,
        recipients: Sequence[str],
        *,
        params: list[str],
        results: list[Result | None],
        reused: bool,
    ) -> Result | None:
        """MAIL, RCPT (one entry in ``results`` per recipient answered: None if accepted), DATA.

        Returns the result of the recipients accepted and of those never asked (after a 421),
        or None when every recipient was refused. ``_StaleError`` when a reused connection
        turns out closed (or closing: 421) at MAIL, before this message was attempted."""
        sender = "" if env.sender == DOUBLE_BOUNCE_SENDER else env.sender
        mail = f"MAIL FROM:<{sender}>{''.join(' ' + p for p in params)}"
        try:
            code, text = self._cmd(smtp, mail)
        except (OSError, smtplib.SMTPException) as exc:
            if reused:
                raise _StaleError(str(exc)) from None
            raise
        if code == 421 and reused:
            raise _StaleError(text)
        if code != 250:
            return self._answer(code, text, "MAIL FROM")
        for rcpt in recipients:
            code, text = self._cmd(smtp, f"RCPT TO:<{rcpt}>")
            if code in (250, 251):
                results.append(None)
                continue
            answer = self._answer(code, text, "RCPT TO")
            if self.smtp is None:  # 421: this recipient and the rest wait for a new connection
                return answer
            results.append(answer)
        if all(r is not None for r in results):
            return None
        code, text = self._cmd(smtp, "DATA")
        if code != 354:
            return self._answer(code, text, "DATA")
        smtp.send(wire_data(message))
        code, reply = smtp.getreply()
        text = _reply(code, reply)
        if code != 250:
            return self._answer(code, text, "end of DATA")
        self._dirty = False
        return self._result("ok", f"{self.dest} accepted: {text}", "2.0.0", text)

    def _answer(self, code: int, text: str, stage: str) -> Result:
        """The result of a refusal. A 421 also ends the session: the server is closing the
        channel (RFC 5321 section 3.8), so the connection is dropped without QUIT and the
        next job opens a new one instead of failing on the closed socket."""
        if code == 421:
            self._drop()
        detail = f"{self.dest} said at {stage}: {text}"
        kind: Kind = "perm" if 500 <= code < 600 else "temp"
        return self._result(kind, detail, _status_of(code, text), f"smtp; {text}")

    def close(self) -> None:
        if self.smtp is not None:
            _close(self.smtp)
            self.smtp = None


class _StaleError(Exception):
    """A reused connection was found closed at MAIL: the message goes on a new one."""


class _RetryError(_FailError):
    pass


def _close(smtp: SMTPClient) -> None:
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(5)
            smtp.quit()
    except (OSError, smtplib.SMTPException):
        pass
    finally:
        smtp.close()


class RemoteDelivery:
    """Factory of sessions; one per worker per destination key."""

    def __init__(
        self, control: Control, resolver: Resolver | None = None, tls: TlsPolicy | None = None
    ) -> None:
        self.control = control
        self.resolver: Resolver = resolver or DnsResolver()
        self.tls = tls or TlsPolicy(control.control)
        self.myself = Myself.of(control, _LOCAL_ADDRESSES)

    def key(self, recipient: str) -> str:
        """Jobs with the same key may share a connection."""
        domain = split_address(recipient)[1]
        route = self.control.route(domain)
        return route.key or f"mx:{domain}"

    def session(self, domain: str) -> RemoteSession:
        return RemoteSession(self, domain)
