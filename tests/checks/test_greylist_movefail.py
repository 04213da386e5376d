"""s35's greylist state moved once, whatever happens (s37 review), with real files.

A move that failed on the current file (disk full, an I/O error) left the s35 file where it
was: greylisting was off for good (``greylist=error`` at every decision) and every recipient
moved the whole file again (17 s each on a worker's event loop). Now it is one attempt: the
failure is logged, the s35 file set aside, greylisting goes on from the current file. The
full disk is SQLite's own limit, ``max_page_count``, set on the connection the greylist
opens (the reviewer's reproduction does the same), so the copy fails as on a full disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from pyqmail import authlock
from pyqmail.checks import greylist, greyupgrade
from pyqmail.checks.greylist import Greylist, Settings, digest
from tests.checks.test_greylist_bounds import counts
from tests.checks.test_greylist_upgrade import s35_file
from tests.greylist_util import GREY, T0

MANY = 3000  # passed triplets beside s35_file's: pages more than the limit leaves room for


def big_s35_file(root: Path) -> Path:
    old = s35_file(root)
    with closing(sqlite3.connect(old)) as db, db:
        db.executemany(
            "INSERT INTO passed VALUES (?, ?, ?)",
            ((f"10.{i // 256}.{i % 256}.0/24", digest(f"s{i}", "u"), T0) for i in range(MANY)),
        )
    return old


def nearly_full(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """Every greylist connection may grow its file by ``room`` pages only."""
    real: Callable[..., sqlite3.Connection] = authlock.open_db

    def opened(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = real(*args, **kwargs)
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count={pages + room}")
        return db

    monkeypatch.setattr(greylist, "open_db", opened)


def test_a_move_that_fails_on_the_current_file_sets_the_s35_file_aside_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The first decision is a greylisting decision (not ``greylist=error``); the s35 file is
    renamed with its rows, the failure logged naming both files and the error; no row of it
    is half moved, and no later decision (another worker's too) tries again."""
    old = big_s35_file(tmp_path)
    nearly_full(monkeypatch, room=4)
    first = Greylist(tmp_path)
    verdict = first.check("192.0.2.1", "s@x.test", "u@mx.test", GREY, T0)
    assert verdict.log == "greylist=new greylist_wait=300"
    aside = old.with_name("greylist2.sqlite.failed-move")
    assert not old.exists()
    with closing(sqlite3.connect(aside)) as db:
        assert db.execute("SELECT count(*) FROM passed").fetchone() == (MANY + 5,)
    out = capfd.readouterr().out.replace("\\x20", " ")
    assert "warning text=cannot move the older greylist state; set aside" in out
    assert f"file={old} into={tmp_path / greylist.STATE_FILE} aside={aside}" in out
    assert "error=OperationalError: database or disk is full" in out
    second = Greylist(tmp_path)
    assert second.check("192.0.2.1", "s@x.test", "u@mx.test", GREY, T0 + 1).log.startswith(
        "greylist=early"
    )
    assert first.check("198.51.100.7", "a@friend.test", "u@mx.test", GREY, T0 + 2).log == (
        "greylist=new greylist_wait=300"  # s35's pass was not moved: new again
    )
    assert "older greylist state" not in capfd.readouterr().out.replace("\\x20", " ")
    first.close()
    second.close()
    assert counts(tmp_path) == {"pending": 2, "passed": 0, "client": 0}


def test_the_s35_file_is_moved_before_the_workers_serve(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``move_before_serving`` (pyqmail-smtpd's spawner, before it forks) moves it; a worker's
    first decision then has nothing to move. Greylisting off: the file is left alone."""
    old = s35_file(tmp_path)
    greylist.move_before_serving(tmp_path, Settings(delay=0))
    assert old.exists()
    greylist.move_before_serving(tmp_path, GREY)
    assert not old.exists()
    assert counts(tmp_path) == {"pending": 0, "passed": 5, "client": 3}
    out = capfd.readouterr().out.replace("\\x20", " ")
    assert "upgrade text=greylist state of the older format moved" in out


def test_a_move_over_its_time_is_interrupted_and_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The move must end within the spawner's time (``MOVE_SECONDS``, here none at all):
    interrupted, rolled back, set aside, and the time named in the log."""
    monkeypatch.setattr(greyupgrade, "MOVE_SECONDS", 0.0)
    old = big_s35_file(tmp_path)
    greylist.move_before_serving(tmp_path, GREY)
    assert not old.exists()
    assert old.with_name("greylist2.sqlite.failed-move").exists()
    out = capfd.readouterr().out.replace("\\x20", " ")
    assert "error=OperationalError: interrupted (over 0 s)" in out
    assert counts(tmp_path) == {"pending": 0, "passed": 0, "client": 0}


def test_only_the_newest_rows_up_to_moved_are_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MOVED`` bounds the move's time whatever the caps of the current file: the newest
    passed triplets and clients go over, the rest are left (greylisted once more)."""
    monkeypatch.setattr(greyupgrade, "MOVED", {"passed": 2, "client": 1})
    s35_file(tmp_path)
    greylist.move_before_serving(tmp_path, GREY)
    assert counts(tmp_path) == {"pending": 0, "passed": 2, "client": 1}
    grey = Greylist(tmp_path)
    assert grey.check("198.51.100.7", "a@friend.test", "u@mx.test", GREY, T0).log == (
        "greylist=known"  # the newest pass (T0 - 100)
    )
    assert grey.check("192.0.2.77", "x@news.test", "n@mx.test", GREY, T0).log == "greylist=client"
    grey.close()
