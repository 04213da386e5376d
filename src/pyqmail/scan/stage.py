"""The scanning stage of one message: every scanner at once, within ``scantimeout``, and
what their answers mean for the message.

Why here: ``smtpd/intake.py`` only calls ``run`` with the message it is about to queue and
gets one answer back, in the shape the inbound checks use (``checks.verdict.Verdict``):

- a virus (clamd) is refused, ``554 5.7.1``, whatever rspamd said; so is a message clamd
  could not scan completely (``_limit``), with a reply that says so;
- rspamd's action becomes the reply ``rspamdactions`` names: ``refuse`` (``554 5.7.1``),
  ``defer`` (``451 4.7.1``), ``junk`` (accepted with the queue meta ``junk``, which local
  delivery turns into the Maildir++ folder ``.Junk``, as a DMARC quarantine) or ``accept``;
  on accept and junk rspamd's header edits are made (its ``X-Spam``, ``X-Spamd-Result``
  fields on top, forged incoming ones removed); a Junk verdict without rspamd's ``X-Spam``
  gets pyqmail's own ``X-Spam: Yes`` and ``X-Spam-Status`` (``junk_fields``);
- a scanner that is down, still busy when the time is up, or answers garbage: ``451 4.7.1``
  (``scantempfail`` 1, the default), or accepted unscanned (0). A definite refusal from the
  other scanner still wins.
- a message larger than a scanner takes (``rspamdmaxsize``, ``clamdmaxsize``) is not sent
  to it, and is judged by the other one alone, or accepted unscanned (``pyqmail.scan.settings``
  says why not refused): the scanner would reset the connection or answer an error, a 451 on
  every retry until the message bounced. The size compared is what the client sent (``run``'s
  ``sent``), the one ``databytes`` bounds, not the copy the scanners get: that carries our
  Received field and, with the inbound checks, our Authentication-Results, which the sender
  can lengthen (a result per DKIM-Signature field), so a virus padded to ``databytes`` was
  passed on unscanned when ``clamdmaxsize`` was ``databytes``. The role lets each scanner
  take ``control.table.SCANNER_HEADROOM`` (1 MiB) more than its control file says, for them.

The log line gets ``host`` (the client's name rspamd was told, ``unknown`` when it had
none), ``scan`` (the reply), ``spam`` and ``spam_score`` (rspamd's action and
score/required), ``virus`` (``clean`` or the signature), ``scan_limit`` (``clamd:<limit>``
instead of ``virus`` when clamd stopped at one), ``scan_secs`` (the stage's time),
``scan_error`` (``<scanner>:<why>`` for each failure) and ``not_scanned``
(``<scanner>:<size>><limit>`` for each scanner the message was too large for, ``size`` what
the client sent).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from pyqmail.checks.verdict import Verdict
from pyqmail.headers import head_and_rest, raw_fields
from pyqmail.scan import clamd, rspamd
from pyqmail.scan.settings import ScanSettings
from pyqmail.scan.wire import ScanError

_RANK = {"accept": 0, "junk": 1, "defer": 2, "refuse": 3}


@dataclass(frozen=True)
class Outcome:
    """The verdict (its ``log`` holds the key=value pairs), the Junk flag, the message."""

    verdict: Verdict
    junk: bool
    message: bytes


@dataclass
class _Answers:
    """What each scanner said, or why it said nothing."""

    spam: rspamd.Reply | None = None
    virus: str | None = None
    errors: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # ``<scanner>:<size>><limit>``: over its size limit


async def _ask(settings: ScanSettings, env: rspamd.Envelope, message: bytes, sent: int) -> _Answers:
    """Both scanners at once; whatever is not done at ``scantimeout`` is cancelled. A single
    scanner is awaited in this task under the time bound: no second task, no ``wait``. A
    scanner whose limit ``sent`` (the client's bytes) exceeds is not asked."""
    jobs: dict[str, Coroutine[Any, Any, Any]] = {}
    skipped = []
    if settings.rspamd is not None and sent > settings.rspamd_max:
        skipped.append(f"rspamd:{sent}>{settings.rspamd_max}")
    elif settings.rspamd is not None:
        jobs["rspamd"] = rspamd.check(settings.rspamd, env, message)
    if settings.clamd is not None and sent > settings.clamd_max:
        skipped.append(f"clamd:{sent}>{settings.clamd_max}")
    elif settings.clamd is not None:
        jobs["clamd"] = clamd.scan(settings.clamd, message)
    answers = _Answers(skipped=tuple(skipped))
    if not jobs:
        return answers
    if len(jobs) == 1:
        ((name, job),) = jobs.items()
        try:
            async with asyncio.timeout(settings.timeout):
                _settle(answers, name, await job)
        except TimeoutError:
            answers.errors = (f"{name}:timeout",)
        except Exception as exc:  # noqa: BLE001 - a bug here must not hang or kill the session
            answers.errors = (_why(name, exc),)
        return answers
    tasks = {name: asyncio.create_task(job) for name, job in jobs.items()}
    await asyncio.wait(tasks.values(), timeout=settings.timeout)
    errors = []
    for name, task in tasks.items():
        if not task.done():
            task.cancel()
            errors.append(f"{name}:timeout")
        elif task.exception() is not None:
            errors.append(_why(name, task.exception()))
        else:
            _settle(answers, name, task.result())
    answers.errors = tuple(errors)
    return answers


def _names(notes: tuple[str, ...]) -> set[str]:
    """The scanners named in ``<scanner>:<text>`` notes."""
    return {note.partition(":")[0] for note in notes}


def _why(name: str, exc: BaseException | None) -> str:
    """``<scanner>:<why>`` for the log: a ScanError's text, else the exception's class."""
    if isinstance(exc, ScanError):
        return f"{name}:{exc}"
    return f"{name}:{type(exc).__name__}"


def _settle(answers: _Answers, name: str, result: Any) -> None:
    """A scanner's answer into ``answers``."""
    if name == "rspamd":
        answers.spam = result
    else:
        answers.virus = result


_LIMITS = "Heuristics.Limits.Exceeded."


def _limit(virus: str | None) -> str | None:
    """The limit clamd names when its "virus" is its word that it stopped scanning at one of
    its limits (``AlertExceedsMax``: ``Heuristics.Limits.Exceeded.MaxRecursion``), else None.
    Without that alert clamd answered such a message ``OK``: a virus 16 zips deep, or behind
    400 MiB of unpacked zeros, passed as clean. It is refused like a virus, for good (the
    same message exceeds the same limit on every retry), but the reply and the log must not
    call it one: the sender and the admin are told what clamd could not do."""
    if virus is None or not virus.startswith(_LIMITS):
        return None
    return virus[len(_LIMITS) :] or None


def _reply(settings: ScanSettings, answers: _Answers) -> tuple[str, str]:
    """The reply (accept, junk, defer, refuse) and the SMTP text for defer and refuse."""
    if answers.virus is not None:
        limit = _limit(answers.virus)
        if limit is not None:
            return "refuse", f"5.7.1 message could not be scanned completely ({limit} exceeded)"
        return "refuse", f"5.7.1 virus found: {answers.virus}"
    chosen = "accept"
    if answers.spam is not None:
        chosen = settings.actions.get(answers.spam.action, "accept")
    if answers.errors and _RANK[chosen] < _RANK["refuse"] and settings.tempfail:
        return "defer", "4.7.1 message scanner unavailable, try again later"
    if chosen == "refuse":
        return chosen, "5.7.1 message refused as spam"
    if chosen == "defer":
        return chosen, "4.7.1 message deferred by the spam filter, try again later"
    return chosen, ""


def _fields(
    settings: ScanSettings, env: rspamd.Envelope, answers: _Answers, reply: str, secs: float
) -> str:
    """The key=value pairs of the log line (values without blanks)."""
    out = [f"host={env.hostname or 'unknown'}"] if settings.rspamd is not None else []
    out.append(f"scan={reply}")
    if answers.spam is not None:
        s = answers.spam
        out += [f"spam={s.action.replace(' ', '_')}", f"spam_score={s.score:.2f}/{s.required:.2f}"]
    virus_scanned = settings.clamd is not None and "clamd" not in _names(answers.skipped)
    if virus_scanned and not any(e.startswith("clamd:") for e in answers.errors):
        limit = _limit(answers.virus)
        out.append(f"scan_limit=clamd:{limit}" if limit else f"virus={answers.virus or 'clean'}")
    if answers.errors:
        out.append("scan_error=" + ",".join(answers.errors))
    if answers.skipped:
        out.append("not_scanned=" + ",".join(answers.skipped))
    out.append(f"scan_secs={secs:.3f}")
    return " ".join(out)


async def run(
    settings: ScanSettings, env: rspamd.Envelope, message: bytes, *, sent: int | None = None
) -> Outcome:
    """Scan ``message`` (see the module's docstring); never longer than ``scantimeout``.
    ``sent``: the bytes of it the client sent (``MessageEnd.client_size``), which decide
    whether it is too large for a scanner; None: all of ``message``."""
    started = time.monotonic()
    answers = await _ask(settings, env, message, len(message) if sent is None else sent)
    reply, text = _reply(settings, answers)
    log = _fields(settings, env, answers, reply, time.monotonic() - started)
    if reply == "refuse":
        return Outcome(Verdict("refuse", 554, text, log), False, message)
    if reply == "defer":
        return Outcome(Verdict("defer", 451, text, log), False, message)
    if answers.spam is not None:
        add, remove = answers.spam.add, answers.spam.remove
        if reply == "junk":
            add, remove = junk_fields(answers.spam)
        message = edit(message, add, remove)
    return Outcome(Verdict("accept", 250, "", log), reply == "junk", message)


def junk_fields(
    spam: rspamd.Reply,
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, int], ...]]:
    """rspamd's header edits for a message going to Junk, with pyqmail's own ``X-Spam: Yes``
    and ``X-Spam-Status`` (score, threshold, action) when rspamd sent no ``X-Spam``: it sends
    no fields at all when it skipped its rules (GTUBE's test patterns, a settings rule), and
    a mail filter must still see why the message is in Junk. Incoming fields of those names
    go first, so a sender cannot forge them."""
    if any(name.lower() == "x-spam" for name, _ in spam.add):
        return spam.add, spam.remove
    status = (
        f"Yes, score={spam.score:.2f}, required={spam.required:.2f}, "
        f"action={spam.action.replace(' ', '_')}"
    )
    own = (("X-Spam", "Yes"), ("X-Spam-Status", status))
    mine = {name.lower() for name, _ in own}
    added = tuple((n, v) for n, v in spam.add if n.lower() not in mine)
    return own + added, (*spam.remove, ("X-Spam", 0), ("X-Spam-Status", 0))


# The header fields the scanning stage vouches for: rspamd's (its milter_headers routines:
# X-Spam, X-Spam-Status, X-Spam-Level, X-Spamd-Result, X-Spamd-Bar, X-Rspamd-Server,
# X-Rspamd-Queue-Id, ...) and pyqmail's own Junk fields (X-Spam, X-Spam-Status). clamd adds
# none (a virus is refused, never marked), so X-Virus-* is not ours and stays.
OURS = ("x-spam", "x-spam-", "x-spamd-", "x-rspamd-")
_OURS_START = re.compile(rb"(?im)^[ \t]*x-(?:spam|rspamd-)")  # a line that may name one of OURS


def strip_ours(message: bytes) -> bytes:
    """Inbound ``message`` without header fields of the families the scanning stage writes
    (``OURS``), the same object when it has none. Why all of them, and whatever the scan
    does: rspamd asks to remove only the fields it is about to add, and only when its rules
    ran, so a sender's ``X-Spam-Flag: NO`` or ``X-Spam-Level`` survived a scan, a forged
    ``X-Spamd-Result`` a Junk verdict without rspamd's fields, and every one of them a
    message not scanned at all; a mail filter reading them would trust the sender's word
    for ours. ``smtpd/intake.py`` calls it for mail with no ``origin`` that is to be scanned,
    before the scan and whatever it does (a scanner down and ``scantempfail`` 0 accepts it
    unscanned); a client exempt from scanning (``SCAN``, ``scanclients``) keeps its fields:
    the admin exempted it on purpose (a backup MX's scanning upstream), and its spilled
    message is not read back whole only to look at its header. A line that is no field
    (``pyqmail.headers.raw_fields``) ends nothing: the fields after it are read, and the
    line itself goes when a reader may take it for one of ours (``_reader_name``)."""
    head, rest = head_and_rest(message)
    if not _OURS_START.search(head):  # the usual case: one scan in C, no split
        return message
    pieces = raw_fields(head)
    kept = [text for name, text in pieces if not _ours(_reader_name(name, text))]
    if len(kept) == len(pieces):
        return message
    return b"".join(kept) + rest


def _ours(name: bytes) -> bool:
    text = name.decode("latin-1")
    return text == OURS[0] or text.startswith(OURS[1:])


def _reader_name(name: bytes, text: bytes) -> bytes:
    """The lower-case name of a piece of ``raw_fields``: a field's name; for a stray line,
    what comes before the first colon of its first line (the whole line when it has none),
    blanks stripped, as Dovecot's header parser names such a line (its continuation lines
    are its value). rspamd skips stray lines and Dovecot's IMAP SEARCH finds none by that
    name, but a reader more lenient than those must not find one of ours in a line
    ``strip_ours`` kept (a sender's colon-less ``X-Spam-Flag``)."""
    if name:
        return name.lower()
    end = text.find(b"\n")
    return (text if end < 0 else text[:end]).split(b":", 1)[0].strip().lower()


def edit(
    message: bytes, add: tuple[tuple[str, str], ...], remove: tuple[tuple[str, int], ...]
) -> bytes:
    """The message with the fields in ``remove`` gone (milter's index: 0 every one, n the
    n-th, -n the n-th from the end) and those in ``add`` on top, CRLF-terminated. Fields
    are named as ``strip_ours`` names them (``_reader_name``)."""
    head, rest = head_and_rest(message)
    pieces = raw_fields(head)
    names = [_reader_name(name, text) for name, text in pieces]
    drop: set[int] = set()
    for name, index in remove:
        wanted = name.lower().encode()
        places = [i for i, n in enumerate(names) if n == wanted]
        if index == 0:
            drop.update(places)
        elif 0 < index <= len(places):
            drop.add(places[index - 1])
        elif 0 < -index <= len(places):
            drop.add(places[index])
    top = b"".join(f"{name}: {value}\r\n".encode("utf-8", "replace") for name, value in add)
    kept = b"".join(text for i, (_, text) in enumerate(pieces) if i not in drop)
    return top + kept + rest
