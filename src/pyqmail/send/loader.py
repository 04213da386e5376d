"""pyqmail-send's reading of the queue: the start-up (``mess/`` and its state files), the
pickup (``new/`` -> ``mess/``), and reading again what could not be read.

The protocols are in ``pyqmail.send.manager``'s docstring. What this module adds to them:
a file is scheduled whole or not at all (a segment whose one state file cannot be read is
held with all its messages, so reading it again cannot schedule a message twice), and a
file that cannot be read now is held, not set aside (``_hold``, ``_hold_new``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import replace
from pathlib import Path

from pyqmail.dkim.keys import Key
from pyqmail.dkim.pickup import sign_batch
from pyqmail.queue.dirsync import fsync_dir
from pyqmail.queue.format import QueueError, QueueUnreadableError, Stored, id_order
from pyqmail.queue.state import Ended, Record, Signed, read_state
from pyqmail.send.delivery import one_line
from pyqmail.send.finisher import Finisher
from pyqmail.send.scheduler import Msg, Segment, load_msg, take_due

BODY_CACHE = 16 * 1024 * 1024  # bytes of messages kept from pickup for their first delivery
# bytes of new/ read before they are signed, moved and scheduled (``pickup``): with
# BODY_CACHE, what a pickup holds of message bodies, whatever the size of new/
PICKUP_BATCH = 16 * 1024 * 1024
UNREAD_RETRY = 60.0  # seconds before a queue file that could not be read is read again
# a file of mess/ read at start: its name, its messages (their bodies dropped: ``_read_mess``),
# the state files read (by name)
Loaded = tuple[str, list[Stored], dict[str, list[Record]]]


class Loader(Finisher):
    """Start-up and pickup; the attributes are the manager's (``Manager.__init__``)."""

    dkim: dict[str, list[Key]]
    unread: dict[str, float]
    new_held: dict[str, float]

    def _clean_tmp(self) -> None:
        """Remove what crashed writers left in tmp/ (``Manager._clean_tmp``)."""
        raise NotImplementedError

    def startup(self) -> None:
        """Read mess/ (each file whole, with its state files), remove the orphan state
        files, schedule what is left to deliver, then pick up new/. Every file of mess/ is
        read before any state file is removed (``_remove_orphans`` needs every live queue
        id), but only its envelopes and spans are kept: a backlog of days does not have
        to fit in memory."""
        self._clean_tmp()
        loaded = [item for name in self.queue.ids("mess") if (item := self._read_mess(name))]
        self._remove_orphans(loaded)
        for item in loaded:
            self._resume(*item)
        self.pickup()

    def _read_mess(self, name: str) -> Loaded | None:
        """``mess/<name>`` and the state files of its messages that have not ended, all
        read or none: None when the file went to bad/ (it failed verification) or could
        not be read now (``_hold``: read again later, its state files kept). The file is
        verified whole, then its bodies are dropped: scheduling needs the envelopes and
        spans, and a delivery reads its message again (``Queue.read_stored``), so the
        start-up holds one file's bytes at a time, not the whole of mess/."""
        try:
            stored = self.queue.load("mess", name)
        except QueueUnreadableError as exc:
            if exc.errno == errno.ENOENT:  # the admin took it away: its state files stay
                self.log(f"warning mess/{name} is gone; its state files stay until a start")
            else:
                self._hold(name, str(exc))
            return None
        except QueueError as exc:
            self._quarantine("mess", name, exc)
            return None
        stored = [replace(s, body=b"") for s in stored]
        states: dict[str, list[Record]] = {}
        try:
            # a segment's own state file (its ends and signatures), or the message's
            states[name] = read_state(Path(self._p("state", name)))
            ended = {r.queue_id for r in states[name] if isinstance(r, Ended)}
            for s in stored:
                if s.span is not None and s.env.queue_id not in ended:
                    states[s.env.queue_id] = read_state(Path(self._p("state", s.env.queue_id)))
        except OSError as exc:
            where = exc.filename or f"the state of {name}"
            self._hold(name, f"cannot read {where}: {exc.strerror or exc}")
            return None
        return name, stored, states

    def _hold(self, name: str, why: str) -> None:
        """A file of mess/ that cannot be read now, or whose state cannot (EACCES after a
        wrong chown, EIO, EMFILE): it stays in mess/ with its state, unscheduled, and is
        read again in ``UNREAD_RETRY`` seconds. Not delivered from scratch, which would
        repeat the recipients its state records as done; not set aside in bad/, which is
        for files that fail verification."""
        self.log(f"warning {one_line(why)}; mess/{name} is read again in {UNREAD_RETRY:.0f} s")
        with self.lock:
            self.unread[name] = time.time() + UNREAD_RETRY

    def _remove_orphans(self, loaded: list[Loaded]) -> None:
        """Remove the state files whose message is gone from mess/ (a crash after the
        unlink of mess/<id>). Skipped while a file of mess/ could not be read: which
        state files are its messages' is not known then; they go at the next start at
        which every file of mess/ is read."""
        if self.unread:
            return
        keep = {name for name, _, _ in loaded}
        keep.update(s.env.queue_id for _, stored, _ in loaded for s in stored)
        for name in self.queue.ids("state"):
            if name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(self.queue.path("state", name))
                self.log(f"status removed orphan state {name}")

    def _resume(self, name: str, stored: list[Stored], states: dict[str, list[Record]]) -> None:
        """Schedule the messages of ``mess/<name>`` that have not ended, with the progress
        (and the DKIM signatures) their state files recorded."""
        own = states[name]
        signed = {r.queue_id: r.headers for r in own if isinstance(r, Signed)}
        live = [s for s in stored if s.env.queue_id in states]  # alone: its id is ``name``
        if stored[0].span is not None:
            segment = Segment({s.env.queue_id for s in live})
            # an ended message may have left a state file: remove it with the segment
            segment.stateful = {s.env.queue_id for s in stored} - segment.live
            with self.lock:
                self.segments[name] = segment
                if not live:
                    self.segments_done.add(name)
        for s in live:
            self._add(name, s, states[s.env.queue_id], signed.get(s.env.queue_id, b""))

    def _read_again(self, *, now_all: bool = False) -> None:
        """Read again what could not be read once its time has come: files of mess/
        (``_hold``) and of new/ (``_hold_new``; then a pickup). Each name has its own
        time, so a file that keeps failing does not put off the others. ``now_all``
        (ALRM, ``pyqmail-queue flush``): everything now, and a pickup whatever is held."""
        now = float("inf") if now_all else time.time()
        with self.lock:
            names = sorted(take_due(self.unread, now), key=id_order)
            if now_all:
                self.new_held = {}
            new_due = now_all or any(at <= now for at in self.new_held.values())
        if names and not self._synced(names):
            names = []
        for name in names:
            item = self._read_mess(name)
            if item is not None:
                self._resume(*item)
        if new_due:
            self.pickup()

    def _synced(self, names: list[str], when: str = "") -> bool:
        """fsync mess/ and new/ before the files ``names`` moved into mess/ are scheduled:
        after a pickup, and before files that a pickup whose fsyncs failed held are
        scheduled (their move must be durable before any delivery). False, and the files
        held (logged, ``when`` saying after what), if that fails. (On Linux a
        later fsync that succeeds does not prove that the failed one's changes reached the
        disk; a journaled file system usually turns read-only on such an error, so the
        retry keeps failing there. At worst a power loss then brings a delivered message
        back into new/: a duplicate, as for any move not yet durable.)"""
        try:
            fsync_dir(self.queue.path("mess"))
            fsync_dir(self.queue.path("new"))
        except OSError as exc:
            for name in names:
                self._hold(name, f"cannot sync mess/ and new/{when}: {exc}")
            return False
        return True

    def _quarantine(self, sub: str, name: str, exc: QueueError) -> None:
        if not self.queue.path(sub, name).exists():
            return  # gone meanwhile
        with contextlib.suppress(OSError):
            self.queue.quarantine(sub, name)
        if sub == "mess":
            with contextlib.suppress(OSError):
                os.unlink(self.queue.path("state", name))
        self.log(f"warning quarantined {name} to bad/: {one_line(str(exc))}")

    def _add(
        self, name: str, stored: Stored, records: list[Record], dkim: bytes = b""
    ) -> Msg | None:
        """Schedule one message of ``mess/<name>`` with the progress its records show;
        None, logged, if its queue id is scheduled already (a message of a segment that
        was held unread, whose ids ``_unused`` could not know: kept, never replaced)."""
        env = stored.env
        queue_id = env.queue_id
        msg = load_msg(env, records, self.control, time.time())
        msg.file, msg.span, msg.dkim = name, stored.span, dkim
        with self.lock:
            if queue_id in self.msgs:  # not replaced: see ``_unused``
                self.log(f"warning {queue_id} of mess/{name} is already queued: not scheduled")
                return None
            self.msgs[queue_id] = msg
            for r in msg.rcpts:
                if r.status == "pending":
                    self._push(queue_id, r)
            if msg.finished:
                self.to_finish.add(queue_id)
        return msg

    def pickup(self) -> int:
        """Move verified files from new/ to mess/ and schedule their messages, in batches
        of at most ``PICKUP_BATCH`` bytes of bodies (a file larger than that makes a batch
        alone): pyqmail-smtpd may have queued days of mail while pyqmail-send was stopped,
        and new/ read whole would not fit in memory. Each batch goes through every step
        of the protocol (``_move_batch``) before the next one is read."""
        batch: list[tuple[str, list[Stored]]] = []
        size = count = 0
        now = time.time()
        with self.lock:  # names gone from new/ are dropped here
            held, self.new_held = self.new_held, {}
        claimed: set[str] = set()  # the names and ids of the files this pickup takes
        with self.lock:  # once a pickup, not once a file: a backlog of files times ended ids
            ended = {q for segment in self.segments.values() for q in segment.stateful}
        for name in self.queue.ids("new"):
            if held.get(name, 0.0) > now:  # not readable a moment ago: not every poke
                with self.lock:
                    self.new_held[name] = held[name]
                continue
            try:
                stored = self.queue.load("new", name)
                self._unused(name, stored, claimed, ended)
            except QueueUnreadableError as exc:
                if exc.errno != errno.ENOENT:  # gone meanwhile: nothing to read again
                    self._hold_new(name, str(exc))
                continue
            except QueueError as exc:
                self._quarantine("new", name, exc)
                continue
            more = sum(len(s.body) for s in stored)
            if batch and size + more > PICKUP_BATCH:
                count += self._move_batch(batch)
                batch, size = [], 0
            batch.append((name, stored))
            size += more
        if batch:
            count += self._move_batch(batch)
        return count

    def _unused(self, name: str, stored: list[Stored], claimed: set[str], ended: set[str]) -> None:
        """Raise QueueError (the file goes to bad/) if the file ``new/<name>`` would take a
        name or a queue id already in use: ``mess/<name>``, a message or segment that this
        process schedules or holds, an ended message of a live segment (``ended``, taken
        once per pickup: segments are forgotten on this thread only, and a message that
        ends meanwhile is still in ``msgs``), or a file taken earlier in this pickup; else
        add its ids to ``claimed``. Any member of the queue's group can list new/ and write a
        valid file carrying an id seen there: renamed over ``mess/<id>``, it replaced an
        acknowledged message (its signing unlinked the original's state file first), and
        its messages replaced the original's in ``msgs`` (an IndexError in the main loop
        for one with fewer recipients). So this runs before the file is signed. The check
        of ``mess/`` cannot race: pyqmail-send alone creates names there (mode 0700), in
        this thread (the pickup), so no name can appear between this check and the rename;
        one that goes meanwhile (an end) at worst sets aside a file that was harmless."""
        ids = {s.env.queue_id for s in stored}
        if len(ids) < len(stored):
            raise QueueError(f"new/{name} holds one queue id twice")
        ids.add(name)  # a single message's name is its id (``Queue.load``)
        if os.path.lexists(self._p("mess", name)):
            raise QueueError(f"new/{name}: mess/{name} exists (a queue id already in use)")
        with self.lock:
            used = [
                q
                for q in sorted(ids)
                if q in claimed
                or q in self.msgs
                or q in self.segments
                or q in self.unread
                or q in ended
            ]
        if used:
            raise QueueError(f"new/{name} holds {used[0]}, a queue id already in use")
        claimed.update(ids)

    def _move_batch(self, loaded: list[tuple[str, list[Stored]]]) -> int:
        """Sign the files ``loaded`` from new/ (``sign_batch``: the signatures are durable
        before the rename), rename them into mess/, sync mess/ and new/, and only then
        schedule their messages; the number of messages moved. A file that could not be
        signed or moved stays in new/ (``_hold_new``); if the sync fails, the files moved
        are held (``_synced``) and scheduled once it succeeds."""
        signed, notes = sign_batch(loaded, self.dkim, self.queue.path("state"), self.log)
        moved: list[tuple[str, list[Stored]]] = []
        count = 0
        for name, stored in loaded:
            if name not in signed:  # its signatures could not be recorded (logged)
                self._hold_new(name)
                continue
            try:
                os.rename(self._p("new", name), self._p("mess", name))
            except OSError as exc:
                self._hold_new(name, f"cannot move {name} to mess/: {exc}")
                continue
            moved.append((name, stored))
            for s in stored:
                env = s.env
                count += 1
                self.log(
                    f"new msg {env.queue_id} from=<{one_line(env.sender)}> "
                    f"rcpts={len(env.recipients)} size={env.size}"
                    + (f" segment={name}" if s.span is not None else "")
                )
                if env.queue_id in notes:
                    self.log(f"dkim msg {env.queue_id} {notes[env.queue_id]}")
        if moved:
            if not self._synced([name for name, _ in moved], " after the pickup"):
                return count  # the move may not be durable: nothing delivered yet
            for name, stored in moved:
                self._schedule_new(name, stored, signed[name])
        return count

    def _hold_new(self, name: str, why: str = "") -> None:
        """A file of new/ that cannot be read, signed or moved now stays there and is
        picked up again in ``UNREAD_RETRY`` seconds (``_read_again``), whether or not a
        commit pokes the trigger meanwhile, and not sooner: a file that a member of the
        queue's group made unreadable (mode 0) costs one read and one warning a minute,
        not one per commit. ``why`` is logged when given (``sign_batch`` logs its own)."""
        if why:
            self.log(f"warning {one_line(why)}; new/{name} is read again in {UNREAD_RETRY:.0f} s")
        with self.lock:
            self.new_held[name] = time.time() + UNREAD_RETRY

    def _schedule_new(self, name: str, stored: list[Stored], signed: dict[str, bytes]) -> None:
        """Schedule the messages of a file just moved into mess/: no state file yet but the
        signatures' (``state/<name>``, a record of the message itself when alone)."""
        if stored[0].span is not None:
            with self.lock:
                self.segments[name] = Segment({s.env.queue_id for s in stored})
        for s in stored:
            dkim = signed.get(s.env.queue_id, b"")
            records: list[Record] = []
            if dkim and s.span is None:
                records.append(Signed(s.env.queue_id, dkim))  # state/<id> exists
            msg = self._add(name, s, records, dkim)
            if msg is None:
                continue
            with self.lock:  # the first delivery need not read the file again
                if self.body_bytes + len(s.body) <= BODY_CACHE:
                    msg.body = s.body
                    self.body_bytes += len(s.body)
