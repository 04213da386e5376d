"""Greylisting's state under a flood (``pyqmail.checks.greylist``), in the real SQLite file.

The review's case: the table was capped by dropping the oldest rows of anybody, so random
senders flooding one valid recipient (a 451 per RCPT, ~100 rows per connection) pushed out
the triplets that had passed (known correspondents greylisted again) and others' pending ones
(their retries counted as new: mail deferred until the sender gave up). Now what passed is
kept apart and forgotten only by age, a network's pending triplets are capped on their own,
and a (network, sender domain) that passed often enough skips greylisting.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pyqmail.checks import greylist
from pyqmail.checks.greylist import Greylist, place
from tests.greylist_util import GREY, T0

FLOODER, FRIEND, WAITING = "203.0.113.5", "192.0.2.10", "198.51.100.20"


def pending(root: Path) -> list[tuple[tuple[bytes, int], float]]:
    """((source, network within it), first seen) of each pending triplet."""
    with sqlite3.connect(root / greylist.STATE_FILE) as db:
        rows = db.execute("SELECT unit, sub, first FROM pending").fetchall()
    return [((bytes(unit), int(sub)), float(first)) for unit, sub, first in rows]


def counted(root: Path) -> int:
    with sqlite3.connect(root / greylist.STATE_FILE) as db:
        return int(db.execute("SELECT value FROM meta WHERE name='pending'").fetchone()[0])


def test_a_flood_from_one_network_fills_only_its_own_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its first 50 triplets are stored, the rest deferred without a row (s37: evicting its
    oldest, those about to be retried, greylisted every retry again)."""
    monkeypatch.setattr(greylist, "PENDING_PER_NET", 50)
    monkeypatch.setattr(greylist, "MAX_PENDING", 120)
    grey = Greylist(tmp_path)
    # a correspondent that passed, and another sender waiting for its retry
    assert grey.check(FRIEND, "a@friend.test", "u@mx.test", GREY, T0).action == "defer"
    assert grey.check(FRIEND, "a@friend.test", "u@mx.test", GREY, T0 + 300).log == "greylist=pass"
    assert grey.check(WAITING, "b@wait.test", "u@mx.test", GREY, T0 + 10).log.startswith(
        "greylist=new"
    )
    for i in range(500):  # random senders to one valid recipient
        verdict = grey.check(FLOODER, f"x{i}@r{i}.test", "u@mx.test", GREY, T0 + 20 + i / 100)
        assert verdict.action == "defer"
    grey.prune(GREY, T0 + 40)
    assert grey.check(FRIEND, "a@friend.test", "u@mx.test", GREY, T0 + 400).log == "greylist=known"
    assert grey.check(WAITING, "b@wait.test", "u@mx.test", GREY, T0 + 400).log == "greylist=pass"
    flood = [first for net, first in pending(tmp_path) if net == place(FLOODER)]
    assert len(flood) == 50
    assert max(flood) < T0 + 20 + 50 / 100  # its own first 50 stay
    assert counted(tmp_path) == len(pending(tmp_path))
    grey.close()


def test_many_networks_over_the_total_are_not_stored_and_what_passed_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over ``MAX_PENDING`` the newcomers wait (s37: no young pending row is evicted, the
    oldest were the ones about to be retried); ``passed`` is never touched."""
    monkeypatch.setattr(greylist, "MAX_PENDING", 100)
    grey = Greylist(tmp_path)
    grey.check(FRIEND, "a@friend.test", "u@mx.test", GREY, T0)
    assert grey.check(FRIEND, "a@friend.test", "u@mx.test", GREY, T0 + 300).log == "greylist=pass"
    for i in range(300):  # 300 networks, one triplet each
        grey.check(f"10.{i // 256}.{i % 256}.1", "s@spam.test", "u@mx.test", GREY, T0 + 301 + i)
    assert counted(tmp_path) == 100
    grey.prune(GREY, T0 + 700)
    rows = pending(tmp_path)
    assert len(rows) == counted(tmp_path) == 100
    assert max(first for _, first in rows) == T0 + 301 + 99  # the first 100 stay
    assert grey.check(FRIEND, "a@friend.test", "u@mx.test", GREY, T0 + 800).log == "greylist=known"
    grey.close()


def test_a_client_that_passed_often_enough_skips_greylisting(tmp_path: Path) -> None:
    """postgrey's auto-whitelist: AUTO_ALLOW passed triplets of one (network, sender domain),
    COUNT_APART seconds apart; another domain from the same network, or the same domain
    elsewhere, still waits."""
    grey = Greylist(tmp_path)
    for i in range(greylist.AUTO_ALLOW):
        at = T0 + i * greylist.COUNT_APART
        grey.check(FRIEND, "news@friend.test", f"u{i}@mx.test", GREY, at)
        assert grey.check(FRIEND, "news@friend.test", f"u{i}@mx.test", GREY, at + 300).log == (
            "greylist=pass"
        )
    fresh = grey.check("192.0.2.99", "other@friend.test", "new@mx.test", GREY, T0 + 400)
    assert (fresh.action, fresh.log) == ("accept", "greylist=client")
    assert grey.check(FRIEND, "a@else.test", "new@mx.test", GREY, T0 + 400).action == "defer"
    assert grey.check(WAITING, "a@friend.test", "new@mx.test", GREY, T0 + 400).action == "defer"
    # forgotten by age only: unseen for longer than the lifetime, greylisted again
    grey.prune(GREY, T0 + 400 + 3601)
    late = grey.check(FRIEND, "x@friend.test", "late@mx.test", GREY, T0 + 400 + 3602)
    assert late.log.startswith("greylist=new")
    grey.close()


def test_the_recipients_of_one_message_count_once_towards_the_client(tmp_path: Path) -> None:
    """Passes closer than COUNT_APART count once (postgrey): one message to many recipients,
    retried once, does not make its sender's network a known client."""
    grey = Greylist(tmp_path)
    for i in range(greylist.AUTO_ALLOW * 4):
        grey.check(FRIEND, "news@friend.test", f"u{i}@mx.test", GREY, T0)
    for i in range(greylist.AUTO_ALLOW * 4):
        assert grey.check(FRIEND, "news@friend.test", f"u{i}@mx.test", GREY, T0 + 300 + i).log == (
            "greylist=pass"
        )
    fresh = grey.check(FRIEND, "news@friend.test", "new@mx.test", GREY, T0 + 400)
    assert fresh.action == "defer", fresh
    grey.close()


def test_addresses_are_stored_as_fixed_size_hashes(tmp_path: Path) -> None:
    grey = Greylist(tmp_path)
    sender, rcpt = "a-very-long-sender-name" * 10 + "@sender.test", "recipient@mx.test"
    grey.check(FRIEND, sender, rcpt, GREY, T0)
    grey.check(FRIEND, sender, rcpt, GREY, T0 + 300)
    grey.close()
    with sqlite3.connect(tmp_path / greylist.STATE_FILE) as db:
        (pair,) = db.execute("SELECT pair FROM passed").fetchone()
        (domain,) = db.execute("SELECT domain FROM client").fetchone()
    assert len(pair) == len(domain) == greylist.HASH_BYTES
    files = b"".join(p.read_bytes() for p in (tmp_path / "smtpd").iterdir())
    assert b"a-very-long-sender-name" not in files and b"recipient" not in files


def test_prune_deletes_a_bounded_batch_by_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(greylist, "PRUNE_BATCH", 40)
    grey = Greylist(tmp_path)
    for i in range(100):
        grey.check(FRIEND, "s@old.test", f"u{i}@mx.test", GREY, T0)
    grey.prune(GREY, T0 + 3601)
    assert len(pending(tmp_path)) == counted(tmp_path) == 60
    grey.prune(GREY, T0 + 3601)
    grey.prune(GREY, T0 + 3601)
    assert len(pending(tmp_path)) == counted(tmp_path) == 0
    grey.close()


OLD_LAYOUTS = {
    "smtpd/greylist.sqlite": "CREATE TABLE triplet (net TEXT NOT NULL, sender TEXT NOT NULL,"
    " rcpt TEXT NOT NULL, first REAL NOT NULL, last REAL NOT NULL, passed INTEGER NOT NULL,"
    " PRIMARY KEY (net, sender, rcpt)) WITHOUT ROWID",
    "smtpd/greylist2.sqlite": "CREATE TABLE pending (net TEXT NOT NULL, pair BLOB NOT NULL,"
    " first REAL NOT NULL, PRIMARY KEY (net, pair)) WITHOUT ROWID",
}


@pytest.mark.parametrize("name", greylist.OLD_STATE_FILES)
def test_the_files_of_the_older_formats_are_removed_and_logged(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], name: str
) -> None:
    """greylist.sqlite (raw addresses) and greylist2.sqlite (s35: no per-source counts) are
    not read: their rows lack what the bounds count by."""
    (tmp_path / "smtpd").mkdir()
    old = tmp_path / name
    with sqlite3.connect(old) as db:
        db.execute(OLD_LAYOUTS[name])
    verdict = Greylist(tmp_path).check(FRIEND, "a@b.test", "u@mx.test", GREY, T0)
    assert verdict.log.startswith("greylist=new")
    assert not old.exists()
    assert (tmp_path / greylist.STATE_FILE).exists()
    out = capfd.readouterr().out.replace("\\x20", " ")  # the log's spaces in a value
    assert "warning text=greylist state of the older format removed" in out
    assert f"file={old}" in out


def test_the_null_sender_never_makes_a_known_client(tmp_path: Path) -> None:
    """Bounces from a network, however many, must not let later ``MAIL FROM:<>`` mail from it
    skip the delay (a review found five null-sender passes made the /24 a known client)."""
    grey = Greylist(tmp_path)
    for i in range(greylist.AUTO_ALLOW + 2):
        at = T0 + i * greylist.COUNT_APART * 2
        grey.check(FRIEND, "", f"u{i}@mx.test", GREY, at)
        assert grey.check(FRIEND, "", f"u{i}@mx.test", GREY, at + 300).log == "greylist=pass"
    fresh = grey.check(FRIEND, "", "new@mx.test", GREY, T0 + 5000)
    assert (fresh.action, fresh.log.split()[0]) == ("defer", "greylist=new")
    grey.close()
    with sqlite3.connect(tmp_path / greylist.STATE_FILE) as db:
        assert db.execute("SELECT count(*) FROM client").fetchone() == (0,)
