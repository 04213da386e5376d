"""Signing a pickup batch: pyqmail-send's ``new/`` → ``mess/`` step, where DKIM happens once.

``sign_batch`` decides for every message of the batch (``pyqmail.dkim.policy``), and makes
the signatures durable before the manager renames the files into ``mess/``: one
``state/<file>`` per queue file that holds a signed message (a ``Signed`` record per
message, one fdatasync per file: a segment's messages share theirs), then one fsync of
``state/`` for the whole batch. Unsigned mail costs no I/O at all. Why here and in this
order: ``src/pyqmail/queue/README.md`` ("DKIM").

That fsync is ``state/``'s shared one (``pyqmail.queue.dirsync.DirSync``, with the
delivery threads that create state files), and its ticket is taken before the first state
file is written: when it fails, or another thread's fails meanwhile, the batch's state
files are unlinked again and their files wait in ``new/``. The next pickup creates them
anew (``write_signed`` never rewrites one in place), so its own fsync has their names to
write; Linux answers a later fsync with success once a failure has been reported, and
believed for names that may never reach the disk, it would send the messages unsigned
after a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pyqmail.dkim.keys import Key
from pyqmail.dkim.policy import Decision, decide
from pyqmail.queue.dirsync import DirSync
from pyqmail.queue.format import Stored
from pyqmail.queue.state import Signed, write_signed

Batch = Sequence[tuple[str, Sequence[Stored]]]  # (file name in new/, its messages)


def _decide(stored: Stored, keys: Mapping[str, Sequence[Key]]) -> Decision:
    """``pyqmail.dkim.policy.decide``; a failure of it sends the message unsigned."""
    try:
        return decide(stored.env, stored.body, keys)
    except Exception as exc:  # noqa: BLE001 - a signing bug must not stop the queue
        return Decision(note=f"not signed: error {type(exc).__name__}: {exc}")


def sign_batch(
    loaded: Batch,
    keys: Mapping[str, Sequence[Key]],
    state_dir: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, dict[str, bytes]], dict[str, str]]:
    """(file -> {queue id: DKIM-Signature fields} for every file that may move on to
    ``mess/``, queue id -> note for the log). A file whose signatures could not be
    written, or synced (``state/``'s fsync), is left out, logged: it stays in ``new/``
    and the manager picks it up again later (``Loader._hold_new``)."""
    signed: dict[str, dict[str, bytes]] = {}
    notes: dict[str, str] = {}
    sync = DirSync.of(str(state_dir)) if keys else None  # no keys: nothing is signed
    ticket: int | None = None  # taken before the first state file: see the docstring
    for name, stored in loaded:
        made: dict[str, bytes] = {}
        for s in stored if keys else ():
            decision = _decide(s, keys)
            if decision.note:
                notes[s.env.queue_id] = decision.note
            if decision.headers:
                made[s.env.queue_id] = decision.headers
        if made and sync is not None:
            try:
                if ticket is None:  # opens state/ (EMFILE, EIO: this file waits in new/)
                    ticket = sync.ticket()
                write_signed(state_dir / name, [Signed(q, h) for q, h in made.items()])
            except OSError as exc:
                log(f"warning cannot record the DKIM signatures of {name}: {exc}")
                continue
        signed[name] = made
    if sync is not None and ticket is not None:
        try:
            sync.sync(ticket)
        except OSError as exc:  # not durable: the files just signed wait in new/
            log(f"warning cannot sync {state_dir}: {exc}; the files signed stay in new/")
            _unlink_signed(state_dir, [name for name, made in signed.items() if made], log)
            signed = {name: made for name, made in signed.items() if not made}
    return signed, notes


def _unlink_signed(state_dir: Path, names: Sequence[str], log: Callable[[str], None]) -> None:
    """Remove the state files written by a batch whose ``state/`` fsync failed (why: the
    module's docstring). One that cannot be removed is logged; its file waits in ``new/``
    all the same, and the next pickup's ``write_signed`` tries the unlink again before it
    writes (failing, the file waits again)."""
    for name in names:
        try:
            os.unlink(state_dir / name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log(f"warning cannot remove {state_dir / name} after the failed sync: {exc}")
