"""How pyqmail-send is woken: its own scan of new/ when no poke came, and
``pyqmail-queue flush``, which must neither keep pyqmail-send from starting nor signal
a process that is not pyqmail-send."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyqmail.queue.store import PIDFILE, Queue
from pyqmail.send import manager
from pyqmail.send.manager import Log, Manager, lock_pidfile
from pyqmail.tools.queue import flush, sender_pid


def _maildir(root: Path) -> Path:
    return root.parent / "home" / "Maildir" / "new"


def _commit_without_poke(root: Path) -> None:
    """One message for user@mx.test into new/, its poke lost."""
    q = Queue(root / "queue")
    q.poke = lambda: None  # type: ignore[method-assign]
    q.enqueue("a@remote.test", ["user@mx.test"], b"Subject: s\r\n\r\nbody\r\n")
    q.close()


def test_new_is_scanned_without_a_poke(send_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message committed after the start-up scan whose poke never came (it was skipped
    for a second after a poke found no reader) is picked up by the scan of new/ that
    pyqmail-send makes every RESCAN_NEW seconds; it used to wait for another commit's
    poke or an ALRM."""
    monkeypatch.setattr(manager, "RESCAN_NEW", 0.2)
    monkeypatch.setattr(manager, "MAX_SLEEP", 0.2)
    out = io.StringIO()
    m = Manager(send_root, Log(out))
    started = threading.Event()
    real_startup = m.startup

    def startup() -> None:
        real_startup()
        started.set()

    monkeypatch.setattr(m, "startup", startup)

    def meanwhile() -> None:
        try:
            if started.wait(10):
                _commit_without_poke(send_root)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not _maildir(send_root).exists():
                    time.sleep(0.02)
                time.sleep(0.1)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    saved = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGHUP, signal.SIGTERM)}
    saved_int = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=meanwhile)
    thread.start()
    try:
        assert m.run() == 0
    finally:
        thread.join()
        signal.set_wakeup_fd(-1)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGINT, saved_int)
    assert "new msg" in out.getvalue()
    assert Queue(send_root / "queue").ids("new") == []
    assert len(os.listdir(_maildir(send_root))) == 1


def test_a_shared_flock_on_the_pidfile_does_not_stop_a_start(queue: Queue) -> None:
    """pyqmail-queue flush took a shared flock on lock/sendpid to see whether it was
    locked: a pyqmail-send starting at that moment exited ("another pyqmail-send is
    running"). Its lock is a record lock now, which such a probe does not conflict with,
    and the tool takes no lock at all."""
    path = queue.root / PIDFILE
    path.write_text("")
    probe = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fd = lock_pidfile(queue.root)
        assert path.read_text() == f"{os.getpid()}\n"
        os.close(fd)
    finally:
        os.close(probe)


_HOLDER = """
import fcntl, os, signal, sys
signal.signal(signal.SIGALRM, lambda *_: (print("alrm", flush=True), sys.exit(0)))
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what pyqmail-send took before
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
signal.pause()
"""


def test_flush_signals_the_lock_holder_not_the_pid_in_the_file(queue: Queue) -> None:
    """A pyqmail-send that holds its lock but has not written its pid yet: the file still
    holds the previous instance's pid, by now maybe another process's (here this test's),
    which ALRM would kill. flush signals the process the kernel says holds the lock."""
    path = queue.root / PIDFILE
    path.write_text(f"{os.getpid()}\n")  # stale
    hits: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: hits.append(signum))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        assert sender_pid(queue) == holder.pid
        out = io.StringIO()
        assert flush(queue, out) == 0, out.getvalue()
        assert f"sent ALRM to pyqmail-send (pid {holder.pid})" in out.getvalue()
        assert holder.stdout.readline() == "alrm\n"
        assert holder.wait(10) == 0
        time.sleep(0.05)
        assert hits == []
        out = io.StringIO()
        assert flush(queue, out) == 1  # nobody holds the lock: the pid in the file is stale
        assert "pyqmail-send is not running" in out.getvalue() and hits == []
    finally:
        signal.signal(signal.SIGALRM, old)
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
