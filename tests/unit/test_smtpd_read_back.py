"""Spilled messages read back for the checks (pyqmail.smtpd.intake's ``SpoolBudget.read_back``):
a message past SPOOL_LIMIT streams to its tmp file, but the checks need it whole, and copy it
more; without a bound, fifty clients' messages of ``databytes`` each would be read back at
once. They go in turn, first come first served, within the worker's ``read_limit``."""

from __future__ import annotations

import asyncio

import pytest
from test_protocol_support import policy
from test_smtpd_intake_replies import Context, Transport

from pyqmail.checks import inbound
from pyqmail.checks.verdict import Verdict
from pyqmail.protocol import SMTPConnection
from pyqmail.queue.store import Queue
from pyqmail.smtpd import intake
from pyqmail.smtpd.intake import SpoolBudget, SpoolBusyError
from pyqmail.smtpd.session import Session


async def _reader(
    budget: SpoolBudget, name: str, size: int, log: list[str], hold: asyncio.Event
) -> None:
    async with budget.read_back(size, wait=5):
        log.append(f"{name} in at {budget.reading}")
        await hold.wait()
    log.append(f"{name} out")


def test_messages_are_read_back_in_turn_within_the_limit() -> None:
    async def go() -> None:
        budget, log = SpoolBudget(read_limit=1000), []
        holds = {name: asyncio.Event() for name in "abc"}
        tasks = [
            asyncio.create_task(_reader(budget, name, size, log, holds[name]))
            for name, size in (("a", 600), ("b", 600), ("c", 100))
        ]
        await asyncio.sleep(0.01)
        assert log == ["a in at 700", "c in at 700"], "b does not fit beside a; c does"
        holds["a"].set()
        await asyncio.sleep(0.01)
        assert log[2:] == ["a out", "b in at 700"]
        holds["b"].set()
        holds["c"].set()
        await asyncio.gather(*tasks)
        assert budget.reading == 0

    asyncio.run(go())


def test_a_first_in_line_that_waited_its_head_start_is_not_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Others that fit pass a large first in line for HEAD_START only: then they wait
    until it is in, so a stream of small messages cannot starve it."""
    monkeypatch.setattr(intake, "HEAD_START", 0.05)

    async def go() -> None:
        budget, log = SpoolBudget(read_limit=1000), []
        hold = {name: asyncio.Event() for name in ("a", "big", "early", "late")}
        a = asyncio.create_task(_reader(budget, "a", 600, log, hold["a"]))
        big = asyncio.create_task(_reader(budget, "big", 600, log, hold["big"]))
        early = asyncio.create_task(_reader(budget, "early", 100, log, hold["early"]))
        await asyncio.sleep(0.1)  # big's head start is over
        late = asyncio.create_task(_reader(budget, "late", 100, log, hold["late"]))
        await asyncio.sleep(0.01)
        assert log == ["a in at 700", "early in at 700"], "late waits behind big"
        for name in ("a", "early"):
            hold[name].set()
        await asyncio.sleep(0.01)
        assert log[2:4] == ["a out", "early out"] and "big in" in log[4]
        hold["big"].set()
        hold["late"].set()
        await asyncio.gather(a, big, early, late)
        assert budget.reading == 0

    asyncio.run(go())


def test_a_message_larger_than_the_limit_goes_alone() -> None:
    async def go() -> None:
        budget, log = SpoolBudget(read_limit=1000), []
        hold = asyncio.Event()
        big = asyncio.create_task(_reader(budget, "big", 5000, log, hold))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(_reader(budget, "small", 10, log, hold))
        await asyncio.sleep(0.01)
        assert log == ["big in at 5000"]
        hold.set()
        await asyncio.gather(big, small)
        assert log[-1] == "small out" and budget.reading == 0

    asyncio.run(go())


def test_a_wait_that_runs_out_or_is_cancelled_leaves_the_line() -> None:
    async def go() -> None:
        budget, log = SpoolBudget(read_limit=1000), []
        hold = asyncio.Event()
        first = asyncio.create_task(_reader(budget, "first", 1000, log, hold))
        await asyncio.sleep(0.01)
        with pytest.raises(SpoolBusyError, match="1-byte message"):
            async with budget.read_back(1, wait=0.05):
                raise AssertionError("let in beside a full budget")
        gone = asyncio.create_task(_reader(budget, "gone", 1, log, hold))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert len(budget._line) == 0
        hold.set()
        await first
        async with budget.read_back(1000, wait=0):  # nothing left behind in the count
            assert budget.reading == 1000
        assert budget.reading == 0

    asyncio.run(go())


BODY = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 1200 + b".\r\n"  # 86 KiB: spills


async def _session(ctx: Context) -> Session:
    s = Session(ctx)  # type: ignore[arg-type]
    s.transport = Transport()  # type: ignore[assignment]
    s.conn = SMTPConnection(policy())
    s.handle(s.conn.start())
    s.handle(s.conn.receive(b"EHLO c\r\n"))
    s.handle(s.conn.receive(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"))
    s.handle(s.conn.receive(BODY))
    assert s.intake.tasks, "the checks run"
    return s


def _answer(s: Session) -> bytes:
    return bytes(s.transport.out).rpartition(b"354 ")[2].partition(b"\r\n")[2]  # type: ignore[union-attr]


def test_sessions_check_spilled_messages_in_turn(
    monkeypatch: pytest.MonkeyPatch, queue: Queue
) -> None:
    """Two sessions' spilled messages with room for one: the second is read back only when
    the first one's checks are over; the worker's count never passes the limit."""
    seen: list[int] = []
    gate = asyncio.Event()

    async def check(*_: object, **__: object) -> inbound.Outcome:
        seen.append(ctx.budget.reading)
        await gate.wait()
        return inbound.Outcome(Verdict("refuse", 550, "5.7.1 no thanks", "dmarc=fail"), False, b"")

    monkeypatch.setattr(inbound, "run", check)

    async def go() -> list[bytes]:
        sessions = [await _session(ctx) for _ in range(2)]
        await asyncio.sleep(0.2)
        assert len(seen) == 1, "one message read back, the other waits its turn"
        assert len(BODY) < seen[0] < 100_000  # the message as queued: our Received on top
        gate.set()
        await asyncio.wait({t for s in sessions for t in s.intake.tasks}, timeout=10)
        await asyncio.sleep(0.05)
        return [_answer(s) for s in sessions]

    ctx = Context(queue)
    ctx.budget = SpoolBudget(read_limit=100_000)
    assert asyncio.run(go()) == [b"550 5.7.1 no thanks\r\n"] * 2
    assert seen == [seen[0]] * 2 and ctx.budget.reading == 0


def test_a_message_that_waits_too_long_is_told_to_try_again(
    monkeypatch: pytest.MonkeyPatch, queue: Queue
) -> None:
    gate = asyncio.Event()

    async def check(*_: object, **__: object) -> inbound.Outcome:
        await gate.wait()
        return inbound.Outcome(Verdict("refuse", 550, "5.7.1 no thanks", "dmarc=fail"), False, b"")

    monkeypatch.setattr(inbound, "run", check)
    monkeypatch.setattr(intake, "READ_BACK_WAIT", 0.1)

    async def go() -> list[bytes]:
        first = await _session(ctx)
        second = await _session(ctx)
        await asyncio.wait(second.intake.tasks, timeout=10)
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait(first.intake.tasks, timeout=10)
        await asyncio.sleep(0.05)
        return [_answer(first), _answer(second)]

    ctx = Context(queue)
    ctx.budget = SpoolBudget(read_limit=100_000)
    assert asyncio.run(go()) == [b"550 5.7.1 no thanks\r\n", (intake.BUSY + "\r\n").encode()]
    assert list((queue.root / "tmp").iterdir()) == []
