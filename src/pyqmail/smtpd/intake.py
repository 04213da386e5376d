"""One session's message on its way into the queue: from MessageStart to a durable commit.

Why its own module: memory is the one resource a client's message data can exhaust, so the
rule for it stays in one place. Small messages stay in memory and reach the disk in one go in
the group commit (``pyqmail.queue.commit``); past ``SPOOL_LIMIT``, or when the
worker's sessions together hold ``WORKER_SPOOL_LIMIT``, the message streams into its tmp file
instead (bounded memory whatever the number of clients). A spilled message the checks or
scanners need whole is read back in turn, within ``READ_BACK_LIMIT`` per worker
(``SpoolBudget.read_back``). The session only forwards the core's events and answers the
client once the commit is done.

rspamd is told the client's forward-confirmed host name (``pyqmail.scan.rspamd``: without
it every message scores ``HFILTER_HOSTNAME_UNKNOWN``). The lookup (``host_name``: PTR, then
A/AAAA, within ``dnsbltimeout``, cached for the answers' TTL) starts when the session opens,
beside the blocklist lookups, for a client whose mail rspamd may scan (``connected``), so
its answer is there by the end of DATA; a session nobody scans never asks, and never
waits. A session whose tcprules needed the name (``=host`` rules) looks it up once for both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.verdict import Verdict
from pyqmail.log import log
from pyqmail.protocol import MessageEnd, MessageStart
from pyqmail.queue.commit import CommitResult
from pyqmail.queue.format import QueueError
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.scan import rspamd, stage
from pyqmail.scan.settings import ScanSettings, applies
from pyqmail.smtpd.senders import HeadWatch

if TYPE_CHECKING:
    from pyqmail.checks.checkpool import CheckPool
    from pyqmail.checks.screen import Screen

SPOOL_LIMIT = 64 * 1024  # messages up to this size stay in memory until the commit
WORKER_SPOOL_LIMIT = 8 * 1024 * 1024  # ... as long as one worker holds no more than this
READ_BACK_LIMIT = 32 * 1024 * 1024  # bytes of spilled messages a worker checks at once
READ_BACK_WAIT = 120.0  # seconds a spilled message waits for its turn, then 451
HEAD_START = 5.0  # seconds others that fit may pass a first in line that does not
BUSY = "451 4.3.0 too many large messages being checked, try again later"

Done = Callable[[CommitResult], None]


class SpoolBudget:
    """Bytes of messages in memory over all sessions of one worker (one loop thread): those
    held until their commit (``held``, within ``limit``), and spilled ones read back for
    the checks and scans (``reading``, within ``read_limit``: ``read_back``)."""

    def __init__(self, limit: int = WORKER_SPOOL_LIMIT, read_limit: int = READ_BACK_LIMIT) -> None:
        self.held = 0
        self.limit = limit
        self.reading = 0
        self.read_limit = read_limit
        self._line: list[tuple[int, asyncio.Future[None]]] = []  # waiting to read back
        self._head: asyncio.Future[None] | None = None  # the first in line, since _head_since
        self._head_since = 0.0

    def fits(self, size: int) -> bool:
        """``size`` more bytes stay within the worker's limit."""
        return self.held + size <= self.limit

    @contextlib.asynccontextmanager
    async def read_back(self, size: int, wait: float | None = None) -> AsyncIterator[None]:
        """Room for a spilled message of ``size`` bytes read back into memory: the checks
        need it whole and copy it two or three times over (the DKIM canonical forms, the
        message with our header, the scanner's request), and a message may be as large as
        ``databytes``, so without a bound fifty clients' 25 MiB messages would take
        gigabytes. In turn, first come first served, while the worker's total stays within
        ``read_limit`` (a larger message goes alone); one that fits may pass a first in
        line that does not, for ``HEAD_START`` seconds of that one's wait (then the others
        wait until it is in: it is not starved). ``SpoolBusyError`` after ``wait`` seconds
        in line (``READ_BACK_WAIT``): the client is told to try again later."""
        wait = READ_BACK_WAIT if wait is None else wait
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append((size, turn))
        self._grant()
        try:
            await asyncio.wait_for(asyncio.shield(turn), wait)
        except BaseException as exc:
            if turn.done():  # granted as the wait ended: give it back
                self.reading -= size
            else:
                self._line.remove((size, turn))
            self._grant()
            if isinstance(exc, TimeoutError):
                raise SpoolBusyError(
                    f"no room to check a {size}-byte message in {wait:.0f} s"
                ) from None
            raise
        try:
            yield
        finally:
            self.reading -= size
            self._grant()

    def _grant(self) -> None:
        """Let in those in line that fit, in order (one when nothing else is read back);
        past a first in line that does not fit only while it has waited less than
        ``HEAD_START``."""
        now = asyncio.get_running_loop().time()
        i = 0
        while i < len(self._line):
            size, turn = self._line[i]
            if i == 0 and turn is not self._head:
                self._head, self._head_since = turn, now
            if not self.reading or self.reading + size <= self.read_limit:
                del self._line[i]
                self.reading += size
                turn.set_result(None)
                continue
            if i == 0 and now - self._head_since >= HEAD_START:
                return  # the first in line has waited long enough: the rest wait for it
            i += 1


class SpoolBusyError(QueueError):
    """A spilled message waited too long for room to be checked (``SpoolBudget.read_back``)."""


class Spool(Protocol):
    """What an intake needs from its worker: the queue of now, the memory budget, the
    inbound checks' threads, the group commit, and the client's name (asked for ``=host``
    rules and for rspamd)."""

    @property
    def queue(self) -> Queue:
        """The queue new messages go to (a HUP may change it)."""

    @property
    def budget(self) -> SpoolBudget:
        """The worker's memory budget for held messages."""

    @property
    def checkpool(self) -> CheckPool:
        """The worker's threads for the inbound checks (``pyqmail.checks.checkpool``)."""

    def submit(self, writer: QueueWriter, done: Done, owner: object) -> None:
        """Hand a finished message to the group commit; ``done`` gets the result. ``owner``
        (the intake) counts as waiting for a commit until then, or until its session ends."""

    async def remote_host(self, ip: str) -> str | None:
        """The client's forward-confirmed host name (None: none, or DNS failed), within
        ``dnsbltimeout`` (``pyqmail.smtpd.remotehost``)."""


def message_origin(event: MessageStart, relay_client: bool) -> str | None:
    """Queue meta ``origin``: who submitted the message, for pyqmail-send's DKIM signer
    (``pyqmail.dkim.policy``). ``auth`` for an AUTH login, ``relay`` for a relay client by
    IP (tcprules RELAYCLIENT) or by a certificate listed in tlsclients; None for everyone
    else: inbound mail, and mail a backup MX relays for others, is never signed."""
    if event.auth_user:
        return "auth"
    if relay_client or (event.tls is not None and event.tls.client_cert_relay):
        return "relay"
    return None


def _rewrite(old: QueueWriter, message: bytes, meta: dict[str, str]) -> QueueWriter:
    """A spilled message written anew with the checks' header (blocking: a worker thread;
    the old writer is aborted by the caller, on the loop, where ``drop`` may abort it too)."""
    fresh = QueueWriter(old.queue, old.sender, old.recipients, meta)
    fresh.write(message)
    return fresh


class Intake:
    """The current message of one session: its queue writer and the bytes it holds."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.writer: QueueWriter | None = None
        self.held = 0  # bytes of the current message held in memory (counted in the budget)
        self.committing: MessageEnd | None = None
        self.queue_error: str | None = None
        self.message: MessageStart | None = None
        self.watch: HeadWatch | None = None  # the header From of an AUTH login's message
        self.auth: AuthSettings | None = None  # the inbound checks, when they apply
        self.scan: ScanSettings | None = None  # the scanners, when they apply
        self.strip = False  # remove the scanners' header fields (``stage.strip_ours``)
        self.ip = ""
        self.checking: QueueWriter | None = None  # the writer the checks work on
        self.tasks: set[asyncio.Task[None]] = set()
        self.refusal: str | None = None  # the checks' reply, when they refuse the message
        self.fields: dict[str, str] = {}  # the checks' key=value pairs for the log line
        self.host: asyncio.Task[str | None] | None = None  # the client's name (``host_name``)

    def host_name(self, ip: str) -> asyncio.Task[str | None]:
        """The lookup of the client's forward-confirmed name, started at the first call (the
        session's, for ``=host`` rules, or ``connected``'s); later calls get the same one."""
        if self.host is None:
            self.host = asyncio.get_running_loop().create_task(self.spool.remote_host(ip))
        return self.host

    async def _host(self) -> str | None:
        """The client's name for rspamd, waiting for what is left of its lookup (bounded by
        ``dnsbltimeout``); None: it has none, or the lookup broke (logged: a bug must not
        cost the message)."""
        if self.host is None:
            return None
        try:
            return await asyncio.shield(self.host)
        except Exception as exc:  # noqa: BLE001 - see above
            log("host-fail", ip=self.ip, error=repr(exc))
            return None

    def connected(
        self, scan: ScanSettings, ip: str, env: Mapping[str, str], relay_client: bool
    ) -> None:
        """An admitted client: if rspamd may scan its mail (as ``start`` will decide with
        what is known now: no AUTH yet), its name is looked up from now on, for rspamd's
        ``Hostname`` at the end of DATA."""
        if scan.rspamd is not None and applies(scan, "relay" if relay_client else None, env):
            self.host_name(ip)

    def start(
        self,
        event: MessageStart,
        ip: str,
        relay_client: bool = False,
        auth: AuthSettings | None = None,
        scan: tuple[ScanSettings, Mapping[str, str]] | None = None,
    ) -> None:
        """A new message: its envelope and the trace data the Received header needs. A
        queue that cannot take it is remembered and answered at the end of DATA.
        ``relay_client``: the client's rules say RELAYCLIENT (its certificate counts too,
        from ``event.tls``); with AUTH it decides ``origin`` (``message_origin``). ``auth``:
        the inbound checks' settings; they run on mail with no ``origin`` (inbound).
        ``scan``: the scanners' settings and the client's tcprules environment, which
        decide together whether this message is scanned (``pyqmail.scan.settings``)."""
        self.message = event
        self.queue_error = None
        self.refusal = None
        self.fields = {}
        self.ip = ip
        meta = {"client": ip, "helo": event.helo, "protocol": event.protocol}
        if event.auth_user:
            meta["auth"] = event.auth_user
        origin = message_origin(event, relay_client)
        if origin is not None:
            meta["origin"] = origin
        self.auth = auth if auth is not None and auth.enabled and origin is None else None
        self.scan = scan[0] if scan is not None and applies(scan[0], origin, scan[1]) else None
        # inbound mail to be scanned loses forged scanner fields (also when the scanner is
        # down and scantempfail 0 accepts it unscanned); a client exempt from scanning (SCAN
        # "" or 0, a class scanclients leaves out) keeps them, as an admin's backup MX's X-Spam
        # fields, and its spilled message is not read back into memory for nothing
        self.strip = origin is None and self.scan is not None
        if self.scan is not None and self.scan.rspamd is not None:
            self.host_name(ip)  # an AUTH login scanned by scanclients: not asked at connection
        if event.tls is not None:
            meta["tls"] = f"{event.tls.version}:{event.tls.cipher}:{event.tls.bits}"
        if "SMTPUTF8" in event.params:  # its header may hold UTF-8 (``send.remote``)
            meta["smtputf8"] = "client"
        self.drop()
        try:
            self.writer = QueueWriter(
                self.spool.queue, event.sender, event.recipients, meta, defer=True
            )
        except QueueError as exc:
            self.queue_error = str(exc)

    def _release(self) -> None:
        self.spool.budget.held -= self.held
        self.held = 0

    def drop(self) -> None:
        """Forget the current message (aborted, or the connection is gone)."""
        self._release()
        if self.checking is not None:  # the checks' result will find no one waiting
            self.checking.abort()
            self.checking = None
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def data(self, chunk: bytes) -> None:
        """Small messages stay in memory and reach the disk in one go in the group
        commit; past SPOOL_LIMIT (or the worker's WORKER_SPOOL_LIMIT) the message streams
        into its tmp file (bounded memory)."""
        if self.watch is not None:
            self.watch.feed(chunk)
        writer = self.writer
        if writer is None:
            return
        try:
            if writer.held:
                size = self.held + len(chunk)
                budget = self.spool.budget
                if size <= SPOOL_LIMIT and budget.fits(len(chunk)):
                    writer.write(chunk)
                    self.held = size
                    budget.held += len(chunk)
                    return
                self._release()
                writer.spill()
            writer.write(chunk)
        except QueueError as exc:  # the writer removed its tmp file already
            self.queue_error = str(exc)
            self.drop()

    def commit(self, end: MessageEnd, done: Done) -> None:
        """Hand the message to the group commit; ``done`` answers when it is durable
        (or at once with a QueueError when there is nothing to commit). Inbound mail held
        in memory goes through the checks first (``_check``)."""
        writer, self.writer = self.writer, None
        self.committing = end
        if writer is not None and self.queue_error is None and self.message is not None:
            if self.auth is not None or self.scan is not None:
                self.checking = writer
                check = self._check(writer, end.client_size, done)
                task = asyncio.get_running_loop().create_task(check)
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                self._submit(writer, done)
            return
        if writer is not None:
            writer.abort()
        self._release()
        done(QueueError(self.queue_error or "no message"))

    def _submit(self, writer: QueueWriter, done: Done) -> None:
        """Finish the message on the loop (the group commit only fsyncs and renames)."""
        try:
            writer.finish()
        except QueueError as exc:  # the writer removed its tmp file already
            self.queue_error = str(exc)
            writer.abort()
            self._release()
            done(QueueError(self.queue_error))
            return
        self.spool.submit(writer, done, self)

    async def _check(self, writer: QueueWriter, sent: int, done: Done) -> None:
        """SPF, DKIM and DMARC (``pyqmail.checks.inbound``), forged scanner fields removed
        and the scanners (``pyqmail.scan.stage``), then the commit of the message with our
        Authentication-Results and the scanners' fields on top, or the refusal. ``sent``:
        the bytes the client sent (``MessageEnd.client_size``). Whatever goes wrong, ``done``
        hears of it: nothing else would answer the client."""
        try:
            ready = await self._checked(writer, sent)
        except Exception as exc:  # noqa: BLE001 - a bug too must answer the client (451)
            if not isinstance(exc, QueueError):
                log("error", ip=self.ip, error=repr(exc))
            self.checking = None
            self.queue_error = self.queue_error or str(exc)
            writer.abort()
            self._release()
            done(QueueError(str(exc)))
            return
        if ready is not None:  # None: the session went away meanwhile (drop aborted it)
            self.checking = None
            self._submit(ready, done)

    async def _checked(self, writer: QueueWriter, sent: int) -> QueueWriter | None:
        """The writer to commit after the checks and scans. A message that spilled to its
        tmp file is read back (in its turn: ``SpoolBudget.read_back``) and rewritten into a
        new one in a worker thread. QueueError: refused, or the queue failed."""
        if writer.held:  # no worker thread: its hand-off costs more than the join
            return await self._checks(writer, writer.message_bytes(), sent)
        try:
            async with self.spool.budget.read_back(writer.size):
                loop = asyncio.get_running_loop()
                data = await loop.run_in_executor(None, writer.message_bytes)
                return await self._checks(writer, data, sent)
        except SpoolBusyError:
            self.refusal = BUSY
            self.fields["check_error"] = "busy"
            raise

    async def _checks(self, writer: QueueWriter, data: bytes, sent: int) -> QueueWriter | None:
        """``_checked`` once the message is in memory (``data``). The scanners' size limits
        are compared with ``sent``, what the client sent, not with ``data``: that carries our
        Received field and Authentication-Results too, which a sender can lengthen (a
        DKIM-Signature field each adds a result), and a virus padded to ``databytes`` went
        past clamd as too large when ``clamdmaxsize`` was ``databytes``."""
        assert self.message is not None  # noqa: S101 - commit's test
        loop = asyncio.get_running_loop()
        msg = self.message
        original = data
        junk = False
        if self.auth is not None:
            # loaded with the configuration that turned the checks on (pyqmail.checks.libraries)
            from pyqmail.checks import inbound  # noqa: PLC0415

            outcome = await inbound.run(
                self.auth, self.ip, msg.helo, msg.sender, data, pool=self.spool.checkpool
            )
            if self.checking is not writer:
                return None
            self._judge(outcome.verdict)
            data, junk = outcome.message, outcome.junk
        if self.strip:
            data = stage.strip_ours(data)
        if self.scan is not None:
            host = await self._host()
            if self.checking is not writer:
                return None
            env = rspamd.Envelope(
                self.ip, msg.helo, msg.sender, msg.recipients, msg.auth_user, writer.queue_id, host
            )
            scanned = await stage.run(self.scan, env, data, sent=sent)
            if self.checking is not writer:
                return None
            self._judge(scanned.verdict)
            data, junk = scanned.message, junk or scanned.junk
        if data is original and not junk:
            return writer  # nothing to add (clamd alone, say): committed as it was written
        meta = dict(writer.meta, junk="1") if junk else writer.meta
        if writer.held:
            grown = len(data) - writer.size
            writer.replace_held(data, meta)
            self.held += grown
            self.spool.budget.held += grown
            return writer
        fresh = await loop.run_in_executor(None, _rewrite, writer, data, meta)
        writer.abort()
        if self.checking is not writer:
            fresh.abort()
            return None
        return fresh

    def _judge(self, verdict: Verdict) -> None:
        """A check's or scan's key=value pairs into the log line; QueueError (and the
        reply in ``refusal``) when it does not accept the message."""
        self.fields.update(kv.partition("=")[::2] for kv in verdict.log.split() if "=" in kv)
        if verdict.action != "accept":
            self.refusal = f"{verdict.code} {verdict.text}"
            raise QueueError(verdict.text)

    def finished(self, result: CommitResult) -> tuple[MessageEnd | None, str | None]:
        """After the commit: the MessageEnd it was for, and the error to log (None when
        the message is in the queue)."""
        self._release()
        end, self.committing = self.committing, None
        if isinstance(result, QueueError):
            self.queue_error = self.queue_error or str(result)
            return end, self.queue_error
        return end, None

    def log_result(
        self,
        result: CommitResult,
        end: MessageEnd | None,
        error: str | None,
        *,
        port: int,
        tls: str | None,
        screen: Screen | None,
    ) -> None:
        """The message's log line once its commit is done (``finished``): ``msg`` when it
        is queued (with the session's blocklist and greylist fields: ``screen``), else
        ``refused`` (a check refused it) or ``queue-fail``."""
        msg = self.message
        checks = screen.fields() if screen is not None else {}
        if isinstance(result, QueueError):
            event = "refused" if self.refusal else "queue-fail"
            log(event, ip=self.ip, port=port, error=error, **self.fields)
        elif msg is not None and end is not None:
            log(
                "msg",
                qid=result.queue_id,
                mid=end.message_id or "-",
                size=end.size,
                ip=self.ip,
                tls=tls,
                auth=msg.auth_user,
                **{"from": f"<{msg.sender}>"},
                to=",".join(f"<{r}>" for r in msg.recipients),
                **checks,
                **self.fields,
            )
