"""All the authentication checks of one inbound message, at the end of DATA.

Why here: DMARC needs the SPF result and every DKIM result together, and DKIM needs the
whole message; so SPF (envelope sender and HELO), DKIM and DMARC run in one job, in one of
the checks' own threads (``check``: the DNS lookups block; dnspython's resolver, every lookup
within what is left of the job's deadline), before the message is committed, within
``authtimeout`` seconds in all from the moment the job starts (``run`` stops waiting then:
whatever the thread still does is thrown away and the message gets temperror results).

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
import re
import time
from dataclasses import dataclass

from pyqmail.checks import arcverify, dkimverify, dmarc, spf
from pyqmail.checks.authresults import Results, decide, header, strip_ours
from pyqmail.checks.checkpool import BusyError, CheckPool
from pyqmail.checks.settings import AuthSettings
from pyqmail.checks.verdict import Verdict

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Outcome:
    """The verdict, whether the message goes to Junk, and the message to queue."""

    verdict: Verdict
    junk: bool
    message: bytes


def _split(message: bytes) -> tuple[bytes, bytes]:
    """Header section (with its last line end) and the rest (blank line and body)."""
    m = _END_OF_HEAD.search(message)
    if m is None:
        return message, b""
    cut = m.start() + len(m.group(0)) // 2
    return message[:cut], message[cut:]


def _summary(r: Results, removed: int) -> str:
    """The log line's key=value pairs."""
    dkim = ",".join(f"{d.result}:{d.domain or '-'}" for d in r.dkim) or "none"
    return (
        f"spf={r.mailfrom.result} spf_helo={r.helo.result} dkim={dkim} "
        f"dmarc={r.dmarc.result} arc={r.arc.result} ar_removed={removed}"
    )


def check(settings: AuthSettings, ip: str, helo: str, sender: str, message: bytes) -> Outcome:
    """Every check, then the rewritten message (blocking: run it in a worker thread)."""
    res = settings.resolver
    assert res is not None  # noqa: S101 - settings.load builds it whenever checks are on
    deadline = time.monotonic() + settings.timeout
    helo_r, mail_r = spf.check(res, ip, sender, helo, budget=settings.timeout / 3)
    dkim_r = dkimverify.verify(message, res, budget=max((deadline - time.monotonic()) / 2, 0.1))
    head, rest = _split(message)
    dmarc_r = dmarc.check(res, head, mail_r, dkim_r, budget=max(deadline - time.monotonic(), 0.1))
    arc_r = arcverify.verify(message, res, budget=max(deadline - time.monotonic(), 0.1))
    results = Results(helo_r, mail_r, dkim_r, dmarc_r, arc_r)
    stripped, removed = strip_ours(head, settings.authserv_id)
    verdict, junk = decide(dmarc_r, settings.on_reject, settings.on_quarantine)
    log = f"{_summary(results, removed)} {verdict.log}"
    verdict = Verdict(verdict.action, verdict.code, verdict.text, log)
    return Outcome(verdict, junk, header(settings.authserv_id, results) + stripped + rest)


def unanswered(settings: AuthSettings, message: bytes, why: str = "timeout") -> Outcome:
    """The outcome when the checks did not finish in time (or failed unexpectedly):
    temperror, delivered, our header still on top and forged ones still removed."""
    empty = spf.SpfResult("helo", "temperror", "")
    results = Results(
        empty, spf.SpfResult("mailfrom", "temperror", ""), [], dmarc.DmarcResult("temperror")
    )
    head, rest = _split(message)
    stripped, removed = strip_ours(head, settings.authserv_id)
    log = f"{_summary(results, removed)} auth_error={why}"
    return Outcome(
        Verdict("accept", 250, "", log),
        False,
        header(settings.authserv_id, results) + stripped + rest,
    )


def busy(message: bytes, why: str) -> Outcome:
    """The outcome when no check thread came free in time: deferred, nothing checked."""
    text = "4.3.0 message checks busy, try again later"
    return Outcome(Verdict("defer", 451, text, f"auth_error={why}"), False, message)


async def run(
    settings: AuthSettings, ip: str, helo: str, sender: str, message: bytes, *, pool: CheckPool
) -> Outcome:
    """``check`` in one of ``pool``'s threads, never longer than the time budget (+1 s) once
    it started; ``busy`` when it could not start within the budget."""
    try:
        job = await pool.start(ip, settings.timeout, check, settings, ip, helo, sender, message)
    except BusyError as exc:
        return busy(message, str(exc))
    try:
        return await asyncio.wait_for(job, settings.timeout + 1)
    except TimeoutError:
        return unanswered(settings, message)
    except Exception as exc:  # noqa: BLE001 - a library's bug must not hang the session
        return unanswered(settings, message, type(exc).__name__)
