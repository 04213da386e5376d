"""Remote delivery (qmail-remote with the qmail-tls patch): routes, MX, SMTP, STARTTLS.

Where mail goes and the refusal of every destination that is this host: ``pyqmail.send.mx``;
opening the connection (the addresses in order, TLS and its fallbacks, EHLO, AUTH):
``pyqmail.send.remoteopen``; what is remembered about addresses (recent connection
failures, failed STARTTLS handshakes, certificates that did not verify):
``pyqmail.send.peers``; the clock on every wait: ``pyqmail.send.smtpclient``.

TLS, per remote host name (``fqdn``: the MX or relay name):

- ``control/tlshosts/<fqdn>.pem`` exists: TLS is required. STARTTLS must be offered and the
  server certificate must verify against that file (and match ``fqdn``); otherwise the
  connection is closed before MAIL FROM and the delivery deferred. Nothing is sent in clear.
- otherwise, STARTTLS offered: TLS is used. The certificate is checked against the system CA
  store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured) and the host name; when it does not
  verify, the message is still sent encrypted over a second connection without verification,
  and the log says ``verified=no`` (the address is remembered for an hour, so later
  deliveries skip the failing first attempt). When STARTTLS is refused or the handshake
  itself fails (within ``min(timeoutremote, 300 s)``), the message goes in clear over a
  fresh connection (opportunistic TLS, as in Postfix's ``may`` level); the log says
  ``tls=none``. A failed handshake is remembered for an hour too: the next messages to
  that address go in clear at once instead of waiting for the same stall.
- ``control/clientcert.pem`` (key, then certificate, then chain) is offered when the server
  asks for a client certificate.
- a relay on port 465 gets TLS from the first byte (``pyqmail.send.smtpclient``), with the
  same verification rules and no cleartext fallback.
- AUTH (``smtproutes-auth``) is only ever sent over TLS with a verified or pinned
  certificate; otherwise the delivery is deferred. On such a route any TLS failure defers
  (never plaintext), and the failures remembered for the address are ignored: each
  message tries verified TLS again (``pyqmail.send.remoteopen``).
- Other domains' DANE (TLSA) and MTA-STS policies are not looked up or enforced: outbound
  TLS is opportunistic, and required only where a ``tlshosts`` pin says so.

Every context comes from ``TlsPolicy`` (``pyqmail.send.tlspolicy``), built with
``pyqmail.tls.client_context`` (Mozilla intermediate: TLS 1.2+, AEAD suites only). A broken
``clientcert.pem`` or pin file defers delivery with a message naming the file.

On the wire: lines end in CRLF (bare CR or LF in a queued message are normalized), lines
starting with ``.`` are dot-stuffed, lines longer than 998 octets are broken with CRLF + space
(Postfix's ``smtp_line_length_limit``; ``pyqmail.wirelines``, which the DKIM signer applies
too), server replies are read up to 64 KiB (``MAX_REPLY``) and each within
``timeoutremote``, ``BODY=8BITMIME`` is declared when the message has 8-bit bytes and the
server offers it (otherwise it is sent as is, as qmail does), ``SMTPUTF8`` when an address
is not ASCII or the queue meta ``smtputf8`` says so (a bounce with raw UTF-8 in its RFC 6533
global parts, ``pyqmail.send.bounce``; a message received with SMTPUTF8 whose header is not
ASCII; a forward keeps it: ``needs_smtputf8``); a server without SMTPUTF8 gets no such
message (permanent failure, 5.6.7).
One connection carries every job for the same destination the queue manager hands it
(``RemoteSession.deliver`` may be called repeatedly); RSET checks it before each further
job (a failure costs one new connection), and a 421 at any stage ends it (RFC 5321 3.8).
4xx -> temporary, 5xx -> permanent; a 5xx at RCPT stays permanent whatever follows, but a
552 at RCPT is temporary (RFC 5321 4.5.3.1.10), and the recipients refused with 452 or 552
there go in a further transaction on the same connection at once.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Sequence

from pyqmail.control.send import Control
from pyqmail.headers import header_section
from pyqmail.queue.format import Envelope
from pyqmail.send.delivery import DOUBLE_BOUNCE_SENDER, Kind, Result, split_address
from pyqmail.send.ipme import LocalAddresses
from pyqmail.send.mx import Destination, DnsResolver, Myself, Resolver
from pyqmail.send.peers import PeerMemory
from pyqmail.send.remoteopen import Opener, OpenError, close_quietly, reply_text
from pyqmail.send.smtpclient import (
    IMPLICIT_TLS_PORT,
    SMTPClient,
    SMTPTimeoutError,
    delivery_deadline,
)
from pyqmail.send.tlspolicy import TlsPolicy
from pyqmail.wirelines import wire_lines

_RFC_552 = "RFC 5321 4.5.3.1.10"
_LOCAL_ADDRESSES = LocalAddresses()
_PEERS = PeerMemory()  # one per delivery child, shared by its threads and its sessions


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


def needs_smtputf8(env: Envelope, recipients: Sequence[str], message: bytes) -> bool:
    """Whether the message may only travel with SMTPUTF8 (RFC 6531): an address that is not
    ASCII, the meta ``smtputf8`` = 1 (a bounce with UTF-8 in its RFC 6533 global parts), or
    ``client`` (received with MAIL's SMTPUTF8, ``pyqmail.smtpd.intake``) and a header
    section that is not ASCII. A client may ask for SMTPUTF8 on every message; as Postfix
    does, one whose envelope and header are ASCII still goes to a server without it."""
    if not env.sender.isascii() or any(not r.isascii() for r in recipients):
        return True
    flag = env.meta.get("smtputf8", "")
    if flag == "client":
        return not header_section(message, limit=len(message)).isascii()
    return flag not in ("", "0", "no")


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
        self._budget = 0.0  # seconds the current transaction may take (deliver sets it)

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
        """A new connection (``pyqmail.send.remoteopen``); OpenError when there is none."""
        opener = Opener(
            self.delivery,
            self.domain,
            self.route,
            implicit_port=IMPLICIT_TLS_PORT,  # looked up now: the tests move it
            budget=self._budget,
        )
        try:
            opened = opener.open()
        finally:
            self.dest, self.tls, self.verified = opener.dest, opener.tls, opener.verified
        self.smtp = opened.smtp

    # -- transactions -------------------------------------------------------------------
    def deliver(self, env: Envelope, message: bytes, recipients: Sequence[str]) -> list[Result]:
        """Send one message to ``recipients`` (all in ``self.domain``); one Result each.

        A server may drop an idle client or refuse more messages on one connection, and that
        must cost a reconnection, not the job (which would wait a whole retry cycle without
        ever having been attempted): on a reused connection, a MAIL that finds it closed or
        gets 421 is tried once more on a new one (``_StaleError``). RSET only follows a
        transaction that did not end with a 250 (a refused RSET costs a reconnection too),
        so a connection that carries message after message pays no extra round trip.

        Each transaction (with the set-up of the connection it opens) has a deadline up to
        the message's last byte, ``smtpclient.delivery_deadline`` for its recipients; the
        reply to the end of DATA gets its own ``timeoutremote`` beyond it. The deadline
        starts again for each address tried (and each TLS fallback's connection), for the
        new connection after a stale one, and for each further 452/552 transaction
        (``_more``): README's "Outbound delivery: TLS and time limits" sums it up."""
        timeout = self.delivery.control.timeoutremote
        self._budget = delivery_deadline(timeout, len(message), len(recipients))
        if self.smtp is not None:
            self.smtp.set_deadline(self._budget)
        try:
            if self.smtp is not None and self._dirty and not self._reset(self.smtp):
                close_quietly(self.smtp)
                self._drop()
            try:
                return self._attempt(env, message, recipients)
            except _StaleError:
                if self.smtp is not None:
                    close_quietly(self.smtp)
                self._drop()
                return self._attempt(env, message, recipients)
        finally:
            if self.smtp is not None:
                self.smtp.set_deadline(None)  # an idle connection waits for nothing

    def _attempt(self, env: Envelope, message: bytes, recipients: Sequence[str]) -> list[Result]:
        """The message on the connection there is, or on a new one."""
        if self.broken is None and self.smtp is None:
            try:
                self._open()
            except OpenError as exc:
                self.broken = exc.result
        if self.smtp is None:
            broken = self.broken or self._result("temp", "not connected", "4.4.1")
            return [broken] * len(recipients)
        reused, self._used, self._dirty = self._used, True, True
        overflow: list[int] = []
        results = self._transaction(
            self.smtp, env, message, recipients, reused=reused, overflow=overflow
        )
        return self._more(env, message, recipients, results, overflow)

    def _more(
        self,
        env: Envelope,
        message: bytes,
        recipients: Sequence[str],
        results: list[Result],
        overflow: list[int],
    ) -> list[Result]:
        """The recipients refused for their number (452, or 552 taken as 452: RFC 5321
        4.5.3.1.10, "too many recipients") in a further transaction on the same connection,
        at once, as RFC 5321 3.3 suggests, not a retry round later; again while a
        transaction ends with 250 (so each carries at least one recipient: this ends)."""
        timeout = self.delivery.control.timeoutremote
        while overflow and self.smtp is not None and not self._dirty:
            batch = [recipients[i] for i in overflow]
            self.smtp.set_deadline(delivery_deadline(timeout, len(message), len(batch)))
            self._dirty = True
            more: list[int] = []
            for i, result in zip(
                overflow,
                self._transaction(self.smtp, env, message, batch, overflow=more),
                strict=True,
            ):
                results[i] = result
            overflow = [overflow[j] for j in more]
        return results

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
        return code, reply_text(code, text)

    def _refusal(
        self, smtp: SMTPClient, env: Envelope, message: bytes, recipients: Sequence[str]
    ) -> Result | list[str]:
        """A permanent refusal known before MAIL (SMTPUTF8, SIZE), or MAIL's parameters."""
        utf8 = needs_smtputf8(env, recipients, message)
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
        overflow: list[int],
    ) -> list[Result]:
        """One message; a recipient refused with 5xx at RCPT stays refused (permanent) whatever
        happens to the connection afterwards, as in qmail-remote. ``overflow`` gets the
        indexes of the recipients refused for their number."""
        params = self._refusal(smtp, env, message, recipients)
        if isinstance(params, Result):
            return [params] * len(recipients)
        results: list[Result | None] = []
        try:
            final = self._exchange(
                smtp, env, message, recipients, params=params, results=results, reused=reused
            )
        except (OSError, smtplib.SMTPException) as exc:
            if isinstance(exc, SMTPTimeoutError):  # the text says what was waited for
                why = f"{self.dest}: {exc}"
            else:
                why = f"connection to {self.dest} lost: {exc}"
            self.broken = self._result("temp", why, "4.4.2")
            close_quietly(smtp)
            self._drop()
            final = self.broken
        overflow += [i for i, r in enumerate(results) if r is not None and _too_many(r)]
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
        closing = self._recipients(smtp, recipients, results)
        if closing is not None:
            return closing
        if all(r is not None for r in results):
            return None
        code, text = self._cmd(smtp, "DATA")
        if code != 354:
            return self._answer(code, text, "DATA")
        smtp.send_data(wire_data(message))
        code, reply = smtp.getreply()
        text = reply_text(code, reply)
        if code != 250:
            return self._answer(code, text, "end of DATA")
        self._dirty = False
        return self._result("ok", f"{self.dest} accepted: {text}", "2.0.0", text)

    def _recipients(
        self, smtp: SMTPClient, recipients: Sequence[str], results: list[Result | None]
    ) -> Result | None:
        """RCPT for each recipient (its entry in ``results``: None if accepted); the answer
        of a 421, which leaves this recipient and the rest for a new connection."""
        for rcpt in recipients:
            code, text = self._cmd(smtp, f"RCPT TO:<{rcpt}>")
            if code in (250, 251):
                results.append(None)
                continue
            answer = self._answer(code, text, "RCPT TO")
            if self.smtp is None:
                return answer
            results.append(answer)
        return None

    def _answer(self, code: int, text: str, stage: str) -> Result:
        """The result of a refusal. A 421 also ends the session: the server is closing the
        channel (RFC 5321 section 3.8), so the connection is dropped without QUIT and the
        next job opens a new one instead of failing on the closed socket. A 552 at RCPT is
        temporary (RFC 5321 4.5.3.1.10: what old servers answer for too many recipients)."""
        if code == 421:
            self._drop()
        detail = f"{self.dest} said at {stage}: {text}"
        kind: Kind = "perm" if 500 <= code < 600 else "temp"
        status = _status_of(code, text)
        if code == 552 and stage == "RCPT TO":
            kind, status = "temp", "4" + status[1:]
            detail += f" (552 at RCPT is temporary: too many recipients, {_RFC_552})"
        return self._result(kind, detail, status, f"smtp; {text}")

    def close(self) -> None:
        if self.smtp is not None:
            close_quietly(self.smtp)
            self.smtp = None


def _too_many(result: Result) -> bool:
    """A recipient refused for the number of recipients (452, or 552 at RCPT)."""
    return result.kind == "temp" and result.diagnostic.startswith(("smtp; 452", "smtp; 552"))


class _StaleError(Exception):
    """A reused connection was found closed at MAIL: the message goes on a new one."""


class RemoteDelivery:
    """Factory of sessions; one per worker per destination key."""

    def __init__(
        self,
        control: Control,
        resolver: Resolver | None = None,
        tls: TlsPolicy | None = None,
        peers: PeerMemory | None = None,
    ) -> None:
        """``peers``: the memory of troubled addresses; by default the process's own, which
        survives a HUP (a new RemoteDelivery) and is shared by every session."""
        self.control = control
        self.resolver: Resolver = resolver or DnsResolver()
        self.tls = tls or TlsPolicy(control.control)
        self.myself = Myself.of(control, _LOCAL_ADDRESSES)
        self.peers = peers or _PEERS

    def key(self, recipient: str) -> str:
        """Jobs with the same key may share a connection."""
        domain = split_address(recipient)[1]
        route = self.control.route(domain)
        return route.key or f"mx:{domain}"

    def session(self, domain: str) -> RemoteSession:
        return RemoteSession(self, domain)
