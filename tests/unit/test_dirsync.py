"""DirSync: the group commit of a Maildir's new/ fsync among concurrent deliveries."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pyqmail.send import local
from pyqmail.send.local import DirSync, maildir_deliver


def test_every_sync_waits_for_an_fsync_that_started_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The covering rule, checked on every call: the fsync a caller returns after began
    after the caller asked (its link happened before), and it had completed."""
    d = DirSync(str(tmp_path))
    log: list[tuple[str, int, float]] = []  # (what, thread, time)
    lock = threading.Lock()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        with lock:
            log.append(("start", threading.get_ident(), time.monotonic()))
        time.sleep(0.01)
        real_fsync(fd)
        with lock:
            log.append(("end", threading.get_ident(), time.monotonic()))

    monkeypatch.setattr(local.os, "fsync", slow_fsync)
    asked: dict[int, list[tuple[float, float]]] = {}

    def worker() -> None:
        for _ in range(5):
            t0 = time.monotonic()
            d.sync()
            asked.setdefault(threading.get_ident(), []).append((t0, time.monotonic()))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fsyncs = []
    starts = [x for x in log if x[0] == "start"]
    ends = [x for x in log if x[0] == "end"]
    for (_, tid, s), (_, tid2, e) in zip(starts, ends, strict=True):
        assert tid == tid2, "two fsyncs overlapped"
        fsyncs.append((s, e))
    for calls in asked.values():
        for t0, t1 in calls:
            assert any(t0 <= s and e <= t1 for s, e in fsyncs), (t0, t1)
    assert d.fsyncs == len(fsyncs)
    assert len(fsyncs) < 40, "40 calls from 8 threads must share fsyncs"


def test_a_failed_fsync_is_raised_and_the_next_caller_runs_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = DirSync(str(tmp_path))
    calls = []
    real_fsync = os.fsync

    def flaky(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(local.os, "fsync", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        d.sync()
    assert d.synced == 0 and not d.running
    d.sync()
    assert d.synced == 2 and len(calls) == 2


def test_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DirSync(str(tmp_path / "gone")).sync()


def test_one_object_per_directory_while_in_use(tmp_path: Path) -> None:
    a = DirSync.of(str(tmp_path))
    assert DirSync.of(str(tmp_path)) is a
    assert DirSync.of(str(tmp_path / "other")) is not a


def test_concurrent_deliveries_share_new_fsyncs_and_all_land(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    names: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(10):
            name = maildir_deliver(md, f"Subject: {n}-{i}\n\nbody\n".encode())
            with lock:
                names.append(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(os.listdir(md / "new")) == sorted(names)
    assert len(set(names)) == 60
    assert os.listdir(md / "tmp") == []
