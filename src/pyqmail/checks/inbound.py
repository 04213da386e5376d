"""All the authentication checks of one inbound message, at the end of DATA.

Why here: DMARC needs the SPF result and every DKIM result together, and DKIM needs the
whole message; so SPF (envelope sender and HELO), DKIM and DMARC run in one job, in one of
the checks' own threads (``check``: the DNS lookups block; dnspython's resolver, every lookup
within what is left of the job's deadline), before the message is committed, within
``authtimeout`` seconds in all from the moment the job starts (``run`` stops waiting a second
later; whatever the thread still does then is thrown away).

A DNS server that does not answer in time is a ``temperror`` and the message is accepted
(RFC 7489 6.6.3): every lookup ends with the job's budget, SPF's within a third of it and
DKIM's within half of what is left, so DNS alone never keeps DMARC from running in time.
A job that still runs past its time spent it on work (DKIM body hashes, ARC chains of a
large message: the sender chooses how much) or failed, and the sender must not gain by
that, so ``run`` uses what the job had published (``Progress``) when it stopped waiting:

- DMARC's verdict already known (ARC, which runs after it, overran): that verdict, a
  refusal or Junk as usual, with the header of what was known (no ``arc=``);
- DMARC not computed, or a temperror of a DMARC started with less than a quarter of the
  time left (DNS alone leaves it a third): ``451 4.7.0`` (``overrun``), the client tries
  again later. Accepting it would let anyone switch DMARC
  off with a message that costs enough CPU.

A job that cannot start because the worker's check threads are all taken (by clients whose
DNS never answers, say: ``pyqmail.checks.checkpool``) is not a temperror: waiting
``authtimeout`` seconds for a thread, it gets ``451 4.3.0`` (``busy``) and the client tries
again later. Accepting it unchecked would let anyone switch DMARC off by keeping the
threads busy.

The result is the message as it is queued: our one Authentication-Results field on top,
every incoming one that claims our authserv-id removed, and the verdict (refuse for a
DMARC reject, a Junk flag for quarantine) with the key=value pairs for the log line.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from dataclasses import dataclass

from pyqmail.checks import arcverify, dkimverify, dmarc, spf
from pyqmail.checks.authresults import Results, decide, header, strip_ours
from pyqmail.checks.checkpool import BusyError, CheckPool
from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.verdict import Verdict
from pyqmail.headers import head_and_rest


@dataclass(frozen=True)
class Outcome:
    """The verdict, whether the message goes to Junk, and the message to queue."""

    verdict: Verdict
    junk: bool
    message: bytes


def _summary(r: Results, removed: int) -> str:
    """The log line's key=value pairs."""
    dkim = ",".join(f"{d.result}:{d.domain or '-'}" for d in r.dkim) or "none"
    return (
        f"spf={r.mailfrom.result} spf_helo={r.helo.result} dkim={dkim} "
        f"dmarc={r.dmarc.result} arc={r.arc.result} ar_removed={removed}"
    )


class Progress:
    """What a job has found so far, filled from its thread and read on the loop's: ``run``
    may stop waiting while the thread goes on, and a DMARC verdict already computed must
    not be thrown away with the rest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dmarc: Results | None = None

    def dmarc_known(self, results: Results) -> None:
        """The results DMARC's verdict was computed from, and that verdict."""
        with self._lock:
            self._dmarc = results

    def known(self) -> Results | None:
        """The results up to DMARC's, None before DMARC's verdict was computed."""
        with self._lock:
            return self._dmarc


def _outcome(settings: AuthSettings, results: Results, message: bytes, extra: str) -> Outcome:
    """DMARC's verdict on the message, with our header of ``results`` on top (forged ones of
    ours removed) and the log line's key=value pairs (``extra`` appended)."""
    head, rest = head_and_rest(message)
    stripped, removed = strip_ours(head, settings.authserv_id)
    verdict, junk = decide(results.dmarc, settings.on_reject, settings.on_quarantine)
    log = f"{_summary(results, removed)} {verdict.log}{extra}"
    verdict = Verdict(verdict.action, verdict.code, verdict.text, log)
    return Outcome(verdict, junk, header(settings.authserv_id, results) + stripped + rest)


def check(
    settings: AuthSettings,
    ip: str,
    helo: str,
    sender: str,
    message: bytes,
    *,
    progress: Progress | None = None,
) -> Outcome:
    """Every check, then the rewritten message (blocking: run it in a worker thread);
    DMARC's results go to ``progress`` as soon as they are known."""
    res = settings.resolver
    assert res is not None  # noqa: S101 - settings.load builds it whenever checks are on
    deadline = time.monotonic() + settings.timeout
    helo_r, mail_r = spf.check(res, ip, sender, helo, budget=settings.timeout / 3)
    dkim_r = dkimverify.verify(message, res, budget=max((deadline - time.monotonic()) / 2, 0.1))
    head, _rest = head_and_rest(message)
    # DNS alone leaves DMARC a third of the time at least (SPF takes a third at most, DKIM
    # half of the rest): with less left, work the sender chose (bodies, signatures) took it,
    # and a DMARC temperror then is that work's doing, not DNS's
    starved = deadline - time.monotonic() < settings.timeout / 4
    dmarc_r = dmarc.check(res, head, mail_r, dkim_r, budget=max(deadline - time.monotonic(), 0.1))
    if starved and dmarc_r.result == "temperror":
        return overrun(message, "overrun")
    if progress is not None:
        progress.dmarc_known(Results(helo_r, mail_r, dkim_r, dmarc_r))
    arc_r = arcverify.verify(message, res, budget=max(deadline - time.monotonic(), 0.1))
    return _outcome(settings, Results(helo_r, mail_r, dkim_r, dmarc_r, arc_r), message, "")


def unfinished(settings: AuthSettings, message: bytes, progress: Progress, why: str) -> Outcome:
    """The outcome when ``run`` stopped waiting for the job (its time was up, or it failed):
    DMARC's verdict when it was known by then, else deferred (``overrun``)."""
    known = progress.known()
    if known is None:
        return overrun(message, why)
    return _outcome(settings, known, message, f" auth_error={why}")


def overrun(message: bytes, why: str) -> Outcome:
    """The outcome when the job spent its time on work, not on DNS, before DMARC's verdict:
    deferred, nothing checked (the sender chose that work: it must not switch DMARC off)."""
    text = "4.7.0 message checks took too long, try again later"
    return Outcome(Verdict("defer", 451, text, f"auth_error={why}"), False, message)


def busy(message: bytes, why: str) -> Outcome:
    """The outcome when no check thread came free in time: deferred, nothing checked."""
    text = "4.3.0 message checks busy, try again later"
    return Outcome(Verdict("defer", 451, text, f"auth_error={why}"), False, message)


async def run(
    settings: AuthSettings, ip: str, helo: str, sender: str, message: bytes, *, pool: CheckPool
) -> Outcome:
    """``check`` in one of ``pool``'s threads, never longer than the time budget (+1 s) once
    it started (then ``unfinished``); ``busy`` when it could not start within the budget."""
    progress = Progress()
    job_func = functools.partial(check, progress=progress)
    try:
        job = await pool.start(ip, settings.timeout, job_func, settings, ip, helo, sender, message)
    except BusyError as exc:
        return busy(message, str(exc))
    try:
        return await asyncio.wait_for(job, settings.timeout + 1)
    except TimeoutError:
        return unfinished(settings, message, progress, "timeout")
    except Exception as exc:  # noqa: BLE001 - a library's bug must not hang the session
        return unfinished(settings, message, progress, type(exc).__name__)
