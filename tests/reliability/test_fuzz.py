"""The protocol-core fuzzer (tests/stress/fuzz.py): briefly here, at length in make stress."""

from __future__ import annotations

import random

import pytest

from pyqmail.protocol import MessageAbort, Policy, SMTPConnection
from tests.stress.fuzz import fuzz


def test_fuzz_protocol_core_briefly() -> None:
    seed = random.randrange(1 << 30)
    lines: list[str] = []
    iterations, corpus, failures = fuzz(8.0, seed, lines.append)
    print(f"seed={seed} iterations={iterations} corpus={corpus} failures={len(failures)}")
    print("\n".join(lines))
    assert iterations > 1000, f"only {iterations} iterations in 8 s"
    assert not failures, f"seed {seed}: " + "\n".join(msg for _, msg in failures[:5])


@pytest.mark.slow
def test_fuzz_protocol_core_long() -> None:
    seed = random.randrange(1 << 30)
    lines: list[str] = []
    iterations, _, failures = fuzz(120.0, seed, lines.append)
    print(f"seed={seed} iterations={iterations}")
    assert not failures, f"seed {seed}: " + "\n".join(msg for _, msg in failures[:5])


@pytest.mark.parametrize("end", ["timeout", "connection_lost"])
def test_one_abort_per_message_after_databytes(end: str) -> None:
    conn = SMTPConnection(
        Policy(
            hostname="mx.test",
            greeting="mx.test",
            client_ip="192.0.2.1",
            rcpthosts=lambda _d: True,
            databytes=64,
        )
    )
    events = conn.start()
    for data in [b"EHLO a\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<u@x.test>\r\n"]:
        events += conn.receive(data)
    events += conn.receive(b"DATA\r\n")
    events += conn.receive(b"A" * 200)  # over databytes: aborted at once, read on
    events += conn.timeout() if end == "timeout" else conn.connection_lost()
    aborts = [e for e in events if isinstance(e, MessageAbort)]
    assert len(aborts) == 1, f"{len(aborts)} MessageAborts for one message: {aborts}"
