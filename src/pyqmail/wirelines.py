"""A queued message's lines as they leave: CRLF everywhere, none over 998 octets.

One function, because two places must agree on the result byte for byte: remote delivery
sends it (``pyqmail.send.remote.wire_data``, which then only dot-stuffs), and the DKIM
signer signs it (``pyqmail.dkim.sign.sign``). pyqmail-smtpd and pyqmail-sendmail accept
lines of any length, and RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1 let none over 998 octets
leave; a signature over the queued bytes would not verify once the long lines are broken
(a broken header line gains a space inside its value, a broken body line changes the body
hash, whatever the canonicalization). So the signer signs the broken form, and every copy
of a signed message carries it (``pyqmail.send.scheduler``): applied again, it changes
nothing.
"""

from __future__ import annotations

import re
from typing import Final

MAX_LINE: Final = 998  # octets of text per line on the wire, CRLF not counted
SHORTCUT_MAX: Final = 1 << 20  # octets of a message measured before the regex (_longest_line)

# A line starting with "." gets a second one on the wire (dot-stuffing, after this): such a
# line is broken one octet earlier, so that it too stays within MAX_LINE as sent. Anchored
# at line starts: a short line costs one step.
_LONG_LINE = re.compile(
    rb"^(?:\.[^\r\n]{%d,}|[^\r\n]{%d,})" % (MAX_LINE - 1, MAX_LINE + 1), re.MULTILINE
)


def _split_line(match: re.Match[bytes]) -> bytes:
    """Postfix's ``smtp_line_length_limit``: break a long line with CRLF SPACE every
    ``MAX_LINE`` octets (the space makes a header line a folded one and keeps a body line
    from starting with ``.``)."""
    line = match.group()
    first = MAX_LINE - line.startswith(b".")
    pieces = [line[:first]]
    step = MAX_LINE - 1
    pieces += [line[i : i + step] for i in range(first, len(line), step)]
    return b"\r\n ".join(pieces)


def wire_lines(message: bytes) -> bytes:
    """``message`` with CRLF line ends (bare CR and LF normalized), ending in CRLF unless
    empty, and no line over ``MAX_LINE`` octets, not even once dot-stuffed. Idempotent.
    Each step is one linear pass in C; the counts spare a queued message, CRLF already,
    the copies of the normalization (every copy of a signed message passes here)."""
    data, crlf = message, message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if len(data) <= SHORTCUT_MAX and _longest_line(data) < MAX_LINE:
        return data  # no line to break, not even a dot-stuffed one
    return _LONG_LINE.sub(_split_line, data)


def _longest_line(data: bytes) -> int:
    """The longest line of CRLF-ended ``data``. Splitting is one pass in C; the regex
    alone costs about four times as much on a message of short lines (it tries a match at
    every octet), and nearly every message has no line to break. Only for messages up to
    ``SHORTCUT_MAX``: the split makes an object per line, about 14 times the message's size
    for one of 2-octet lines (a 25 MiB message would cost some 340 MB in pyqmail-send's
    manager), where the regex with nothing to replace allocates nothing."""
    return max(map(len, data.split(b"\r\n")))
