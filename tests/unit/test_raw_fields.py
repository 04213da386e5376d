"""pyqmail.headers.raw_fields and head_and_rest: the one split of a message into whole header
fields and body that DKIM signing, the scanning stage and ``header_fields`` share.

The rule for a line that is no field (a stray line): a piece of its own named ``b""``, never
part of the field before it, never the end of the header section (``raw_fields`` says why:
rspamd and Dovecot skip it and read on). Its callers' tests pin what that means for them:
``test_dkim_sign`` (dkimpy verifies), ``tests/scan`` (forged fields after one are removed).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.headers import head_and_rest, header_fields, raw_fields

PIECES = {
    "fields and a fold": (
        b"From: a@x\r\nSubject: one\r\n\ttwo\r\n",
        [(b"From", b"From: a@x\r\n"), (b"Subject", b"Subject: one\r\n\ttwo\r\n")],
    ),
    "a stray line after a field is not its continuation": (
        b"X-Spam-Flag: NO\r\nno colon here\r\nX-Spam: No\r\n",
        [
            (b"X-Spam-Flag", b"X-Spam-Flag: NO\r\n"),
            (b"", b"no colon here\r\n"),
            (b"X-Spam", b"X-Spam: No\r\n"),
        ],
    ),
    "continuation lines after a stray line are its own": (
        b"A: 1\r\nstray\r\n B: 2\r\nC: 3\r\n",
        [(b"A", b"A: 1\r\n"), (b"", b"stray\r\n B: 2\r\n"), (b"C", b"C: 3\r\n")],
    ),
    "an mbox From line": (
        b"From alice@example.org Mon Jan  1 00:00:00 2026\r\nTo: b@x\r\n",
        [(b"", b"From alice@example.org Mon Jan  1 00:00:00 2026\r\n"), (b"To", b"To: b@x\r\n")],
    ),
    "a blank inside the name, an empty name": (
        b"Foo Bar: x\r\n: y\r\n",
        [(b"", b"Foo Bar: x\r\n"), (b"", b": y\r\n")],
    ),
    "blanks before the colon (obs-field)": (
        b"Subject \t: hi\r\n",
        [(b"Subject", b"Subject \t: hi\r\n")],
    ),
    "a first line that starts with a blank": (
        b" X-Spam: Yes\r\n\tmore\r\nA: 1\r\n",
        [(b"", b" X-Spam: Yes\r\n\tmore\r\n"), (b"A", b"A: 1\r\n")],
    ),
    "LF line ends, a last line without one": (
        b"A: 1\n b\nstray\nC: 3",
        [(b"A", b"A: 1\n b\n"), (b"", b"stray\n"), (b"C", b"C: 3")],
    ),
    "empty": (b"", []),
}


@pytest.mark.parametrize("case", PIECES)
def test_raw_fields(case: str) -> None:
    head, want = PIECES[case]
    got = raw_fields(head)
    assert got == want
    assert b"".join(text for _, text in got) == head


SPLITS = {
    "header and body": (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", b"\r\nbody\r\n"),
    "no header section: its first paragraph is body": (
        b"\r\nX-Spam: body\r\n\r\nmore\r\n",
        b"",
        b"\r\nX-Spam: body\r\n\r\nmore\r\n",
    ),
    "no empty line: all header": (b"A: 1\r\nB: 2", b"A: 1\r\nB: 2", b""),
    "an empty body": (b"A: 1\r\n\r\n", b"A: 1\r\n", b"\r\n"),
    "empty": (b"", b"", b""),
}


@pytest.mark.parametrize("case", SPLITS)
def test_head_and_rest(case: str) -> None:
    message, head, rest = SPLITS[case]
    assert head_and_rest(message) == (head, rest)


# header_fields before it shared raw_fields: its own regex, kept here as the reference.
_OLD_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*+(?:\r?\n[ \t].*+)*+)", re.MULTILINE)


def old_header_fields(head: bytes) -> list[tuple[str, bytes]]:
    out = []
    for match in _OLD_FIELD.finditer(head):
        value = match.group(2)
        if b"\n" in value:
            value = b" ".join(part.strip() for part in value.split(b"\n"))
        out.append((match.group(1).decode("ascii").lower(), value.strip()))
    return out


LINES = [
    b"From: a@x",
    b"Subject:  spaced  ",
    b"X:",
    b"Subject \t: obs",
    b" folded",
    b"\tfolded tab",
    b"   ",
    b"no colon",
    b"Foo Bar: x",
    b": empty name",
    b"From alice@example.org Mon Jan  1 00:00:00 2026",
    b"A:b:c",
    b"\xc3\xa4: 8-bit name",
    b"Z: \xc3\xa4",
]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(LINES), max_size=12),
    st.sampled_from([b"\r\n", b"\n"]),
    st.booleans(),
)
def test_header_fields_reads_what_it_read_before(
    lines: list[bytes], eol: bytes, final_eol: bool
) -> None:
    """Unfolding, names, stray lines skipped (and their continuation lines), CRLF and LF:
    header_fields through raw_fields gives what its own regex gave."""
    head = eol.join(lines) + (eol if final_eol and lines else b"")
    message = head + eol + b"body: x" + eol if final_eol else head
    assert header_fields(message, limit=len(message)) == old_header_fields(head)


def test_header_fields_keeps_its_bound() -> None:
    big = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 50) for i in range(5000))
    fields = header_fields(big + b"\r\nbody\r\n", limit=10_000)
    assert 0 < len(fields) < 5000 and fields[-1][1] == b"v" * 50
