"""SMTP smuggling (CVE-2023-51764/51765/51766, CVE-2024-27305) against the running daemon.

Every sequence of length 1..N over {CR, LF, ".", NUL} is placed between the first message's
text and a complete second transaction (MAIL/RCPT/DATA/text) that an attacker wants the
server to see as a separate message; the data then ends with a real ``.<CRLF>``. Each variant
is sent after a body that ends mid-line and after one that ends with CRLF, to a client with
bare-LF tolerance (``BARELF=1`` rule, from 127.0.0.2) and to a strict one (127.0.0.3).

The reference: the real end is the first ``<CR><LF>.<CR><LF>`` in the raw stream (the CRLF
of the DATA command counting as the first two bytes). For every variant:

- the first message is queued iff its content has no bare CR, no NUL (``554 5.6.0``) and no
  bare LF unless BARELF;
  if queued, its text is exactly the reference (bare LF -> CRLF when tolerated, dot-unstuffed);
- when the real end comes after the smuggled transaction started, the server never answers
  ``354`` to it and never queues a message from the smuggled sender;
- at most one message per session from the first sender, and nothing else in the queue.

N = 4 in ``make test`` (1360 sessions); N = 5 under ``-m slow`` (5456 sessions).
"""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.attacks.tally import tried
from tests.attacks.wire import Wire
from tests.e2e.conftest import QmailRoot, StartDaemon

ALPHABET = (b"\r", b"\n", b".", b"\x00")
PREFIXES = (
    b"Subject: smuggle test\r\n\r\nfirst message body",  # the variant ends a partial line
    b"Subject: smuggle test\r\n\r\nfirst message body\r\n",  # the variant starts a line
)
SOURCES = {"127.0.0.2": True, "127.0.0.3": False}  # source address -> BARELF
RULES = '127.0.0.2:allow,BARELF="1"\n127.0.0.3:allow,BARELF="0"\n:allow\n'


def sequences(max_len: int) -> list[bytes]:
    return [
        b"".join(p) for n in range(1, max_len + 1) for p in itertools.product(ALPHABET, repeat=n)
    ]


def smuggled(n: int) -> bytes:
    return (
        f"MAIL FROM:<smug{n}@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
        f"Subject: smuggled {n}\r\n\r\nI was smuggled\r\n"
    ).encode()


@dataclass
class Variant:
    n: int
    prefix: bytes
    seq: bytes
    bare_lf: bool
    source: str

    @property
    def content_stream(self) -> bytes:
        return self.prefix + self.seq + smuggled(self.n) + b".\r\n"

    def reference(self) -> tuple[int, bytes | None]:
        """(end index in the stream, expected stored text or None if it must be refused)."""
        stream = self.content_stream
        end = (b"\r\n" + stream).find(b"\r\n.\r\n")
        assert end > 0  # the stream always has a real end
        content = stream[:end]
        bare_cr = re.search(rb"\r(?!\n)", content) is not None
        bare_lf = re.search(rb"(?<!\r)\n", content) is not None
        if bare_cr or (bare_lf and not self.bare_lf) or b"\0" in content:  # NUL: 554 5.6.0
            return end, None
        normalized = re.sub(rb"(?<!\r)\n", b"\r\n", content)
        lines = normalized.split(b"\r\n")
        return end, b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)

    @property
    def smuggle_starts(self) -> int:
        return len(self.prefix) + len(self.seq)


def run_variant(port: int, v: Variant) -> list[tuple[int, str]]:
    with Wire(port, v.source) as w:
        assert w.reply()[0] == 220
        assert w.cmd("EHLO attacker.test")[0] == 250
        assert w.cmd(f"MAIL FROM:<v{v.n}@remote.test>")[0] == 250
        assert w.cmd("RCPT TO:<u@example.test>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        w.send(v.content_stream + b"QUIT\r\n")
        return w.until_eof(15)


def check_all(qmail_root: QmailRoot, smtpd: StartDaemon, max_len: int) -> None:
    daemon = smtpd(workers=2, rules_cdb=qmail_root.rules(RULES))
    variants = [
        Variant(n, prefix, seq, bare_lf, source)
        for n, (prefix, seq, (source, bare_lf)) in enumerate(
            itertools.product(PREFIXES, sequences(max_len), SOURCES.items())
        )
    ]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda v: run_variant(daemon.port, v), variants))
    tried("smuggling", len(variants))

    by_sender: dict[str, list[bytes]] = {}
    for env, data in qmail_root.queued():
        by_sender.setdefault(env.sender, []).append(data)
    problems = []
    for v, got in zip(variants, replies, strict=True):
        end, expected = v.reference()
        codes = [code for code, _ in got]
        first = by_sender.pop(f"v{v.n}@remote.test", [])
        smug = by_sender.pop(f"smug{v.n}@evil.test", [])
        where = f"prefix={v.prefix[-6:]!r} seq={v.seq!r} barelf={v.bare_lf}"
        if -1 in codes:
            problems.append(f"{where}: server neither answered nor closed: {got}")
        if len(first) > 1:
            problems.append(f"{where}: first sender queued {len(first)} times")
        if expected is None and first:
            problems.append(f"{where}: bare CR/LF or NUL message queued: {first[0][-80:]!r}")
        if expected is not None:
            if not first:
                problems.append(f"{where}: legitimate message not queued; replies {got}")
            elif not (first[0].endswith(expected) and first[0].startswith(b"Received: ")):
                problems.append(f"{where}: stored {first[0][-120:]!r}, want end {expected[-80:]!r}")
        if end + 3 > v.smuggle_starts:  # the real end is inside/after the smuggled part
            if smug:
                problems.append(f"{where}: SMUGGLED message queued: {smug[0][:200]!r}")
            if 354 in codes:
                problems.append(f"{where}: smuggled DATA got 354: {got}")
    if by_sender:
        problems.append(f"unexpected senders in the queue: {sorted(by_sender)[:10]}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])
    assert not qmail_root.tmp_files(), "half-written files left in queue/tmp"


def test_sequences_up_to_4_around_the_end_marker(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    check_all(qmail_root, smtpd, 4)


@pytest.mark.slow
def test_sequences_up_to_5_around_the_end_marker(qmail_root: QmailRoot, smtpd: StartDaemon) -> None:
    check_all(qmail_root, smtpd, 5)
