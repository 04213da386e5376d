"""The header From check at the edge of its size limit (a review's finding, session 35).

``HeadWatch`` keeps up to ``HEADER_SIZE_LIMIT + 4`` bytes to find the empty line; a header
section of limit + 1 or + 2 bytes was marked complete, and the parser, reading at most the
limit, cut its last line: a foreign From put last went unseen, and a message without a From
passes when the envelope sender is owned. Every size around the limit must be refused.
"""

from __future__ import annotations

import pytest

from pyqmail.headers import HEADER_SIZE_LIMIT
from pyqmail.smtpd.senders import HeadWatch, SenderMap

LOGIN = "alice@mx.test"
SENDERS = SenderMap({LOGIN: frozenset({LOGIN})})


def section(size: int, from_line: bytes) -> bytes:
    """A header section of exactly ``size`` bytes (last CRLF included), ``from_line`` last."""
    pad = size - len(from_line) - len(b"X-Pad: \r\n")
    return b"X-Pad: " + b"p" * pad + b"\r\n" + from_line


@pytest.mark.parametrize("delta", range(-3, 5))
@pytest.mark.parametrize("chunk", [1 << 20, 4096, 7])
def test_a_foreign_from_last_is_refused_at_every_size_around_the_limit(
    delta: int, chunk: int
) -> None:
    head = section(HEADER_SIZE_LIMIT + delta, b"From: ceo@bank.example\r\n")
    message = head + b"\r\nbody\r\n"
    watch = HeadWatch(LOGIN, LOGIN, SENDERS, "192.0.2.1")
    for i in range(0, len(message), chunk):
        watch.feed(message[i : i + chunk])
    reply = watch.refusal()
    assert reply is not None, f"section of limit{delta:+d} bytes passed"
    if delta <= 0:
        assert "From not owned by you" in reply
    else:
        assert reply == "550 5.7.1 header section too long"


@pytest.mark.parametrize("delta", [-2, -1, 0])
def test_an_owned_from_last_within_the_limit_passes(delta: int) -> None:
    head = section(HEADER_SIZE_LIMIT + delta, b"From: alice@mx.test\r\n")
    watch = HeadWatch(LOGIN, LOGIN, SENDERS, "192.0.2.1")
    watch.feed(head + b"\r\nbody\r\n")
    assert watch.refusal() is None
