"""pyqmail-send's completion: recording outcomes, ending messages and segments, bouncing.

``Finisher._complete`` records each attempt (``pyqmail.queue.state``), ``finish`` bounces and
removes what is done in the order the durability protocol of ``pyqmail.send.manager``
describes, ``_bounce`` queues the DSN (``pyqmail.send.bounce``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pyqmail.queue.dirsync import fsync_dir
from pyqmail.queue.format import QueueError
from pyqmail.queue.state import Attempt, Bounced, append_end, append_state
from pyqmail.send.bounce import Failure, bounce_target, make_dsn, needs_smtputf8
from pyqmail.send.delivery import Result, one_line
from pyqmail.send.scheduler import Msg, Scheduler, nextretry, take_due

# seconds before a bounce that could not be queued, or an end that could not be recorded
# (a full disk, EIO), is tried again: not at every pass of the main loop, which would spin
# at full speed with a warning per pass
FINISH_RETRY = 15.0


class Finisher(Scheduler):
    """Completion and bounces; the attributes are the manager's (``Manager.__init__``)."""

    def _complete(self, queue_id: str, index: int, result: Result) -> None:
        msg = self.msgs[queue_id]
        r = msg.rcpts[index]
        now = time.time()
        expired = False
        if result.kind == "temp" and now >= msg.env.received + self.control.queuelifetime:
            expired = True
        event = {"ok": "done", "perm": "failed", "temp": "deferred"}[result.kind]
        if expired:
            event = "failed"
        record = Attempt(
            event,  # type: ignore[arg-type]
            index,
            round(now, 3),
            one_line(result.detail, 1000),
            result.status,
            result.remote,
            result.diagnostic,
            expired,
        )
        with self.lock:  # the last recipient of a clean message needs no record: see finish()
            last = event == "done" and all(o.status == "done" for o in msg.rcpts if o is not r)
        state_error = ""
        if not last:
            with msg.lock:
                msg.has_state = True
                try:
                    append_state(
                        Path(self._p("state", queue_id)), record, durable=event != "deferred"
                    )
                except OSError as exc:
                    state_error = str(exc)
        self.log(
            f"delivery {queue_id} {index} to=<{one_line(r.address)}> "
            f"result={'expired' if expired else event} host={one_line(result.remote)} "
            f"tls={result.tls} verified={result.verified} detail={one_line(result.detail)}"
        )
        clean = wake = False
        with self.lock:
            r.last_try = now
            r.result = result
            if state_error:
                # not recorded: treat as not done (a duplicate later beats a loss)
                self.log(f"warning cannot record state of {queue_id}: {state_error}")
                r.status = "pending"
                r.next_try = nextretry(msg.env.received, now, r.channel)
                self._push(queue_id, r)
                wake = True
            elif event == "deferred":
                r.status = "pending"
                r.next_try = nextretry(msg.env.received, now, r.channel)
                self._push(queue_id, r)
                wake = True  # the main loop's sleep may now be too long
                self._drop_body(msg)  # it may wait for days: read it again then
            else:
                r.status = event
                r.expired = expired
                if msg.finished:
                    if msg.has_state or any(o.status == "failed" for o in msg.rcpts):
                        self.to_finish.add(queue_id)
                        wake = True
                    else:
                        self._forget(queue_id)  # clean and stateless: finished right here
                        clean = True
        if clean:
            self._delete_clean(queue_id, msg)
        if wake:
            self.wake()

    def _delete_clean(self, queue_id: str, msg: Msg) -> None:
        """Remove a message delivered everywhere that has no state file.

        No fsync: if a crash undoes the unlink, the message is delivered again (nothing
        was recorded done), which is the same window qmail has. Runs in the worker, so
        the main loop never waits on the file system for it. A message of a segment is
        ended by a line in the segment's state file instead (``_end_in_segment``).
        """
        if not self._end_message(queue_id, msg):
            with self.lock:  # let finish() retry the careful way
                msg.has_state = True
                self.msgs[queue_id] = msg
                self.to_finish.add(queue_id)
            self.wake()
            return
        self.log(f"end msg {queue_id}")

    def _remove_mess(self, name: str) -> bool:
        """Unlink mess/<name> (a message's file or a segment); False, logged, if it stays."""
        try:
            os.unlink(self._p("mess", name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log(f"warning cannot remove mess/{name}: {exc}")
            return False
        return True

    def _end_message(self, queue_id: str, msg: Msg) -> bool:
        """A finished message leaves the queue: its file goes, or, in a segment, its end is
        recorded. False, logged, if that failed (the message stays and is tried again)."""
        if msg.span is None:
            return self._remove_mess(msg.file)  # named by its queue id (``Queue.load``)
        try:
            self._end_in_segment(queue_id, msg)
        except OSError as exc:
            self.log(f"warning cannot record the end of {queue_id} in state/{msg.file}: {exc}")
            return False
        return True

    def _end_in_segment(self, queue_id: str, msg: Msg) -> None:
        """Record the end of a message that lives in a segment (any thread); once every
        message of the segment has ended, ``finish`` removes the file."""
        append_end(self._p("state", msg.file), queue_id)
        with self.lock:
            segment = self.segments[msg.file]
            segment.live.discard(queue_id)
            if msg.has_state:
                segment.stateful.add(queue_id)
            if segment.live:
                return
            self.segments_done.add(msg.file)
        self.wake()

    def finish(self) -> None:
        """Bounce and delete messages whose recipients are all done or failed; remove
        segments whose messages have all ended. What fails is tried again in
        ``FINISH_RETRY`` seconds (``_later``)."""
        now = time.time()
        with self.lock:
            due = self.to_finish.union(take_due(self.finish_later, now))
            ids, self.to_finish = sorted(due), set()
        unlinked: list[str] = []
        ended: list[str] = []  # messages of segments: their state files stay for now
        for queue_id in ids:
            msg = self.msgs[queue_id]
            failures = [
                Failure(r.address, r.result or Result.perm("failed"), r.last_try, r.expired)
                for r in msg.rcpts
                if r.status == "failed"
            ]
            if failures and not msg.bounced and not self._bounce(queue_id, msg, failures):
                self._later(self.finish_later, queue_id)
            elif self._end_message(queue_id, msg):
                (unlinked if msg.span is None else ended).append(queue_id)
            else:
                self._later(self.finish_later, queue_id)
        for queue_id in ended:
            with self.lock:
                self._forget(queue_id)
            self.log(f"end msg {queue_id}")
        with self.lock:  # after the ends above, which may have completed segments
            names = self.segments_done.union(take_due(self.segments_later, now))
            segments, self.segments_done = sorted(names), set()
        removed = []
        for name in segments:
            if self._remove_mess(name):
                removed.append(name)
            else:
                self._later(self.segments_later, name)
        self._forget_removed(unlinked, removed)

    def _later(self, later: dict[str, float], name: str) -> None:
        """Try this message's (or segment's) end again in ``FINISH_RETRY`` seconds."""
        with self.lock:
            later[name] = time.time() + FINISH_RETRY

    def _forget_removed(self, unlinked: list[str], removed: list[str]) -> None:
        """After the unlinks of messages and segments from mess/: fsync mess/, then remove
        their state files (a state file without its message is removed at start). If the
        fsync fails, the state files stay and the ends are tried again (the unlinks then
        find nothing to do, and the fsync comes again)."""
        if unlinked or removed:
            try:
                fsync_dir(self.queue.path("mess"))
            except OSError as exc:
                self.log(f"warning cannot sync mess/: {exc}; ends tried again")
                for queue_id in unlinked:
                    self._later(self.finish_later, queue_id)
                for name in removed:
                    self._later(self.segments_later, name)
                return
        for queue_id in unlinked:
            self._unlink_state(queue_id)
            with self.lock:
                self._forget(queue_id)
            self.log(f"end msg {queue_id}")
        for name in removed:
            with self.lock:
                segment = self.segments.pop(name)
            for queue_id in sorted(segment.stateful):
                self._unlink_state(queue_id)
            self._unlink_state(name)
            self.log(f"end segment {name}")

    def _unlink_state(self, name: str) -> None:
        """Remove state/<name> of an ended message or segment; if that fails, it is an
        orphan that the next start removes (logged, not fatal)."""
        try:
            os.unlink(self.queue.path("state", name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log(f"warning cannot remove state/{name}: {exc}")

    def _bounce(self, queue_id: str, msg: Msg, failures: list[Failure]) -> bool:
        """Queue the DSN, then record it (``bounced``); False, logged, if either failed
        (``finish`` tries again later). The DSN's id is kept on the message once it is
        queued: a retry after a failed record only writes the record, where it queued
        one more DSN each time. (A crash between the enqueue and the record queues it
        again at the next start: qmail's window too, a duplicate bounce, never a lost
        one.)"""
        if msg.bounce_id is None:
            bounce_id = self._queue_dsn(queue_id, msg, failures)
            if bounce_id is None:
                return False
            msg.bounce_id = bounce_id
        try:
            with msg.lock:
                append_state(
                    self.queue.path("state", queue_id),
                    Bounced(round(time.time(), 3), msg.bounce_id),
                )
        except OSError as exc:
            self.log(f"warning cannot record bounce of {queue_id}: {exc}")
            return False
        msg.bounced = True
        return True

    def _queue_dsn(self, queue_id: str, msg: Msg, failures: list[Failure]) -> str | None:
        """Queue the DSN of ``msg``: its queue id, "" when it is dropped (a failed double
        bounce), None, logged, if it could not be queued now."""
        target = bounce_target(msg.env, self.control)
        if target is None:
            why = (
                "a failed double bounce"
                if msg.env.sender
                else "doublebounceto is empty: double bounce"
            )
            self.log(f"bounce msg {queue_id} dropped: {why} (qmail drops these)")
            return ""
        read = self._read_body(queue_id)
        if isinstance(read, Result):
            self.log(f"warning cannot bounce {queue_id}: {read.detail}")
            return None
        dsn = make_dsn(msg.env, read[1], failures, target=target, control=self.control)
        # origin: signed like submitted mail when bouncehost is a signing domain; smtputf8:
        # a DSN in RFC 6533's global types leaves only with SMTPUTF8 (not one that merely
        # copies the 8-bit header of an original sent without it: ``bounce._global``)
        meta = {"bounce_of": queue_id, "origin": "bounce"}
        if needs_smtputf8(dsn):
            meta["smtputf8"] = "1"
        try:
            bounce_env = self.queue.enqueue(target.sender, [target.recipient], dsn, meta)
        except QueueError as exc:
            self.log(f"warning cannot queue bounce for {queue_id}: {exc}")
            return None
        kind = "double bounce" if target.double else "bounce"
        self.log(f"bounce msg {queue_id} {kind} qp {bounce_env.queue_id} to=<{target.recipient}>")
        return bounce_env.queue_id
