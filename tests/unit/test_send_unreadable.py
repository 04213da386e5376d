"""pyqmail-send and queue files it cannot read now (EIO, EACCES after a wrong chown,
EMFILE): such a file is neither set aside in bad/ (that is for files that fail
verification) nor delivered from scratch; it stays where it is and is read again after
``UNREAD_RETRY``. And a message whose end cannot be recorded is ended again after
``FINISH_RETRY``, not left in memory until a restart."""

from __future__ import annotations

import errno
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pyqmail.queue.state import Attempt, append_state
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.send import finisher, loader
from pyqmail.send.loader import UNREAD_RETRY
from pyqmail.send.manager import Log, Manager
from tests.queue_util import commit


@pytest.fixture
def root(send_root: Path) -> Path:
    return send_root


def _message(q: Queue, recipients: int = 1, *, defer: bool = False) -> QueueWriter:
    """One message to user@mx.test (``recipients`` times); ``defer`` (held in memory)
    makes ``commit`` put it in a segment."""
    w = QueueWriter(q, "a@remote.test", ["user@mx.test"] * recipients, defer=defer)
    w.write(b"Subject: s\r\n\r\nbody\r\n")
    return w


def _queued(q: Queue, recipients: int = 1, *, defer: bool = False) -> str:
    """Commit one message (``_message``); the name of the file it made in new/."""
    before = set(q.ids("new"))
    commit([_message(q, recipients, defer=defer)])
    (name,) = set(q.ids("new")) - before
    return name


def _manager(root: Path) -> tuple[Manager, io.StringIO]:
    """A queue manager on ``root`` (its delivery children started) and its log."""
    out = io.StringIO()
    return Manager(root, Log(out)), out


def _drain(m: Manager, timeout: float = 10.0) -> None:
    """Run the main loop's passes (without its sleep) until nothing is in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m._read_again()
        m.dispatch()
        m.finish()
        with m.lock:
            busy = m.busy_local or m.busy_remote or m.to_finish or m.segments_done
        if not busy:
            return
        time.sleep(0.01)
    raise AssertionError("deliveries still in flight")


def _delivered(root: Path) -> int:
    maildir = root.parent / "home" / "Maildir" / "new"
    return len(os.listdir(maildir)) if maildir.exists() else 0


def _failing(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str, broken: set[str]
) -> Callable[[], None]:
    """Make ``module.name(path, ...)`` raise EIO for paths whose last part is in
    ``broken`` (``os`` itself for ``os.open``, ``os.unlink``: for the whole process, but
    only for those names); returns a function that mends it."""
    real = getattr(module, name)

    def failing(path: object, *args: object, **kwargs: object) -> object:
        if os.path.basename(os.fspath(path)) in broken:  # type: ignore[arg-type]
            raise OSError(errno.EIO, "Input/output error", os.fspath(path))  # type: ignore[arg-type]
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return broken.clear


def _time_has_come(*later: dict[str, float]) -> None:
    """Everything waiting in these ``name -> time`` maps is due now (no 60 s sleeps)."""
    for waiting in later:
        for name in waiting:
            waiting[name] = 0.0


def _picked_up(root: Path, q: Queue) -> None:
    """Move what new/ holds into mess/, as a pyqmail-send that then crashed would."""
    Manager(root, Log(io.StringIO())).pickup()


def test_a_state_file_that_cannot_be_read_at_start_is_read_again_later(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start a message's state file exists but cannot be read: pyqmail-send neither
    stops (it did, at every start) nor delivers that message again from scratch (which
    would repeat the recipients it records as done); it serves the rest, keeps the
    message and its state, and reads them again after UNREAD_RETRY."""
    q = Queue(root / "queue")
    commit([_message(q, 2)])
    commit([_message(q)])
    first, second = q.ids("new")  # files of their own, named by their queue ids
    _picked_up(root, q)
    append_state(q.root / "state" / first, Attempt("done", 0, time.time(), "delivered"))
    mend = _failing(monkeypatch, loader, "read_state", {first})
    m, out = _manager(root)
    m.startup()
    assert f"warning cannot read {q.root}/state/{first}: Input/output error" in out.getvalue()
    assert f"mess/{first} is read again in {UNREAD_RETRY:.0f} s" in out.getvalue()
    assert list(m.msgs) == [second]
    _drain(m)
    assert q.ids("mess") == [first] and q.ids("state") == [first]
    assert _delivered(root) == 1
    assert UNREAD_RETRY - 1 < m._sleep_time() <= UNREAD_RETRY  # the loop wakes for it
    mend()
    _drain(m)
    assert _delivered(root) == 1, "read again before UNREAD_RETRY"
    _time_has_come(m.unread)  # the wait is over
    _drain(m)
    assert q.ids("mess") == [] and q.ids("state") == []
    assert _delivered(root) == 2  # first's recipient 0 is not delivered again


def test_a_segment_is_read_whole_or_not_at_all(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One message's state file in a segment cannot be read: none of the segment's
    messages is scheduled (a retry of the file must not schedule the others twice), and
    no state file is removed as an orphan meanwhile (whose they are is not known)."""
    q = Queue(root / "queue")
    commit([_message(q, defer=True), _message(q, defer=True)])
    (segment,) = q.ids("new")
    _picked_up(root, q)
    ids = sorted(s.env.queue_id for s in q.load("mess", segment))
    broken = q.root / "state" / ids[1]
    append_state(broken, Attempt("deferred", 0, time.time(), "try later"), durable=False)
    orphan = q.root / "state" / "18ee4a00000000a0.9.gone"
    orphan.write_bytes(b"")
    mend = _failing(monkeypatch, loader, "read_state", {ids[1]})
    m, out = _manager(root)
    m.startup()
    assert f"mess/{segment} is read again" in out.getvalue()
    assert m.msgs == {} and m.segments == {}
    assert orphan.exists() and broken.exists()
    mend()
    _time_has_come(m.unread)
    _drain(m)
    assert sorted(m.msgs) == [ids[1]]  # deferred: waits for its retry, the other is done
    assert _delivered(root) == 1


def test_a_queue_file_that_cannot_be_read_at_start_stays_in_mess(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO on a file of mess/ at start: it is not set aside in bad/ with its state file
    unlinked (it was, as if it failed verification), but read again later."""
    q = Queue(root / "queue")
    name = _queued(q, 2)
    _picked_up(root, q)
    append_state(q.root / "state" / name, Attempt("done", 0, time.time(), "delivered"))
    mend = _failing(monkeypatch, os, "open", {name})
    m, out = _manager(root)
    m.startup()
    mend()
    assert "Input/output error" in out.getvalue() and "quarantined" not in out.getvalue()
    assert q.ids("mess") == [name] and q.ids("state") == [name] and q.ids("bad") == []
    _time_has_come(m.unread)
    _drain(m)
    assert q.ids("mess") == [] and q.ids("state") == []
    assert _delivered(root) == 1  # recipient 0 is not delivered again


def test_a_file_of_new_that_cannot_be_read_is_read_again_without_a_poke(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO on a file of new/ at pickup: it stays in new/ (not in bad/) and is picked up
    after UNREAD_RETRY, even if no commit pokes the trigger meanwhile."""
    q = Queue(root / "queue")
    name = _queued(q)
    mend = _failing(monkeypatch, os, "open", {name})
    m, out = _manager(root)
    assert m.pickup() == 0
    mend()
    assert f"new/{name} is read again in" in out.getvalue()
    assert q.ids("new") == [name] and q.ids("bad") == []
    assert UNREAD_RETRY - 1 < m._sleep_time() <= UNREAD_RETRY
    _time_has_come(m.new_held)
    _drain(m)
    assert q.ids("new") == [] and q.ids("mess") == [] and _delivered(root) == 1


def test_a_copy_under_another_name_goes_to_bad(root: Path) -> None:
    """A single-message file whose name is not its queue id (an admin's copy, or a file
    brought back from bad/ under another name) was delivered again at every start, since
    its end unlinked mess/<id>, not the file. It fails verification now."""
    q = Queue(root / "queue")
    name = _queued(q)
    os.link(q.path("new", name), q.path("new", "18ee4a00000000a0.8.copy"))
    m, out = _manager(root)
    assert m.pickup() == 1
    assert f"quarantined 18ee4a00000000a0.8.copy to bad/: {q.path('new')}" in out.getvalue()
    assert f"holds {name}: a queue file is named by its id" in out.getvalue()
    _drain(m)
    assert q.ids("bad") == ["18ee4a00000000a0.8.copy"] and _delivered(root) == 1


def _passes_until(m: Manager, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not done() and time.monotonic() < deadline:
        m.dispatch()
        m.finish()
        time.sleep(0.01)
    for _ in range(50):  # passes of the main loop: none of them may try again
        m.finish()


def test_an_end_that_cannot_be_recorded_is_tried_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unlink of mess/<id> fails, at the worker's try and at finish()'s: the message
    stays queued and is ended after FINISH_RETRY, neither kept in memory until a restart
    (it was) nor tried at every pass of the loop."""
    q = Queue(root / "queue")
    name = _queued(q)
    mend = _failing(monkeypatch, os, "unlink", {name})
    m, out = _manager(root)
    assert m.pickup() == 1
    _passes_until(m, lambda: bool(m.finish_later))
    assert out.getvalue().count(f"warning cannot remove mess/{name}") == 2
    assert finisher.FINISH_RETRY - 1 < m._sleep_time() <= finisher.FINISH_RETRY
    mend()
    _time_has_come(m.finish_later)  # the wait is over
    _drain(m)
    assert q.ids("mess") == [] and m.msgs == {} and _delivered(root) == 1


def test_a_segment_whose_end_or_unlink_fails_is_tried_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a segment, first the end line of its message cannot be appended, then the
    segment cannot be unlinked: each is tried again after FINISH_RETRY, and the segment
    goes in the end."""
    q = Queue(root / "queue")
    segment = _queued(q, defer=True)
    mend_end = _failing(monkeypatch, finisher, "append_end", {segment})
    m, out = _manager(root)
    assert m.pickup() == 1
    _passes_until(m, lambda: bool(m.finish_later))
    assert out.getvalue().count("warning cannot record the end of") == 2
    mend_end()
    mend_unlink = _failing(monkeypatch, os, "unlink", {segment})
    _time_has_come(m.finish_later)
    _passes_until(m, lambda: bool(m.segments_later))
    assert m.msgs == {} and list(m.segments) == [segment]  # the message ended; the file stays
    assert out.getvalue().count(f"warning cannot remove mess/{segment}") == 1
    assert finisher.FINISH_RETRY - 1 < m._sleep_time() <= finisher.FINISH_RETRY
    mend_unlink()
    _time_has_come(m.segments_later)
    _drain(m)
    assert q.ids("mess") == [] and q.ids("state") == [] and m.segments == {}
    assert _delivered(root) == 1


def test_a_file_of_new_that_keeps_failing_puts_off_nothing_else(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of new/ that stays unreadable (a member of the queue's group can leave one
    of mode 0 there) is read once a minute, whatever the pokes, with one warning each
    time; and a held file of mess/ is still read again on its own time (one shared
    deadline, moved by every failing pickup, once kept it waiting for good)."""
    q = Queue(root / "queue")
    held = _queued(q)
    _picked_up(root, q)
    mend_state = _failing(monkeypatch, loader, "read_state", {held})
    stuck = _queued(q)
    _failing(monkeypatch, os, "open", {stuck})
    m, out = _manager(root)
    m.startup()
    assert list(m.unread) == [held] and list(m.new_held) == [stuck]
    times = dict(m.unread), dict(m.new_held)
    for _ in range(20):  # commits poke the trigger: each is a pickup
        commit([_message(q)])
        m.pickup()
    assert out.getvalue().count(f"new/{stuck} is read again") == 1
    assert (m.unread, m.new_held) == times  # nobody's time was moved
    assert len(m.msgs) == 20
    mend_state()
    _time_has_come(m.unread)
    _drain(m)
    assert held not in q.ids("mess") and _delivered(root) == 21
    assert q.ids("new") == [stuck] and q.ids("bad") == []


def test_a_held_file_that_is_taken_away_is_let_go(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin removes (or sets aside) a file of mess/ that was held: it is dropped,
    with one line, not read again (and warned about) every minute until a restart."""
    q = Queue(root / "queue")
    name = _queued(q)
    _picked_up(root, q)
    _failing(monkeypatch, loader, "read_state", {name})
    m, out = _manager(root)
    m.startup()
    assert list(m.unread) == [name]
    os.rename(q.path("mess", name), q.path("bad", name))
    _time_has_come(m.unread)
    m._read_again()
    assert m.unread == {} and f"warning mess/{name} is gone" in out.getvalue()
    assert m._sleep_time() > UNREAD_RETRY - 1


def test_an_end_whose_fsync_of_mess_fails_keeps_the_state_and_comes_again(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync(mess/) fails after the unlink of a finished message's file: its state file
    must stay (the unlink may not be durable) and pyqmail-send must not stop (the
    OSError escaped the main loop); the end is tried again, fsync and all."""
    q = Queue(root / "queue")
    name = _queued(q, 2)
    real_fsync_dir = finisher.fsync_dir
    fails = [1]

    def fsync_dir(path: object) -> None:
        if fails[0]:
            fails[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(finisher, "fsync_dir", fsync_dir)
    m, out = _manager(root)
    assert m.pickup() == 1  # two recipients: the first one's done record makes state/<id>
    _passes_until(m, lambda: bool(m.finish_later))
    assert "warning cannot sync mess/" in out.getvalue()
    assert q.ids("mess") == [] and q.ids("state") == [name] and list(m.msgs) == [name]
    _time_has_come(m.finish_later)
    _drain(m)
    assert q.ids("state") == [] and m.msgs == {} and _delivered(root) == 2


def test_a_file_of_new_that_cannot_be_moved_is_picked_up_again_on_its_own(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename of a file from new/ into mess/ fails: the file waits UNREAD_RETRY and is
    then picked up, with no commit to poke the trigger (it waited for the next one)."""
    q = Queue(root / "queue")
    name = _queued(q)
    mend = _failing(monkeypatch, os, "rename", {name})
    m, out = _manager(root)
    assert m.pickup() == 0
    assert f"cannot move {name} to mess/" in out.getvalue() and list(m.new_held) == [name]
    mend()
    assert m.pickup() == 0  # a poke a moment later: not yet
    _time_has_come(m.new_held)
    _drain(m)
    assert q.ids("new") == [] and q.ids("mess") == [] and _delivered(root) == 1


def test_alrm_reads_everything_held_at_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin mends what made files unreadable and runs ``pyqmail-queue flush``: the
    ALRM it sends reads every held file of new/ and mess/ now, not a minute later."""
    q = Queue(root / "queue")
    held = _queued(q)
    _picked_up(root, q)
    mend_state = _failing(monkeypatch, loader, "read_state", {held})
    stuck = _queued(q)
    mend_open = _failing(monkeypatch, os, "open", {stuck})
    m = Manager(root, Log(io.StringIO()))
    m.startup()
    assert list(m.unread) == [held] and list(m.new_held) == [stuck]
    mend_state()
    mend_open()
    m.flags.add("alrm")
    m._handle_flags()
    assert m.unread == {} and m.new_held == {} and sorted(m.msgs) == sorted([held, stuck])
    _drain(m)
    assert q.ids("new") == [] and q.ids("mess") == [] and _delivered(root) == 2


def test_a_pickup_whose_fsyncs_fail_holds_what_it_moved(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync(mess/) fails after the renames of a pickup: nothing it moved is delivered
    before the move is durable, and pyqmail-send does not stop (the OSError escaped the
    main loop). The files are held in mess/ and scheduled once mess/ and new/ sync."""
    q = Queue(root / "queue")
    name = _queued(q)
    real_fsync_dir = loader.fsync_dir
    failing = [True]

    def fsync_dir(path: object) -> None:
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "fsync_dir", fsync_dir)
    m, out = _manager(root)
    m.pickup()
    assert "cannot sync mess/ and new/ after the pickup" in out.getvalue()
    assert q.ids("mess") == [name] and m.msgs == {} and list(m.unread) == [name]
    _time_has_come(m.unread)
    m._read_again()  # still failing: held again, not scheduled
    assert m.msgs == {} and list(m.unread) == [name]
    failing[0] = False
    _time_has_come(m.unread)
    _drain(m)
    assert q.ids("mess") == [] and _delivered(root) == 1
