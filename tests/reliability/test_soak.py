"""Crash durability under real supervise: the short soak of ``make test``.

``make stress`` runs the same soak for minutes (``python -m tests.stress.soak``).
"""

from __future__ import annotations

import shutil

import pytest

from tests.stress.soak import run_soak

pytestmark = pytest.mark.skipif(
    shutil.which("supervise") is None, reason="daemontools (supervise, svc, svstat) not installed"
)


def test_sigkill_soak_loses_nothing_and_delivers_nothing_partial() -> None:
    result, _ = run_soak(seconds=30)
    print(result.details())
    print(result.summary())
    assert result.drained, f"queue did not drain: {result.details()}"
    assert result.acknowledged > 50, f"too little load got through: {result.details()}"
    assert result.kills >= 5, f"too few kills to prove anything: {result.details()}"
    assert result.lost == 0, f"acknowledged messages lost: {result.lost_ids[:10]}"
    assert not result.partial, f"partial deliveries: {result.partial[:5]}"
    assert not result.unknown, f"unexpected files in the Maildirs: {result.unknown[:5]}"
    assert result.bad_queue_files == 0, "torn queue files were moved to bad/"
    assert result.delivered == result.acknowledged
