"""Greylisting's bounds (``pyqmail.checks.greylist``), in the real SQLite file (s35 review).

Four holes: pending triplets were capped per /64 only, so one IPv6 customer (a /48 is
65,536 /64s) pushed everybody else's out through the global cap; a known client forgotten by
age was known again after a single pass (its old passes still counted); the passed triplets
had no bound at all, and once they had one the (network, sender domain) pairs had none. The
limits are scaled down here, the decisions are ``Greylist.check``'s
on a real file, and the counts the module keeps are compared with the rows themselves.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from pyqmail.checks import greylist
from pyqmail.checks.greylist import Greylist, Settings, place
from tests.greylist_util import GREY, T0, at_once

FRIEND, FRIEND6 = "198.51.100.7", "2001:db8:2::5"
HOUR, DAY = 3600, 86400


def customer(i: int) -> str:
    """An address in the i-th /64 of one IPv6 customer's /48."""
    return f"2001:db8:1:{i:x}::25"


def counts(root: Path) -> dict[str, int]:
    """Rows of ``pending``, ``passed`` and ``client``, after checking them against the counts
    kept in ``meta`` (in all) and ``held`` (per source)."""
    found = {}
    with closing(sqlite3.connect(root / greylist.STATE_FILE)) as db:
        for table in ("pending", "passed", "client"):
            kept = db.execute("SELECT value FROM meta WHERE name=?", (table,)).fetchone()
            assert kept is not None, f"no count of the {table} rows is kept"
            (rows,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
            assert kept[0] == rows, f"{table}: {kept[0]} counted, {rows} rows"
            held = dict(db.execute("SELECT unit, n FROM held WHERE kind=?", (table,)))
            per = dict(db.execute(f"SELECT unit, count(*) FROM {table} GROUP BY unit"))  # noqa: S608
            assert held == per, table
            found[table] = rows
    return found


def rows(root: Path, table: str) -> int:
    with closing(sqlite3.connect(root / greylist.STATE_FILE)) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608


def logs(
    grey: Greylist, ip: str, sender: str, rcpts: list[str], at: float, *, settings: Settings = GREY
) -> list[str]:
    return [grey.check(ip, sender, rcpt, settings, at).log.split()[0] for rcpt in rcpts]


def test_an_ipv6_customer_cannot_push_out_anybody_elses_pending_triplet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's case, limits scaled: 10 per network, 50 in all, a prune every 10
    decisions. 20 /64s of one /48 with 10 new triplets each were 200 sources' worth under
    the per-network cap, and the prunes dropped the oldest pending triplets anywhere: the
    correspondents' first."""
    monkeypatch.setattr(greylist, "PENDING_PER_NET", 10)
    monkeypatch.setattr(greylist, "MAX_PENDING", 50)
    monkeypatch.setattr(greylist, "PRUNE_EVERY", 10)
    grey = Greylist(tmp_path)
    assert logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0) == ["greylist=new"]
    assert logs(grey, FRIEND6, "b@friend6.test", ["u@mx.test"], T0) == ["greylist=new"]
    for i in range(20):
        flood = [f"x{j}@mx.test" for j in range(10)]
        assert set(logs(grey, customer(i), f"s{i}@spam.test", flood, T0 + 1 + i)) <= {
            "greylist=new",
            "greylist=full",  # no room: not stored (s37), the friends' rows stay
        }
    assert logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0 + 300) == ["greylist=pass"]
    assert logs(grey, FRIEND6, "b@friend6.test", ["u@mx.test"], T0 + 300) == ["greylist=pass"]
    assert counts(tmp_path)["pending"] <= 50
    grey.close()


def test_passed_triplets_are_capped_the_biggest_source_losing_its_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that retries passes every triplet, and fresh sender domains never make it a
    known client: ``passed`` grew without end. Over ``MAX_PASSED`` the source holding the
    most passed triplets loses its oldest; others keep theirs."""
    monkeypatch.setattr(greylist, "MAX_PASSED", 100, raising=False)
    grey = Greylist(tmp_path)
    logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0)
    assert logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0 + 300) == ["greylist=pass"]
    small = [f"s{j}@mx.test" for j in range(20)]
    logs(grey, FRIEND6, "b@friend6.test", small, T0 + 1)
    logs(grey, FRIEND6, "b@friend6.test", small, T0 + 301)
    flood = [(f"x{j}@fresh{j}.test", f"u{j}@mx.test") for j in range(150)]
    for j, (sender, rcpt) in enumerate(flood):
        logs(grey, "203.0.113.9", sender, [rcpt], T0 + 2 + j)
    for j, (sender, rcpt) in enumerate(flood):
        assert logs(grey, "203.0.113.9", sender, [rcpt], T0 + 400 + j) == ["greylist=pass"]
    grey.prune(GREY, T0 + 600)
    assert rows(tmp_path, "passed") == 100
    assert logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0 + 700) == ["greylist=known"]
    assert logs(grey, FRIEND6, "b@friend6.test", small, T0 + 700) == ["greylist=known"] * 20
    again = [logs(grey, "203.0.113.9", s, [r], T0 + 800)[0] for s, r in flood]
    assert again == ["greylist=new"] * 71 + ["greylist=known"] * 79  # its oldest 71 went
    assert counts(tmp_path) == {"pending": 71, "passed": 79 + 21, "client": 150 + 2}
    grey.close()


def test_client_pairs_are_capped_like_passed_triplets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's case: with passed triplets capped at 100, 1000 networks passing one
    triplet each, each with a fresh sender domain, left 1000 (network, sender domain) rows
    after the prunes, counted nowhere. Over ``MAX_CLIENTS`` they go as passed triplets go
    (each source holding one: the oldest anywhere)."""
    monkeypatch.setattr(greylist, "MAX_PASSED", 100)
    monkeypatch.setattr(greylist, "MAX_CLIENTS", 100, raising=False)
    grey = Greylist(tmp_path)
    nets = [f"10.{i // 256}.{i % 256}.1" for i in range(1000)]
    for i, ip in enumerate(nets):
        logs(grey, ip, f"x@fresh{i}.test", ["u@mx.test"], T0 + i / 10)
    for i, ip in enumerate(nets):
        assert logs(grey, ip, f"x@fresh{i}.test", ["u@mx.test"], T0 + 400 + i / 10) == [
            "greylist=pass"
        ]
    for _ in range(5):
        grey.prune(GREY, T0 + 600)
    assert rows(tmp_path, "client") == 100
    assert counts(tmp_path) == {"pending": 0, "passed": 100, "client": 100}
    with closing(sqlite3.connect(tmp_path / greylist.STATE_FILE)) as db:
        kept = {bytes(unit) for (unit,) in db.execute("SELECT unit FROM client")}
    assert kept == {place(ip)[0] for ip in nets[900:]}  # the newest 100
    grey.close()


def test_over_max_clients_the_source_holding_the_most_pairs_loses_its_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One /24 passing triplets through 150 fresh sender domains; over ``MAX_CLIENTS`` it
    loses its oldest pairs, and a correspondent that became a known client keeps its row,
    as does another with 4 counted passes: its fifth makes it a known client."""
    monkeypatch.setattr(greylist, "MAX_CLIENTS", 100, raising=False)
    grey = Greylist(tmp_path)
    apart = greylist.COUNT_APART
    for i in range(greylist.AUTO_ALLOW):
        logs(grey, FRIEND, "news@friend.test", [f"u{i}@mx.test"], T0 + i * apart)
        logs(grey, FRIEND, "news@friend.test", [f"u{i}@mx.test"], T0 + i * apart + 300)
    for i in range(greylist.AUTO_ALLOW - 1):
        logs(grey, FRIEND6, "b@friend6.test", [f"u{i}@mx.test"], T0 + i * apart)
        logs(grey, FRIEND6, "b@friend6.test", [f"u{i}@mx.test"], T0 + i * apart + 300)
    flood = [(f"x{j}@fresh{j}.test", f"u{j}@mx.test") for j in range(150)]
    for j, (sender, rcpt) in enumerate(flood):
        logs(grey, "203.0.113.9", sender, [rcpt], T0 + 1000 + j)
    for j, (sender, rcpt) in enumerate(flood):
        assert logs(grey, "203.0.113.9", sender, [rcpt], T0 + 1400 + j) == ["greylist=pass"]
    assert rows(tmp_path, "client") == 152
    grey.prune(GREY, T0 + 1600)
    assert rows(tmp_path, "client") == 100
    assert counts(tmp_path)["client"] == 100
    with closing(sqlite3.connect(tmp_path / greylist.STATE_FILE)) as db:
        held = dict(db.execute("SELECT unit, n FROM held WHERE kind='client'"))
        oldest = db.execute("SELECT min(last) FROM client WHERE unit=?", (place("203.0.113.9")[0],))
        assert oldest.fetchone() == (T0 + 1400 + 52,)  # its oldest 52 went
    assert held == {place(FRIEND)[0]: 1, place(FRIEND6)[0]: 1, place("203.0.113.9")[0]: 98}
    assert logs(grey, FRIEND, "news@friend.test", ["new@mx.test"], T0 + 1700) == ["greylist=client"]
    logs(grey, FRIEND6, "b@friend6.test", ["u9@mx.test"], T0 + 1700)
    assert logs(grey, FRIEND6, "b@friend6.test", ["u9@mx.test"], T0 + 2000) == ["greylist=pass"]
    assert logs(grey, FRIEND6, "b@friend6.test", ["new@mx.test"], T0 + 2001) == ["greylist=client"]
    grey.close()


def passes(
    grey: Greylist, sender: str, rcpts: list[str], at: float, *, settings: Settings = GREY
) -> None:
    """One delivery from FRIEND: its triplets new (deferred), then passed after the delay."""
    n = len(rcpts)
    assert logs(grey, FRIEND, sender, rcpts, at, settings=settings) == ["greylist=new"] * n
    assert logs(grey, FRIEND, sender, rcpts, at + 300, settings=settings) == ["greylist=pass"] * n


def test_a_client_unseen_for_the_lifetime_counts_its_passes_from_one_again(
    tmp_path: Path,
) -> None:
    """Five deliveries an hour apart made it a known client; unseen for two days (the prune
    had not run: its row was still there) one pass made it known again, with 6 passes."""
    life = Settings(delay=300, lifetime=DAY)
    grey = Greylist(tmp_path)
    for i in range(greylist.AUTO_ALLOW):
        passes(grey, "news@friend.test", [f"u{i}@mx.test"], T0 + i * HOUR)
    back = T0 + 4 * HOUR + 400
    assert grey.check(FRIEND, "news@friend.test", "z@mx.test", life, back).log == "greylist=client"
    later = back + 2 * DAY
    passes(grey, "news@friend.test", ["a@mx.test"], later, settings=life)  # deferred again
    third = grey.check(FRIEND, "news@friend.test", "b@mx.test", life, later + 400)
    assert third.log.split()[0] == "greylist=new"
    grey.close()
    with closing(sqlite3.connect(tmp_path / greylist.STATE_FILE)) as db:
        assert db.execute("SELECT passes FROM client").fetchall() == [(1,)]


def test_passes_before_the_lifetime_do_not_add_up_with_a_new_one(tmp_path: Path) -> None:
    """Four passes, two days of silence, one pass: not five."""
    life = Settings(delay=300, lifetime=DAY)
    grey = Greylist(tmp_path)
    for i in range(greylist.AUTO_ALLOW - 1):
        passes(grey, "news@friend.test", [f"u{i}@mx.test"], T0 + i * HOUR)
    later = T0 + 3 * HOUR + 2 * DAY
    passes(grey, "news@friend.test", ["a@mx.test"], later, settings=life)
    fresh = grey.check(FRIEND, "news@friend.test", "b@mx.test", life, later + 400)
    assert fresh.log.split()[0] == "greylist=new"
    grey.close()


DIES = """
import os, sys
from pathlib import Path
from pyqmail.checks import greylist
greylist.MAX_PENDING, greylist.MAX_CLIENTS = 5, 2
grey = greylist.Greylist(Path(sys.argv[1]))
def die(sql):
    if sql.lstrip().startswith(sys.argv[2]):
        os._exit(9)
grey.connect().set_trace_callback(die)
settings = greylist.Settings(300, 3600)
if sys.argv[3] == "check":
    grey.check("198.51.100.7", "a@friend.test", "u@mx.test", settings, 1_000_300.0)
else:
    grey.prune(settings, 1_000_300.0)
print("lived")
"""


@pytest.mark.parametrize(
    ("statement", "work"),
    [
        ("INSERT OR REPLACE INTO passed", "check"),  # a pass: pending row and count gone
        ("UPDATE meta", "check"),  # a pass: the source's count changed, not the total
        ("SELECT unit, n FROM held", "prune"),  # the eviction, after the prune by age
        ("INSERT INTO held VALUES ('client'", "check"),  # a pass: its pair's row made
        ("INSERT INTO held VALUES ('client'", "prune"),  # a pair over MAX_CLIENTS deleted
    ],
)
def test_the_counts_stay_right_when_a_worker_dies_mid_transaction(
    tmp_path: Path, statement: str, work: str
) -> None:
    """A worker killed in the middle of a decision or a prune leaves rows and counts as
    they were: both change in one transaction, which dies with it."""
    grey = Greylist(tmp_path)
    logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0)
    logs(grey, "203.0.113.9", "s@bot.test", [f"y{j}@mx.test" for j in range(9)], T0 - 4000)
    logs(grey, customer(1), "s@spam.test", [f"x{j}@mx.test" for j in range(9)], T0 + 1)
    for j in range(3):  # three pairs of one /24: over MAX_CLIENTS
        logs(grey, "192.0.2.10", f"s@d{j}.test", ["u@mx.test"], T0 - 1000)
        logs(grey, "192.0.2.10", f"s@d{j}.test", ["u@mx.test"], T0 - 600)
    grey.close()
    before = counts(tmp_path)
    assert before["client"] == 3
    run = subprocess.run(
        [sys.executable, "-c", DIES, str(tmp_path), statement, work],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout) == (9, ""), run.stderr
    assert counts(tmp_path) == before
    grey = Greylist(tmp_path)
    assert logs(grey, FRIEND, "a@friend.test", ["u@mx.test"], T0 + 300) == ["greylist=pass"]
    assert counts(tmp_path) == {
        "pending": before["pending"] - 1,
        "passed": before["passed"] + 1,
        "client": before["client"] + 1,
    }
    grey.close()


WORKER = """
import sys
from pathlib import Path
from pyqmail.checks import greylist
greylist.PENDING_PER_NET, greylist.MAX_PENDING, greylist.MAX_PASSED = 6, 28, 20
greylist.MAX_CLIENTS = 5  # 7 pairs pass: 2 evicted
greylist.PRUNE_EVERY = 7
grey = greylist.Greylist(Path(sys.argv[1]))
settings = greylist.Settings(300, 3600)
def triplet(i):
    ip = f"2001:db8:1:{i % 5:x}::1" if i % 2 else f"192.0.{i % 3}.1"
    return ip, f"s{i}@d{i % 4}.test", f"u{i}@mx.test"
sys.stdin.readline()  # start together
seen = set()
for i in range(150):  # a new triplet every 10 s, its retry 300 s later
    for j in (i, i - 30):
        if j >= 0:
            seen.add(grey.check(*triplet(j), settings, 1e6 + 10 * i).log.split()[0])
print(" ".join(sorted(seen)))
"""


def test_the_counts_stay_right_with_workers_deciding_at_once(tmp_path: Path) -> None:
    """Two processes adding, passing, evicting and pruning the same triplets at once (every
    limit tiny): the counts they keep are the rows there are."""
    seen = {log for out in at_once(WORKER, tmp_path) for log in out.split()}
    found = counts(tmp_path)  # the counts kept are the rows there are
    assert found["pending"] > 0 and found["passed"] > 0 and found["client"] > 0, found
    assert seen >= {"greylist=new", "greylist=early", "greylist=pass", "greylist=client"}, seen
    assert not [log for log in seen if log.startswith("greylist=error")]
