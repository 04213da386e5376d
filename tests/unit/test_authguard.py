"""pyqmail.smtpd.authguard.AuthState: the SQLite state every worker and listener shares."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from pyqmail.smtpd import authguard
from pyqmail.smtpd.authguard import AuthState, Settings

S = Settings(lock_fails=3, lock_secs=60, concurrency=2)
PID = os.getpid()


@pytest.fixture
def state(tmp_path: Path) -> AuthState:
    return AuthState(tmp_path / "smtpd" / "authstate.sqlite")


def fail(state: AuthState, key: str, user: str, now: float) -> tuple[str, float]:
    verdict, _ = state.begin(key, user, now, PID, S)
    assert verdict in ("go", "locked")
    delay = state.finish(key, user, ok=False, locked=verdict == "locked", now=now, settings=S)
    return verdict, delay


def test_penalty_doubles_per_client_and_holds_the_lease(state: AuthState) -> None:
    now = 1000.0
    delays = []
    for _ in range(5):
        verdict, wait = state.begin("192.0.2.1", f"u{now}", now, PID, S)
        if verdict == "wait":
            now += wait
            continue
        delays.append(
            state.finish("192.0.2.1", f"u{now}", ok=False, locked=False, now=now, settings=S)
        )
        assert state.begin("192.0.2.1", "x", now + 0.1, PID, S)[0] == "wait"
    assert delays[:3] == [1, 2, 4]
    assert state.begin("192.0.2.2", "x", now, PID, S)[0] == "go", "other clients are not slowed"


def test_failures_are_forgotten_after_the_window(state: AuthState) -> None:
    fail(state, "k", "a", 0.0)
    fail(state, "k", "b", 5.0)
    assert fail(state, "k", "c", 10.0 + authguard.WINDOW + 1)[1] == 1


def test_one_attempt_in_flight_per_client(state: AuthState) -> None:
    assert state.begin("k", "a", 10.0, PID, S) == ("go", 0.0)
    verdict, wait = state.begin("k", "a", 10.5, PID, S)
    assert verdict == "wait" and wait == pytest.approx(authguard.VERIFY_LEASE - 0.5)
    state.finish("k", "a", ok=True, locked=False, now=10.6, settings=S)
    assert state.begin("k", "a", 10.7, PID, S)[0] == "go"


def test_a_dead_holders_lease_is_taken_over(state: AuthState) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that no longer runs
    assert state.begin("k", "a", 10.0, pid, S)[0] == "go"
    assert state.begin("k", "a", 10.5, PID, S)[0] == "go"


def test_account_lock_after_n_failures_bounded_and_not_extended(state: AuthState) -> None:
    t = 0.0
    for _ in range(3):
        assert fail(state, f"10.0.0.{int(t)}", "alice", t)[0] == "go"
        t += 5
    assert fail(state, "10.9.9.9", "alice", t)[0] == "locked", "locked from any client"
    for _ in range(10):  # failures during the lock do not extend it
        t += 5
        assert fail(state, f"10.1.0.{int(t)}", "alice", t)[0] == "locked"
    assert state.begin("10.2.0.1", "bob", t, PID, S)[0] == "go", "other names unaffected"
    assert state.begin("10.3.0.1", "alice", 10 + S.lock_secs + 1, PID, S)[0] == "go"


def test_lock_is_clamped_when_the_clock_jumps_back(state: AuthState) -> None:
    for i in range(3):
        fail(state, f"10.0.0.{i}", "alice", 100_000.0 + i)
    # the clock goes back a day: the lock still ends lock_secs after "now" at the latest
    assert state.begin("10.5.0.1", "alice", 100_000.0 - 86_400, PID, S)[0] == "locked"
    assert state.begin("10.5.0.2", "alice", 100_000.0 + S.lock_secs + 3, PID, S)[0] == "go"


def test_success_clears_the_account_count(state: AuthState) -> None:
    fail(state, "a", "alice", 0.0)
    fail(state, "b", "alice", 1.0)
    state.begin("c", "alice", 2.0, PID, S)
    state.finish("c", "alice", ok=True, locked=False, now=2.0, settings=S)
    fail(state, "d", "alice", 3.0)
    fail(state, "e", "alice", 4.0)
    assert state.begin("f", "alice", 5.0, PID, S)[0] == "go"


def test_lock_off_with_zero(state: AuthState) -> None:
    off = Settings(lock_fails=0, lock_secs=60)
    for i in range(20):
        state.begin(f"10.0.0.{i}", "alice", float(i), PID, off)
        state.finish(f"10.0.0.{i}", "alice", ok=False, locked=False, now=float(i), settings=off)
    assert state.begin("10.1.0.1", "alice", 30.0, PID, off)[0] == "go"


def test_tables_are_bounded(state: AuthState, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyqmail import authlock  # the login locks' own file (a module of this change)

    monkeypatch.setattr(authguard, "MAX_ROWS", 50)
    monkeypatch.setattr(authlock, "MAX_ROWS", 50)
    for i in range(120):
        fail(state, f"10.0.{i // 250}.{i % 250}", f"user{i}", 1000.0 + i)
    state.prune(1121.0)
    state.accounts.prune(1121.0, S.rule)
    assert state.rows() == (50, 50)


def test_the_cap_evicts_a_lock_in_force_last(
    state: AuthState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spraying new account names must not free a locked account by crowding it out."""
    from pyqmail import authlock

    monkeypatch.setattr(authlock, "MAX_ROWS", 50)
    for i in range(S.lock_fails):  # alice, the oldest row, locked
        fail(state, f"10.9.0.{i}", "alice", 1000.0 + i)
    assert state.begin("10.9.1.1", "alice", 1010.0, PID, S)[0] != "go"
    for i in range(120):  # within the lock's 60 s
        fail(state, f"10.0.{i // 250}.{i % 250}", f"user{i}", 1010.0 + i / 4)
    state.accounts.prune(1041.0, S.rule)
    assert state.rows()[1] == 50
    assert state.begin("10.9.1.2", "alice", 1041.0, PID, S)[0] != "go", "the lock was evicted"


def test_a_failure_that_began_before_the_lock_does_not_lift_it(state: AuthState) -> None:
    """Many clients guessing one name at once: the check that ends after another one locked
    the name was not refused as locked (it began before), and must not unlock it either."""
    began = [state.begin(f"10.8.0.{i}", "alice", 100.0, PID, S) for i in range(S.lock_fails + 1)]
    assert all(verdict == "go" for verdict, _ in began)
    for i in range(S.lock_fails + 1):  # the last one finishes after the lock was set
        state.finish(f"10.8.0.{i}", "alice", ok=False, locked=False, now=101.0 + i, settings=S)
    assert state.begin("10.8.1.1", "alice", 110.0, PID, S)[0] == "locked"


def test_a_broken_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "smtpd" / "authstate.sqlite"  # the layout: the login locks in ../auth
    path.parent.mkdir()
    path.write_bytes(b"this is not a database" * 100)
    state = AuthState(path)
    assert state.begin("k", "a", 1.0, PID, S)[0] == "go"
    assert list(path.parent.glob("authstate.sqlite.broken-*"))


def test_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(authguard.StateError, match=r"file/x/authstate.sqlite: cannot open"):
        AuthState.check(blocker / "x" / "authstate.sqlite")


def test_two_connections_see_one_state(state: AuthState) -> None:
    other = AuthState(state.path)
    assert state.begin("k", "a", 1.0, PID, S)[0] == "go"
    assert other.begin("k", "a", 1.1, PID, S)[0] == "wait"
    assert isinstance(other.connect(), sqlite3.Connection)


def run_attempts(
    guards: list[authguard.AuthGuard], ips: list[str], work: float
) -> tuple[list[authguard.Outcome], dict[str, int]]:
    """One attempt per ip (round robin over the guards, like workers); returns the outcomes
    and the most password checks that ever ran at once, overall and for one client."""
    running: Counter[str] = Counter()
    peak = {"all": 0, "one": 0}
    lock = threading.Lock()

    def verify(ip: str) -> bool:
        with lock:
            running[ip] += 1
            peak["all"] = max(peak["all"], sum(running.values()))
            peak["one"] = max(peak["one"], running[ip])
        time.sleep(work)
        with lock:
            running[ip] -= 1
        return True  # success: no penalty, so only the lease serialises

    async def main() -> list[authguard.Outcome]:
        return await asyncio.gather(
            *(
                guards[n % len(guards)].attempt(ip, "alice", lambda ip=ip: verify(ip))
                for n, ip in enumerate(ips)
            )
        )

    try:
        return asyncio.run(main()), peak
    finally:
        for guard in guards:
            guard.shutdown()


def test_password_checks_per_worker_are_bounded(tmp_path: Path) -> None:
    guard = authguard.AuthGuard(tmp_path, Settings(concurrency=2))
    outcomes, peak = run_attempts([guard], [f"10.0.0.{i}" for i in range(12)], 0.05)
    assert all(o.ok for o in outcomes)
    assert peak["all"] == 2, peak


def test_one_client_is_checked_one_at_a_time_across_workers(tmp_path: Path) -> None:
    guards = [authguard.AuthGuard(tmp_path, Settings(concurrency=4)) for _ in range(2)]
    outcomes, peak = run_attempts(guards, ["10.0.0.1"] * 6, 0.05)
    assert all(o.ok for o in outcomes), outcomes
    assert peak["one"] == 1, peak


def test_waiting_too_long_is_a_temporary_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authguard, "WAIT_MAX", 0.3)
    guard = authguard.AuthGuard(tmp_path, Settings(concurrency=1))
    outcomes, _ = run_attempts([guard], ["10.0.0.1"] * 3, 0.25)
    assert [o.ok for o in outcomes].count(True) >= 1
    busy = [o for o in outcomes if not o.ok]
    assert busy and all(o.temporary and o.reason == "busy" for o in busy)


def test_a_hup_changing_authconcurrency_keeps_the_limit_and_wakes_waiters(
    tmp_path: Path,
) -> None:
    """A review's finding: configure() swapped in a new semaphore, so a check in flight gave
    its turn back to the new one (3 checks at once under a limit of 2, for good), and the old
    one's waiters slept until WAIT_MAX (454 after 20 s with turns free)."""
    guard = authguard.AuthGuard(tmp_path, Settings(concurrency=1))
    running, peak, gates = [0], [0], [threading.Event() for _ in range(8)]
    lock = threading.Lock()

    def verify(n: int) -> bool:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gates[n].wait(10)
        with lock:
            running[0] -= 1
        return True

    async def main() -> tuple[list[authguard.Outcome], float]:
        first = asyncio.ensure_future(guard.attempt("10.0.0.1", "a", lambda: verify(0)))
        await asyncio.sleep(0.2)  # the first check runs, holding the only turn
        waiter = asyncio.ensure_future(guard.attempt("10.0.0.2", "b", lambda: verify(1)))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        guard.configure(Settings(concurrency=2))  # the HUP: the waiter may start now
        while running[0] < 2 and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        woke = time.monotonic() - started
        gates[0].set()
        gates[1].set()
        done = [await first, await waiter]
        # the limit holds after the turns of both limits came back: 2 at once, never 3
        more = [
            asyncio.ensure_future(guard.attempt(f"10.0.1.{n}", "c", lambda n=n: verify(n)))
            for n in range(2, 8)
        ]
        await asyncio.sleep(0.3)
        for gate in gates:
            gate.set()
        return done + list(await asyncio.gather(*more)), woke

    try:
        outcomes, woke = asyncio.run(main())
    finally:
        guard.shutdown()
    assert all(o.ok for o in outcomes), outcomes
    assert woke < 1.0, f"the waiter started {woke:.1f} s after the HUP"
    assert peak[0] == 2, peak


def test_slots_give_back_a_turn_handed_over_as_the_wait_is_cancelled() -> None:
    async def main() -> tuple[int, int]:
        slots = authguard.Slots(1)
        await slots.acquire()
        waiter = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # the turn goes to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs: it must give it back
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        timed_out = 0
        try:
            await asyncio.wait_for(slots.acquire(), 0.05)
        except TimeoutError:
            timed_out = 1
        return slots.busy, timed_out

    assert asyncio.run(main()) == (1, 0)
