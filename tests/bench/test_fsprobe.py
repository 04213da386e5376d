"""The file-creation probe the benchmarks run before they start (bench/fsprobe.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fsprobe


def test_probe_measures_and_keeps_its_files(tmp_path: Path) -> None:
    """Deleted, the probe's files would become recently-deleted inodes that every later
    creation in the benchmark steps over; they stay, empty, with names of their own."""
    (tmp_path / "keep").write_text("x")
    cost = fsprobe.create_cost_ms(tmp_path, files=50)
    assert 0 < cost < 50  # milliseconds per creation: anything sane
    again = fsprobe.create_cost_ms(tmp_path, files=50)  # a second probe: fresh names
    assert again > 0
    probes = [p for p in tmp_path.iterdir() if p.name.startswith(".fsprobe.")]
    assert len(probes) == 100
    assert all(p.stat().st_size == 0 for p in probes)
    assert (tmp_path / "keep").read_text() == "x"


def test_worst_place_is_reported(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cost, where = fsprobe.worst_cost_ms([a, b])
    assert where in (a, b)
    assert cost > 0


def test_settle_waits_while_creation_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    costs = iter([0.5, 0.4, 0.01])
    monkeypatch.setattr(fsprobe, "worst_cost_ms", lambda places: (next(costs), places[0]))
    monkeypatch.setattr(fsprobe, "WAIT_STEP", 0.0)
    said: list[str] = []
    assert fsprobe.settle([tmp_path], limit=60, say=said.append) == 0.01
    assert len(said) == 1
    assert "0.500 ms" in said[0]
    assert "waiting up to 60 s" in said[0]


def test_settle_gives_up_at_the_limit_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsprobe, "worst_cost_ms", lambda places: (0.5, places[0]))
    said: list[str] = []
    assert fsprobe.settle([tmp_path], limit=0, say=said.append) == 0.5
    assert len(said) == 2
    assert "squeezed towards 1" in said[1]
