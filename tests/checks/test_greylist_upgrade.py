"""s35's greylist state (``greylist2.sqlite``) moved into the current file (s36 review).

Session 36 removed it at the first decision: every triplet that had passed and every known
(network, sender domain) client was lost, and all correspondents were greylisted again.
Here a real s35 file is made with s35's own schema (``git show 60a38cc:src/pyqmail/checks/
greylist.py``) and rows as s35 wrote them (network text, the same hashes), then opened by
the current code.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from pyqmail.checks import greylist
from pyqmail.checks.greylist import Greylist, digest
from pyqmail.checks.greysender import normalise
from tests.checks.test_greylist_bounds import counts
from tests.greylist_util import GREY, T0

OLD = "smtpd/greylist2.sqlite"
S35_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    net TEXT NOT NULL, pair BLOB NOT NULL, first REAL NOT NULL,
    PRIMARY KEY (net, pair)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_first ON pending (first);
CREATE TABLE IF NOT EXISTS passed (
    net TEXT NOT NULL, pair BLOB NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (net, pair)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS passed_last ON passed (last);
CREATE TABLE IF NOT EXISTS client (
    net TEXT NOT NULL, domain BLOB NOT NULL, passes INTEGER NOT NULL, last REAL NOT NULL,
    PRIMARY KEY (net, domain)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS client_last ON client (last);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('pending', 0);
"""
PASSED = [  # (s35's network text, sender, recipient, last seen)
    ("198.51.100.0/24", "a@friend.test", "u@mx.test", T0 - 100),
    ("2001:db8:2::/64", "b@friend6.test", "v@mx.test", T0 - 200),
    ("2001:db8:2:7::/64", "c@friend6.test", "v@mx.test", T0 - 300),
    ("203.0.113.0/24", "bounce-4711@list.test", "w@mx.test", T0 - 400),
    ("203.0.113.0/24", "x@list.test", "w@mx.test", T0 - 500),
]
CLIENTS = [  # (network text, sender domain, passes, last seen)
    ("192.0.2.0/24", "news.test", 5, T0 - 50),
    ("2001:db8:3::/64", "friend6.test", 7, T0 - 60),
    ("198.51.100.0/24", "friend.test", 2, T0 - 100),  # not known yet
]


def s35_file(root: Path, *, garbage: int = 0) -> Path:
    """The s35 state as s35 wrote it (WAL mode), with ``garbage`` rows no network makes."""
    (root / "smtpd").mkdir(mode=0o700, exist_ok=True)
    old = root / OLD
    with closing(sqlite3.connect(old, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(S35_SCHEMA)
        for net, sender, rcpt, last in PASSED:
            db.execute(
                "INSERT INTO passed VALUES (?, ?, ?)", (net, digest(normalise(sender), rcpt), last)
            )
        for net, domain, passes, last in CLIENTS:
            db.execute(
                "INSERT INTO client VALUES (?, ?, ?, ?)", (net, digest(domain), passes, last)
            )
        for i in range(garbage):
            db.execute("INSERT INTO passed VALUES (?, ?, ?)", (f"no-net-{i}", b"x" * 16, T0))
        db.execute("INSERT INTO pending VALUES (?, ?, ?)", ("192.0.2.0/24", b"p" * 16, T0 - 5))
        db.execute("UPDATE meta SET value=1 WHERE name='pending'")
    return old


def verdicts(grey: Greylist, *triplets: tuple[str, str, str]) -> list[str]:
    return [grey.check(*t, GREY, T0).log.split()[0] for t in triplets]


def test_passed_triplets_and_known_clients_of_an_s35_file_move_over(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A triplet that passed passes at once (from any address of its network, as in s35),
    a known client is known, a client short of ``AUTO_ALLOW`` passes is still greylisted;
    the counts are the rows moved; the s35 file is gone, and the move logged."""
    old = s35_file(tmp_path, garbage=2)
    grey = Greylist(tmp_path)
    assert (
        verdicts(
            grey,
            ("198.51.100.200", "a@friend.test", "U@mx.test"),
            ("2001:db8:2::5", "b@friend6.test", "v@mx.test"),
            ("2001:db8:2:7::99", "c@friend6.test", "v@mx.test"),
            ("203.0.113.9", "bounce-1234@list.test", "w@mx.test"),
            ("192.0.2.77", "anyone@news.test", "new@mx.test"),
            ("2001:db8:3::1", "z@friend6.test", "new@mx.test"),
            ("198.51.100.7", "other@friend.test", "new@mx.test"),
            ("2001:db8:2:8::5", "c@friend6.test", "v@mx.test"),
        )
        == ["greylist=known"] * 4 + ["greylist=client"] * 2 + ["greylist=new"] * 2
    )
    grey.close()
    assert counts(tmp_path) == {"pending": 2, "passed": 5, "client": 3}
    assert not [p for p in old.parent.iterdir() if p.name.startswith("greylist2")]
    out = capfd.readouterr().out.replace("\\x20", " ")
    assert "upgrade text=greylist state of the older format moved" in out
    assert "passed=5 passed_skipped=2 client=3 client_skipped=0" in out


def test_an_s35_file_over_the_caps_moves_its_newest_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s35's passed triplets had no bound: only the newest ``MAX_PASSED`` move (the rest
    would be evicted at the first prune), and ``MAX_CLIENTS`` likewise."""
    monkeypatch.setattr(greylist, "MAX_PASSED", 3)
    monkeypatch.setattr(greylist, "MAX_CLIENTS", 2)
    s35_file(tmp_path)
    grey = Greylist(tmp_path)
    assert (
        verdicts(
            grey,
            ("198.51.100.7", "a@friend.test", "u@mx.test"),
            ("2001:db8:2:7::1", "c@friend6.test", "v@mx.test"),
            ("203.0.113.9", "x@list.test", "w@mx.test"),
            ("192.0.2.77", "anyone@news.test", "new@mx.test"),
            ("2001:db8:3::1", "z@friend6.test", "new@mx.test"),
        )
        == ["greylist=known"] * 2 + ["greylist=new"] + ["greylist=client"] * 2
    )
    grey.close()
    assert counts(tmp_path) == {"pending": 1, "passed": 3, "client": 2}


def test_an_unreadable_s35_file_is_logged_and_skipped(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """No database at all: greylisting goes on with a fresh file, the s35 one is removed,
    and the log says why its rows were not kept."""
    (tmp_path / "smtpd").mkdir(mode=0o700)
    old = tmp_path / OLD
    old.write_bytes(b"SQLite format 2\0" + b"\xff" * 4000)
    grey = Greylist(tmp_path)
    assert verdicts(grey, ("198.51.100.7", "a@friend.test", "u@mx.test")) == ["greylist=new"]
    grey.close()
    assert not old.exists()
    out = capfd.readouterr().out.replace("\\x20", " ")
    assert "greylist state of the older format removed; greylisting starts afresh" in out
    assert f"file={old} why=DatabaseError: file is not a database" in out
    assert counts(tmp_path) == {"pending": 1, "passed": 0, "client": 0}


def test_a_worker_moving_the_s35_file_makes_the_others_wait_then_find_it_moved(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The move holds the current file's write lock: another worker's decision meanwhile
    is a busy error (the mail accepted, ``greylist=error``) and leaves the s35 file; its
    next decision finds the rows moved already and removes the file without moving them
    twice, and without a warning that greylisting starts afresh (s37 review: it said so)."""
    old = s35_file(tmp_path)
    first = Greylist(tmp_path)
    first.check("192.0.2.1", "s@x.test", "u@mx.test", GREY, T0)  # the file made, moved
    assert not old.exists()
    s35_file(tmp_path)  # an s35 process still running wrote it again, with one more pass
    with closing(sqlite3.connect(old)) as db, db:
        late = digest(normalise("late@x.test"), "u@mx.test")
        db.execute("INSERT INTO passed VALUES ('10.0.0.0/24', ?, ?)", (late, T0))
    with closing(sqlite3.connect(tmp_path / greylist.STATE_FILE, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")  # a worker in the middle of its move
        second = Greylist(tmp_path)
        busy = second.check("198.51.100.7", "a@friend.test", "u@mx.test", GREY, T0)
        assert (busy.action, busy.log.partition(":")[0]) == ("accept", "greylist=error")
        assert old.exists()
        db.execute("ROLLBACK")
    assert verdicts(
        second,
        ("198.51.100.7", "a@friend.test", "u@mx.test"),
        ("10.0.0.1", "late@x.test", "u@mx.test"),  # not moved: this file held rows already
    ) == ["greylist=known", "greylist=new"]
    assert not old.exists()
    out = capfd.readouterr().out.replace("\\x20", " ")
    assert out.count("upgrade text=greylist state of the older format moved") == 1
    assert "why=greylist3.sqlite holds passed triplets already" in out
    assert "starts afresh" not in out  # nothing was lost: the rows were moved before
    first.close()
    second.close()
    assert counts(tmp_path) == {"pending": 2, "passed": 5, "client": 3}
