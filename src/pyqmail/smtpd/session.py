"""One client connection of pyqmail-smtpd: socket bytes in, protocol events out, and back.

Why this module is only glue: every SMTP decision is made by the sans-I/O core
(``pyqmail.protocol.connection.SMTPConnection``), the TLS byte pumping by ``tlspump``, the
AUTH check by ``auth``, the message's way into the queue by ``intake``. What is left here is
what only the owner of the socket can do: admit or refuse the connection, feed what arrives
to the core, carry out the events it returns, stop reading while we wait (AUTH, commit, a
client that does not read), and the timers (greeting pause, idle, DATA, handshake).

A session sees its worker only through ``SessionContext`` (``context``): the few things it
needs (the configuration of now, the rules, the connection table, the AUTH check, the
queue), so a reader can tell what a session can touch without reading the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any

from pyqmail.checks.screen import Screen
from pyqmail.log import log
from pyqmail.protocol import (
    AuthRejected,
    AuthRequest,
    Close,
    Event,
    MessageAbort,
    MessageData,
    MessageEnd,
    MessageStart,
    Policy,
    ProtocolUsageError,
    Send,
    SMTPConnection,
    StartTLS,
    State,
    TLSInfo,
)
from pyqmail.queue.commit import CommitResult
from pyqmail.queue.format import QueueError
from pyqmail.rules import Decision, Rules
from pyqmail.smtpd import knobs as session_knobs
from pyqmail.smtpd.auth import log_auth_fail
from pyqmail.smtpd.context import SessionContext
from pyqmail.smtpd.intake import Intake
from pyqmail.smtpd.limits import key_bytes
from pyqmail.smtpd.policy import build_policy, greet_delay
from pyqmail.smtpd.tlspump import TLSClosedError, TLSFailedError, TLSPump, quick_ack, tls_text

CLOSE_GRACE = 5.0  # seconds a closing socket gets to flush before it is aborted
TEMPFAIL = "451 4.3.0 queue write failed, try again later"
ALLOWED = Decision(True, {}, None)  # no cdb: every client, as it is (tcpserver without -x)

__all__ = ["CLOSE_GRACE", "Session", "SessionContext"]


class Session(asyncio.BufferedProtocol):
    """Glue between one socket and one SMTPConnection.

    A buffered protocol: the loop reads into the worker's one receive buffer (``get_buffer``)
    instead of allocating a fresh 256 KiB bytes object per read; ``buffer_updated`` copies
    out what arrived."""

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg  # the configuration this session started with
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: SMTPConnection | None = None
        self.policy: Policy | None = None
        self.screen: Screen | None = None  # blocklists and greylisting (pyqmail.checks)
        self.env: Mapping[str, str] = {}  # the client's tcprules environment
        self.ip = "?"
        self.port = 0
        self.host: str | None = None  # forward-confirmed, looked up only for =host rules
        self.early = b""  # what came while the name was looked up (``named``)
        self.paused: set[str] = set()
        self.reading_paused = False  # the transport was told to stop reading (see pause)
        self.tls: TLSPump | None = None  # TLS over memory BIOs on the raw socket
        self.tls_info: TLSInfo | None = None
        self.greet_timer: asyncio.TimerHandle | None = None  # the greeting pause runs
        self.close_timer: asyncio.TimerHandle | None = None
        self.auth_user: str | None = None
        self.intake = Intake(ctx)
        self.conn_key: bytes | None = None  # set while counted in the ConnTable
        self.conn_counted = False
        self.closed = False
        self.closing = False
        self.messages = 0
        self.started = time.monotonic()
        self.deadline = 0.0
        self.data_deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        """Admit the client (rules, then connection limits), then greet it: at once, after
        the greeting pause, or after the handshake on the smtps listener. Where ``=host``
        rules can decide, the client's name comes first: the connection is counted while
        it is looked up (``named``), and what the client sends meanwhile (one read: the
        lazy pause then stops reading) is kept in ``early``; elsewhere no DNS query."""
        # A stream transport (asyncio's, or another loop's that is not a subclass).
        transport: asyncio.Transport = base  # type: ignore[assignment]
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.ip, self.port = str(peer[0]), int(peer[1])
        rules = self.ctx.rules_now()
        if rules is not None and rules.name_matters(self.ip):
            if self._admit(transport):
                self.pause("name")  # not pause_reading: uvloop reads after connection_made
                self.spawn(self.named(rules))
            return
        decision = rules.lookup(self.ip) if rules is not None else ALLOWED
        if not self._denied(decision) and self._admit(transport):
            self.open(decision)

    async def named(self, rules: Rules) -> None:
        """tcpserver's TCPREMOTEHOST (``pyqmail.smtpd.remotehost``), then the rules."""
        self.host = await self.intake.host_name(self.ip)  # rspamd's Hostname too
        if self.closed or self.closing:
            return
        self.resume("name")
        decision = rules.lookup(self.ip, self.host)
        if not self._denied(decision):
            self.open(decision)

    def _denied(self, decision: Decision) -> bool:
        """A deny rule: logged and closed without a word, as tcpserver. (A client counted
        while its name was looked up is uncounted by ``connection_lost``, which logs its
        ``conn`` line.)"""
        if decision.allow or self.transport is None:
            return False
        log("deny", ip=self.ip, port=self.port, rule=decision.key, host=self.host)
        self.closed = True
        self.transport.close()
        return True

    def open(self, decision: Decision) -> None:
        """An admitted client's policy, checks and timers; then the greeting (or TLS). What
        it sent while its name was looked up (``early``) came before any greeting: on smtps
        a ClientHello, else a pregreeter the core refuses, as during the greeting pause."""
        cfg, mode, self.env = self.cfg, self.ctx.mode, decision.env
        early, self.early = self.early, b""
        screen = self.screen = self.ctx.checks.screen(cfg.screen, mode, self.ip, self.env)
        self.policy = build_policy(
            cfg, mode, self.ip, self.env, self.ctx.senders, screen=screen.envelope, host=self.host
        )
        self.intake.connected(cfg.scan, self.ip, self.env, self.policy.relay_client)
        self.touch()
        self.timer = self.loop.call_at(self.deadline, self.on_timer)
        if mode == "smtps":
            self.begin_tls(implicit=True)
            if early:
                self.data_received(early)
            return
        self.conn = SMTPConnection(self.policy)
        delay = greet_delay(cfg, mode, decision.env)
        if early:
            self.handle(self.conn.receive(early))  # held, marked as before the greeting
            self.greet(len(early))
        elif delay or self.screen.task is not None:  # the greeting waits for the lookups
            self.greet_timer = self.loop.call_later(delay, self.greet)
        else:
            self.handle(self.conn.start())

    def _admit(self, transport: asyncio.Transport) -> bool:
        """Count the connection (maxconn, maxconnip); over a limit: 421 and close."""
        cfg = self.cfg
        key = key_bytes(self.ip)
        admission = self.ctx.admit(key, cfg)
        if admission.refused is not None:
            log("refuse", ip=self.ip, port=self.port, reason=admission.refused)
            self.closed = True
            if self.ctx.mode != "smtps":
                transport.write(b"421 4.7.0 " + cfg.me.encode() + b" too many connections\r\n")
            transport.close()
            return False
        if not admission.counted:
            log("warning", ip=self.ip, text="connection table full: this client is not counted")
        self.conn_key, self.conn_counted = key, admission.counted
        self.ctx.joined(self)
        return True

    def greet(self, early: int = 0) -> None:
        """The greeting, after the pause; ``early`` bytes came first, so the core refuses."""
        if self.greet_timer is not None:
            self.greet_timer.cancel()
            self.greet_timer = None
        if early:
            took = time.monotonic() - self.started
            log("pregreet", ip=self.ip, port=self.port, bytes=early, after=f"{took:.3f}")
        elif self.screen is not None and self.screen.wait(self.greet):
            return  # the blocklist lookups run (bounded by dnsbltimeout)
        if self.conn is not None and not self.conn.closed:
            self.touch()
            self.handle(self.conn.start())

    def data_received(self, data: bytes) -> None:
        """Bytes from the client: to the TLS pump or straight to the core."""
        if self.closed or self.closing:
            return
        if self.paused:
            self._stop_reading()  # this much is buffered; no more until we resume
        try:
            if self.tls is not None:
                self.tls_received(data)
                return
            if self.conn is None:  # its name is being looked up (``named``)
                self.early += data
                return
            events = self.conn.receive(data)
            if self.greet_timer is not None:
                self.greet(len(data))
                return
            self.received(events)
        except Exception as exc:  # noqa: BLE001 - one broken session must not stop the loop
            self.fail(exc)

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002 - our size, not its
        return self.ctx.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.ctx.read_buffer[:nbytes]))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        """Uncount the connection, forget the message in flight, log the ``conn`` line."""
        # The timers would keep this session (and its TLS state) alive for seconds.
        for timer in (self.timer, self.close_timer, self.greet_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.close_timer = self.greet_timer = None
        if self.tls is not None:
            self.tls.drop()
            self.tls = None
        if self.conn_key is None:
            return
        self.closed = True
        if self.conn is not None:
            self.conn.connection_lost()
        self.intake.drop()
        self.ctx.release(self.conn_key, counted=self.conn_counted)
        self.conn_key = None
        log(
            "conn",
            ip=self.ip,
            port=self.port,
            secs=f"{time.monotonic() - self.started:.3f}",
            msgs=self.messages,
            tls=tls_text(self.tls_info),
            auth=self.auth_user,
            host=self.host,
            error=str(exc) if exc else None,
        )
        self.ctx.left(self)

    def pause_writing(self) -> None:
        self.pause("write")

    def resume_writing(self) -> None:
        self.resume("write")

    # helpers ------------------------------------------------------------------------------

    def _handshaking(self) -> bool:
        return self.tls is not None and self.tls.handshaking

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task of this session; an exception in it ends the session."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())

    def fail(self, exc: BaseException | None) -> None:
        """A bug, not the client's doing: log it and drop this connection only."""
        log("error", ip=self.ip, port=self.port, error=repr(exc))
        self.abort()

    def pause(self, reason: str) -> None:
        """Stop reading from the client while we wait (AUTH check, commit, full send buffer).

        Lazily: the transport is only told (an epoll_ctl, twice per message otherwise) if
        the client actually sends something meanwhile; the core buffers that much anyway
        (bounded by ``Policy.max_pending``) and answers it once it is ready."""
        self.paused.add(reason)

    def _stop_reading(self) -> None:
        transport = self.transport
        if not self.reading_paused and transport is not None and not transport.is_closing():
            transport.pause_reading()
            self.reading_paused = True

    def resume(self, reason: str) -> None:
        """``reason`` no longer holds us back; read again once nothing else does."""
        self.paused.discard(reason)
        if not self.paused and self.reading_paused and self.transport is not None:
            self.reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    # timers and ending ------------------------------------------------------------------

    def touch(self) -> None:
        """Progress: the next is due within the idle timeout (shorter under stress)."""
        cfg = self.cfg
        timeout = session_knobs.idle_timeout(
            cfg.knobs, cfg.timeoutsmtpd, self.ctx.connections(), cfg.maxconn
        )
        self.deadline = self.loop.time() + timeout
        timer = self.timer
        if timer is not None and timer.when() > self.deadline:  # stress began: fire sooner
            timer.cancel()
            self.timer = self.loop.call_at(self.deadline, self.on_timer)

    def on_timer(self) -> None:
        """The idle or DATA deadline: fire if it passed, else wait for the new one."""
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        if self.paused & {"auth", "commit"} or self._handshaking():
            self.touch()  # we are the slow one (or the handshake has its own timeout)
        due = (
            self.deadline if self.data_deadline is None else min(self.deadline, self.data_deadline)
        )
        if now < due:
            self.timer = self.loop.call_at(due, self.on_timer)
            return
        what = "data" if self.data_deadline is not None and now >= self.data_deadline else "idle"
        log("timeout", ip=self.ip, port=self.port, phase=what)
        if self.conn is None:
            self.abort()
        else:
            self.handle(self.conn.timeout())
            self.close()

    def close(self) -> None:
        """Close after the write buffer drains; abort if the client does not read it."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        if self.tls is not None and not self.tls.handshaking:
            if not self.transport.is_closing():
                self.tls.unwrap()  # our close_notify, with any reply still to be written
            else:
                self.tls.flush_replies()  # a reply sent outside ``handle`` (force_shutdown)
        self.transport.close()
        self.close_timer = self.loop.call_later(CLOSE_GRACE, self.abort)

    def abort(self) -> None:
        """Drop the connection now (a bug, a client that does not read, the end of TERM)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def shutdown(self) -> None:
        """TERM: the core says 421 now if the client is between commands, else at the
        next command boundary, so a message in flight still gets its 250."""
        if self.closed or self.closing:
            return
        if self.conn is None:
            self.abort()
            return
        self.handle(self.conn.shutdown())

    def force_shutdown(self) -> None:
        """The TERM grace is over: 421 whatever the client is doing, and close."""
        if self.closed or self.closing or self.transport is None:
            return
        if self.conn is not None:
            self.handle(self.conn.shutdown())
        if not self.closing and self.transport is not None:
            self.intake.drop()
            if not self._handshaking():
                self.send(
                    f"421 4.3.2 {self.cfg.me} Service shutting down, closing channel\r\n".encode()
                )
            self.close()

    # the core's events ------------------------------------------------------------------

    def handle(self, events: Iterable[Event]) -> None:
        """Carry out the core's events, in order, until the session starts closing; over
        TLS, the replies then leave in one write (``TLSPump.send``)."""
        self._carry_out(events)
        if self.tls is not None:
            self.tls.flush_replies()

    def _carry_out(self, events: Iterable[Event]) -> None:
        for event in events:
            if self.closed or self.closing or self.transport is None:
                return
            if isinstance(event, Send):
                self.send(event.data)
            elif isinstance(event, MessageData):
                self.intake.data(event.chunk)
            elif isinstance(event, MessageStart):
                self.message_start(event)
            elif isinstance(event, MessageEnd):
                self.commit(event)
            elif isinstance(event, MessageAbort):
                self.message_abort(event.reason)
            elif isinstance(event, AuthRequest):
                self.pause("auth")
                self.spawn(self.authenticate(event))
            elif isinstance(event, AuthRejected):
                log_auth_fail(
                    self.ip,
                    self.port,
                    mech=event.mechanism,
                    user=event.username,
                    reason=event.reason,
                )
            elif isinstance(event, StartTLS):
                self.begin_tls(implicit=False)
            elif isinstance(event, Close):
                self.close()

    def received(self, events: list[Event]) -> None:
        """Carry out what the client's bytes led to. Bytes read as DATA are progress even
        when they lead to nothing: a refused message is read and dropped to its end, so
        the client hears why, not the idle timeout's 421 (the DATA deadline bounds it)."""
        conn = self.conn
        assert conn is not None  # noqa: S101 - only called with the core's events
        if events or conn.state is State.DATA:
            self.touch()
        if events:
            self.handle(events)
        if conn.state is not State.DATA:  # the DATA deadline ends with the DATA
            self.data_deadline = None

    def send(self, data: bytes) -> None:
        """Write to the client: through TLS once it is up."""
        if self.transport is None:
            return
        if self.tls is not None:
            self.tls.send(data)
        else:
            self.transport.write(data)

    # TLS ----------------------------------------------------------------------------------

    def begin_tls(self, *, implicit: bool) -> None:
        """TLS on the same transport through memory BIOs (no second asyncio transport).

        Whatever the client pipelined after STARTTLS was dropped by the core; every byte
        read from now on is handshake input."""
        ctx = self.cfg.server_tls
        if ctx is None or self.transport is None:
            self.abort()
            return
        self.tls = TLSPump(
            ctx, self.transport.write, implicit=implicit, ack=quick_ack(self.transport)
        )
        self.tls.timer = self.loop.call_later(self.cfg.timeouttls, self.tls_timeout)

    def tls_timeout(self) -> None:
        """The handshake took longer than ``timeouttls``."""
        if self.tls is not None:
            self.tls.timer = None
        if self._handshaking() and not self.closed:
            self.tls_failed("handshake timed out")

    def tls_failed(self, error: str) -> None:
        """Log it, send OpenSSL's alert if it wrote one, and close (no SMTP reply: the
        client speaks TLS or nothing now)."""
        log("tls-fail", ip=self.ip, port=self.port, error=error)
        if self.tls is not None:
            self.tls.flush()  # the alert, if OpenSSL wrote one
            self.tls.cancel_timer()
            self.tls = None
        if self.transport is not None:
            self.closing = True
            self.transport.close()
            self.close_timer = self.loop.call_later(CLOSE_GRACE, self.abort)

    def tls_received(self, data: bytes) -> None:
        """Ciphertext in: finish the handshake if it runs, then every whole record's
        plaintext to the core."""
        pump = self.tls
        assert pump is not None  # noqa: S101 - only called with TLS
        pump.feed(data)
        if pump.handshaking:
            try:
                if not pump.handshake():
                    return
            except TLSFailedError as exc:
                self.tls_failed(str(exc))
                return
            self.tls_done(pump)
        while not (self.closed or self.closing) and self.tls is not None:
            try:
                chunk = pump.read()
            except TLSClosedError:  # close_notify from the client
                self.close()
                break
            except TLSFailedError as exc:
                self.tls_failed(str(exc))
                return
            if chunk is None or self.conn is None:  # the close_notify raised above
                break
            self.received(self.conn.receive(chunk))
        pump.flush_unless_held()

    def tls_done(self, pump: TLSPump) -> None:
        """The handshake is complete: greet (port 465) or tell the core (STARTTLS)."""
        self.tls_info = pump.info(self.cfg.tlsclients)
        if pump.implicit:
            assert self.policy is not None  # noqa: S101 - set in connection_made
            self.policy = dataclasses.replace(self.policy, tls_info=self.tls_info)
            self.conn = SMTPConnection(self.policy)
            events = self.conn.start()
        else:
            assert self.conn is not None  # noqa: S101 - STARTTLS came from the core
            events = self.conn.tls_started(self.tls_info)
        self.touch()
        self.handle(events)

    # AUTH ---------------------------------------------------------------------------------

    async def authenticate(self, req: AuthRequest) -> None:
        """The check runs off the loop (``auth.Authenticator.verdict``); a failure is logged
        and answered after the penalty delay, and reading resumes once there is an answer."""
        outcome = await self.ctx.auth.verdict(self.ip, self.port, req)
        if self.closed or self.conn is None:
            return
        if outcome.ok:
            self.auth_user = req.username
        self.resume("auth")
        self.touch()
        user = req.username if outcome.ok else None
        self.handle(self.conn.auth_result(user, temporary=outcome.temporary))

    # the queue ----------------------------------------------------------------------------

    def message_start(self, event: MessageStart) -> None:
        """DATA (or BDAT) begins: the DATA deadline starts, the intake opens a writer."""
        self.data_deadline = self.loop.time() + self.cfg.timeoutdata
        if self.timer is not None and self.timer.when() > self.data_deadline:
            self.timer.cancel()
            self.timer = self.loop.call_at(self.data_deadline, self.on_timer)
        relay_client = self.policy is not None and self.policy.relay_client
        self.intake.start(event, self.ip, relay_client, self.cfg.auth, (self.cfg.scan, self.env))
        self.intake.watch = self.ctx.senders.watch(event.auth_user, event.sender, self.ip)

    def message_abort(self, reason: str) -> None:
        """The core gave up on the message (too big, too many hops, ...); its DATA deadline
        holds while the rest is read and dropped (``received``)."""
        self.intake.drop()
        log("abort", ip=self.ip, port=self.port, reason=reason)

    def commit(self, end: MessageEnd) -> None:
        """Hand the message to the group commit; ``committed`` answers when it is durable.
        (Its DATA deadline is cleared by ``received``, which this runs inside of.)"""
        watch = self.intake.watch
        refusal = watch.refusal() if watch is not None else None
        if refusal is not None and self.conn is not None:  # a header From not the login's
            self.intake.drop()
            self.handle(self.conn.message_failed(refusal))
            return
        self.pause("commit")
        self.intake.commit(end, self.committed)

    def committed(self, result: CommitResult) -> None:
        """On the loop, once the commit of the current message is done (or failed)."""
        end, error = self.intake.finished(result)
        self.intake.log_result(
            result, end, error, port=self.port, tls=tls_text(self.tls_info), screen=self.screen
        )
        queue_id = None if isinstance(result, QueueError) else result.queue_id
        msg = self.intake.message
        if queue_id is not None:
            self.messages += 1
            if msg is not None:
                self.ctx.senders.accepted(msg.auth_user, len(msg.recipients))
        if self.closed or self.conn is None:
            return
        self.resume("commit")
        self.touch()
        if queue_id is None:
            reply = self.intake.refusal or TEMPFAIL
            try:
                events = self.conn.message_failed(reply)
            except ProtocolUsageError as exc:  # a check's text the core will not send
                log("error", ip=self.ip, port=self.port, error=repr(exc))
                events = self.conn.message_failed(TEMPFAIL)  # an answer, not the idle 421
            self.handle(events)
        else:
            self.handle(self.conn.message_queued(queue_id))
