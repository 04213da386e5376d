"""Greylisting's pending bounds never greylist a retry again (s36 review), in the real file.

Senders retry a fixed time after their own first attempt, in the order they came: the
oldest pending triplets are the ones about to pass. Session 36 capped an IPv6 /48 at 4000
pending triplets and dropped its oldest over it: a provider sending from many /64s of one
/48 (Microsoft 365's 2a01:111:f403::/48) with more than 4000 new triplets in one delay had
each of them greylisted again at its retry, every round, until the mail bounced. Now a /48
may hold fifty networks' worth (``PENDING_PER_SOURCE``, test_greylist_flood.py), and at any
cap only rows whose retry is no longer due (``RETRY_GRACE`` past the delay) are evicted;
with none, the newcomer is deferred without being stored (``greylist=full``). Times are the
``now`` each decision is given.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from pyqmail.checks import greylist
from pyqmail.checks.greylist import Greylist, place
from tests.checks.test_greylist_bounds import counts, logs
from tests.greylist_util import GREY, T0

FRIEND, FRIEND6 = "198.51.100.7", "2001:db8:2::5"
BOT = "203.0.113.9"
STALE = GREY.delay + greylist.RETRY_GRACE  # seconds after which a pending row may go


def m365(i: int) -> str:
    """An address in the i-th /64 of Microsoft 365's outbound /48 (each tenant its /64s)."""
    return f"2a01:111:f403:{i:x}::25"


def test_a_provider_sending_from_many_slash_64s_of_one_slash_48_passes_at_its_retry(
    tmp_path: Path,
) -> None:
    """The review's case with the real limits: 5000 new triplets from 500 /64s of one /48
    (10 each), retried 15 minutes later in the same order. Session 36 answered every one
    ``new`` again, round after round (4001 sufficed); they all pass, and the next message
    from one of them is known."""
    grey = Greylist(tmp_path)
    settings = greylist.Settings(delay=300, lifetime=greylist.Settings().lifetime)
    rcpts = [f"u{j}@mx.test" for j in range(10)]

    def round_of(at: float) -> set[str]:
        return {
            grey.check(m365(i), f"t{i}@tenant{i}.test", rcpt, settings, at + i).log.split()[0]
            for i in range(500)
            for rcpt in rcpts
        }

    assert round_of(T0) == {"greylist=new"}
    assert round_of(T0 + 900) == {"greylist=pass"}
    assert grey.check(m365(7), "t7@tenant7.test", "u3@mx.test", settings, T0 + 2000).log == (
        "greylist=known"
    )
    assert counts(tmp_path) == {"pending": 0, "passed": 5000, "client": 500}
    grey.close()


def test_a_slash_64_at_its_limit_defers_newcomers_without_storing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Limit scaled to 10 per network: 15 new triplets from one /24, retried in order. Its
    oldest 10 pass (session 36 evicted them for the 5 newest, whose retries then evicted
    the rest: all 15 new again, every round); the 5 it had no room for are new at their
    retry, stored now, and pass at the next."""
    monkeypatch.setattr(greylist, "PENDING_PER_NET", 10)
    grey = Greylist(tmp_path)
    rcpts = [f"u{j}@mx.test" for j in range(15)]
    assert (
        logs(grey, BOT, "s@bulk.test", rcpts, T0) == ["greylist=new"] * 10 + ["greylist=full"] * 5
    )
    assert (
        logs(grey, BOT, "s@bulk.test", rcpts, T0 + 900)
        == ["greylist=pass"] * 10 + ["greylist=new"] * 5
    )
    assert logs(grey, BOT, "s@bulk.test", rcpts[10:], T0 + 1800) == ["greylist=pass"] * 5
    assert counts(tmp_path) == {"pending": 0, "passed": 15, "client": 1}
    grey.close()


def test_a_full_deferral_says_how_long_and_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newcomer with no room gets the same 451 as a new triplet (the sender cannot tell
    and retries), and the log says ``full`` so an admin sees the state is at a limit."""
    monkeypatch.setattr(greylist, "PENDING_PER_NET", 1)
    grey = Greylist(tmp_path)
    grey.check(BOT, "s@bulk.test", "a@mx.test", GREY, T0)
    full = grey.check(BOT, "s@bulk.test", "b@mx.test", GREY, T0 + 10)
    assert (full.action, full.code, full.text) == (
        "defer",
        451,
        "Greylisted, please try again in 300 seconds",
    )
    assert full.log == "greylist=full greylist_wait=300"
    grey.close()


def test_pending_rows_whose_retry_is_no_longer_due_make_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network at its limit with rows older than the delay and ``RETRY_GRACE`` (a sender
    that never came back): a newcomer takes the place of its oldest such row, and the
    younger ones stay."""
    monkeypatch.setattr(greylist, "PENDING_PER_NET", 10)
    grey = Greylist(tmp_path)
    logs(grey, BOT, "s@gone.test", [f"old{j}@mx.test" for j in range(3)], T0)
    logs(grey, BOT, "s@bulk.test", [f"young{j}@mx.test" for j in range(7)], T0 + 1000)
    later = T0 + STALE + 1
    fresh = [f"new{j}@mx.test" for j in range(4)]
    assert logs(grey, BOT, "s@bulk.test", fresh, later) == ["greylist=new"] * 3 + ["greylist=full"]
    young = [f"young{j}@mx.test" for j in range(7)]
    assert logs(grey, BOT, "s@bulk.test", young, later + 1) == ["greylist=pass"] * 7
    assert logs(grey, BOT, "s@gone.test", ["old0@mx.test"], later + 2) == ["greylist=new"]
    counts(tmp_path)
    grey.close()


def test_a_flood_from_many_sources_cannot_push_out_young_pending_triplets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Total scaled to 50, a prune every 10 decisions: a /48 over 20 /64s and 100 /24s
    flood new triplets. They fill the room and then get ``full``; the correspondents'
    triplets stored before (the oldest rows of all) pass at their retry. Session 35 and
    36 evicted the oldest (or the biggest source's oldest) pending rows at the cap."""
    monkeypatch.setattr(greylist, "MAX_PENDING", 50)
    monkeypatch.setattr(greylist, "PRUNE_EVERY", 10)
    grey = Greylist(tmp_path)
    assert logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0) == ["greylist=new"]
    assert logs(grey, FRIEND6, "b@friend6.test", ["u@mx.test"], T0) == ["greylist=new"]
    seen = []
    for i in range(20):
        flood = [f"x{j}@mx.test" for j in range(10)]
        seen += logs(grey, f"2001:db8:1:{i:x}::25", f"s{i}@spam.test", flood, T0 + 1 + i)
    for i in range(100):
        seen += logs(grey, f"10.0.{i}.1", "s@spam.test", ["u@mx.test"], T0 + 30 + i / 10)
    assert seen == ["greylist=new"] * 48 + ["greylist=full"] * 252
    assert logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0 + 300) == ["greylist=pass"]
    assert logs(grey, FRIEND6, "b@friend6.test", ["u@mx.test"], T0 + 300) == ["greylist=pass"]
    assert counts(tmp_path)["pending"] == 48
    grey.close()


def test_at_the_total_the_biggest_source_loses_its_stale_rows_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Total scaled to 50, all stale: a correspondent's one row (a slow sender, still within
    the lifetime), 40 of one /48 over 4 /64s, 9 of one /24. Ten newcomers take the places of
    the /48's oldest ten; the correspondent's row stays and passes at its late retry."""
    monkeypatch.setattr(greylist, "MAX_PENDING", 50)
    life = greylist.Settings(delay=300, lifetime=10 * STALE)
    grey = Greylist(tmp_path)
    assert grey.check(FRIEND, "a@friend.test", "u@mx.test", life, T0).log.startswith("greylist=new")
    for i in range(40):
        grey.check(f"2001:db8:1:{i % 4:x}::25", "s@spam.test", f"x{i}@mx.test", life, T0 + 1 + i)
    for j in range(9):
        grey.check(BOT, "s@bot.test", f"y{j}@mx.test", life, T0 + 50 + j)
    later = T0 + 60 + STALE
    for k in range(10):
        assert grey.check("192.0.2.1", "n@new.test", f"n{k}@mx.test", life, later).log.startswith(
            "greylist=new"
        )
    with closing(sqlite3.connect(tmp_path / greylist.STATE_FILE)) as db:
        held = {bytes(u): n for u, n in db.execute("SELECT unit, n FROM held WHERE kind='pending'")}
        oldest = db.execute(
            "SELECT min(first) FROM pending WHERE unit=?", (place("2001:db8:1::1")[0],)
        ).fetchone()
    assert held == {
        place(FRIEND)[0]: 1,
        place("2001:db8:1::1")[0]: 30,
        place(BOT)[0]: 9,
        place("192.0.2.1")[0]: 10,
    }
    assert oldest == (T0 + 11,)
    assert grey.check(FRIEND, "a@friend.test", "u@mx.test", life, later + 1).log == "greylist=pass"
    counts(tmp_path)
    grey.close()
