"""A message the inbound checks were run on is always answered (pyqmail.smtpd.session and
intake): a check whose reply text the core will not send (not printable ASCII), or a check
that fails with a bug, gets the client a 451 and a log line, not silence until the idle
timeout's 421 (which has the client retry for days instead of bouncing)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from test_protocol_support import policy

from pyqmail.checks import inbound
from pyqmail.checks.checkpool import CheckPool
from pyqmail.checks.verdict import Verdict
from pyqmail.protocol import SMTPConnection
from pyqmail.queue.store import Queue
from pyqmail.queue.writer import QueueWriter
from pyqmail.smtpd import intake, session
from pyqmail.smtpd.intake import SpoolBudget
from pyqmail.smtpd.session import Session

MESSAGE = b"From: <ceo@b\xc3\xbccher.example>\r\nSubject: hi\r\n\r\nHello.\r\n.\r\n"


class Context:
    """The few parts of ``SessionContext`` that a message's way to the checks touches."""

    def __init__(self, queue: Queue) -> None:
        knobs = SimpleNamespace(stress_percent=100, timeout_stress=10)
        self.cfg = SimpleNamespace(
            knobs=knobs,
            timeoutsmtpd=300,
            timeoutdata=3600,
            maxconn=10,
            auth=SimpleNamespace(enabled=True),
            scan=SimpleNamespace(enabled=False),
        )
        self.queue = queue
        self.budget = SpoolBudget()
        self.checkpool = CheckPool()
        self.senders = SimpleNamespace(watch=lambda *_: None)

    def submit(self, writer: QueueWriter, done: Any, owner: object) -> None:
        raise AssertionError("a refused message is not committed")

    def connections(self) -> int:
        return 1


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return False


async def _exchange(queue: Queue) -> bytes:
    """EHLO, one message through the checks; what the client was sent after the 354."""
    s = Session(Context(queue))  # type: ignore[arg-type]
    s.transport = Transport()  # type: ignore[assignment]
    s.conn = SMTPConnection(policy())
    s.handle(s.conn.start())
    s.handle(s.conn.receive(b"EHLO c\r\n"))
    s.handle(s.conn.receive(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"))
    s.handle(s.conn.receive(MESSAGE))
    assert s.intake.tasks, "the checks run"
    await asyncio.wait(set(s.intake.tasks), timeout=10)
    return bytes(s.transport.out).rpartition(b"354 ")[2].partition(b"\r\n")[2]  # type: ignore[union-attr]


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, object]]]:
    lines: list[tuple[str, dict[str, object]]] = []
    for module in (session, intake):
        monkeypatch.setattr(module, "log", lambda e, **kv: lines.append((e, kv)), raising=False)
    return lines


def test_a_refusal_the_core_will_not_send_becomes_451(
    monkeypatch: pytest.MonkeyPatch, queue: Queue, logged: list[tuple[str, dict[str, object]]]
) -> None:
    text = "5.7.1 DMARC policy of bücher.example rejects this message"

    async def refuse(*_: object, **__: object) -> inbound.Outcome:
        return inbound.Outcome(Verdict("refuse", 550, text, "dmarc=fail"), False, b"")

    monkeypatch.setattr(inbound, "run", refuse)
    assert asyncio.run(_exchange(queue)) == b"451 4.3.0 queue write failed, try again later\r\n"
    assert [e for e, _ in logged] == ["refused", "error"]
    assert "ProtocolUsageError" in str(logged[1][1]["error"])


def test_a_check_that_breaks_is_answered_451(
    monkeypatch: pytest.MonkeyPatch, queue: Queue, logged: list[tuple[str, dict[str, object]]]
) -> None:
    async def broken(*_: object, **__: object) -> inbound.Outcome:
        raise RuntimeError("a bug in a check")

    monkeypatch.setattr(inbound, "run", broken)
    assert asyncio.run(_exchange(queue)) == b"451 4.3.0 queue write failed, try again later\r\n"
    assert [e for e, _ in logged] == ["error", "queue-fail"]
    assert "a bug in a check" in str(logged[0][1]["error"])
    assert list((queue.root / "tmp").iterdir()) == []
