"""A flood of new triplets cannot shut greylisting for everybody else (s37 review): real file.

This morning's change (no pending row whose retry may still come is evicted) dropped the cap
of an IPv6 /48: one /48 sending from many /64s, each under ``PENDING_PER_NET``, at about
``MAX_PENDING`` new triplets per delay and ``RETRY_GRACE``, held ``pending`` full of young
rows, and every newcomer from anyone was deferred unstored (``greylist=full``): a
Postfix-like sender got 110 deferrals in 110 attempts over 5 days. Now a source is capped at
``PENDING_PER_SOURCE`` (at it only its own stale rows make room), and at ``MAX_PENDING`` with
no stale row the newcomers of sources other than the biggest are accepted unstored. Limits
are scaled down as the other greylist tests do; times are the ``now`` each decision is given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail.checks import greylist
from pyqmail.checks.greylist import Greylist, Settings, place
from tests.checks.test_greylist_bounds import FRIEND, counts
from tests.greylist_util import T0

SETTINGS = Settings(delay=300, lifetime=30 * 86400)
STALE = SETTINGS.delay + greylist.RETRY_GRACE
BAD48 = "2001:db8:bad"


def flooder(n: int) -> str:
    """The /64 of the flooding /48 that its n-th triplet comes from (two per /64). Tests
    tell triplets apart by recipient: digit runs of a sender are one (``greysender``)."""
    return f"{BAD48}:{n // 2 % 65536:x}::1"


@pytest.fixture
def scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 per network, 20 per source (ten networks' worth), 60 in all. ``raising=False``: the
    code before the source cap ignores it (and fails the test for what it does instead)."""
    monkeypatch.setattr(greylist, "PENDING_PER_NET", 2)
    monkeypatch.setattr(greylist, "PENDING_PER_SOURCE", 20, raising=False)
    monkeypatch.setattr(greylist, "MAX_PENDING", 60)


def decide(grey: Greylist, ip: str, sender: str, rcpt: str, at: float) -> tuple[str, str]:
    verdict = grey.check(ip, sender, rcpt, SETTINGS, at)
    return verdict.action, verdict.log


@pytest.mark.usefixtures("scaled")
def test_a_slash_48_flooding_from_many_slash_64s_is_capped_and_others_pass(tmp_path: Path) -> None:
    """The review's flood, scaled: one /48 sends a new triplet from a fresh /64 every 10 s,
    420 of them (seven times ``MAX_PENDING`` within the delay and ``RETRY_GRACE``), a
    correspondent from another source comes in the middle of it and retries as Postfix does
    (300 s, then 600 s later). It is stored at once and passes at its first retry; the /48
    never holds more than its cap and its newcomers over it are deferred unstored."""
    grey = Greylist(tmp_path)
    flood: list[tuple[str, str]] = []
    friend: list[tuple[str, str]] = []
    retries = {T0 + 1800: "new", T0 + 2100: "pass", T0 + 2700: "known"}
    for n in range(420):  # 4200 s: none of its rows stale yet
        at = T0 + 10 * n
        flood.append(decide(grey, flooder(n), "s@spam.test", f"v{n}@mx.test", at))
        for when in [t for t in retries if at <= t < at + 10]:
            friend.append(decide(grey, FRIEND, "alice@friend.test", "bob@mx.test", when))
    assert friend == [
        ("defer", "greylist=new greylist_wait=300"),
        ("accept", "greylist=pass"),
        ("accept", "greylist=known"),
    ]
    assert flood[:20] == [("defer", "greylist=new greylist_wait=300")] * 20
    assert set(flood[20:]) == {("defer", "greylist=full greylist_wait=300")}
    assert counts(tmp_path)["pending"] == 20
    grey.close()


@pytest.mark.usefixtures("scaled")
def test_a_source_at_its_cap_makes_room_from_its_own_stale_rows_only(tmp_path: Path) -> None:
    """The /48 at its cap, its rows stale, beside another source's stale row: its newcomers
    take the places of its own oldest rows, never of the other source's."""
    grey = Greylist(tmp_path)
    assert decide(grey, FRIEND, "a@slow.test", "u@mx.test", T0)[1].startswith("greylist=new")
    for n in range(20):
        decide(grey, flooder(n), "s@spam.test", f"v{n}@mx.test", T0 + 1 + n)
    later = T0 + 21 + STALE
    fresh = [
        decide(grey, flooder(100 + n), "t@spam.test", f"w{n}@mx.test", later) for n in range(5)
    ]
    assert fresh == [("defer", "greylist=new greylist_wait=300")] * 5
    assert decide(grey, flooder(0), "s@spam.test", "v0@mx.test", later + 1)[1].startswith(
        "greylist=new"  # its oldest row went for a newcomer: new again
    )
    assert decide(grey, FRIEND, "a@slow.test", "u@mx.test", later + 2) == (
        "accept",
        "greylist=pass",
    )
    assert counts(tmp_path)["pending"] == 20
    grey.close()


@pytest.mark.usefixtures("scaled")
def test_a_table_full_of_young_rows_accepts_other_sources_newcomers(tmp_path: Path) -> None:
    """60 young rows from many sources each under its caps (three /48s of 20): a newcomer
    from a source holding less than the biggest is accepted unstored (``greylist=full``, as
    an error fails open), one from a biggest source deferred unstored; none is stored."""
    grey = Greylist(tmp_path)
    for block in range(3):
        for n in range(20):
            ip = f"2001:db8:{block}:{n // 2:x}::1"
            decide(grey, ip, "s@spam.test", f"v{n}@mx.test", T0 + n)
    assert counts(tmp_path)["pending"] == 60
    assert decide(grey, FRIEND, "alice@friend.test", "bob@mx.test", T0 + 100) == (
        "accept",
        "greylist=full",
    )
    assert decide(grey, "2001:db8:1:77::1", "s@spam.test", "x@mx.test", T0 + 101) == (
        "defer",
        "greylist=full greylist_wait=300",
    )
    assert counts(tmp_path)["pending"] == 60
    assert place(FRIEND)[0] != place("2001:db8:1::1")[0]
    grey.close()
