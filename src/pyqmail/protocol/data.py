"""The DATA reader: one message's content, from the 354 to ``<CR><LF>.<CR><LF>``.

The connection creates one ``DataReader`` per DATA command and feeds it every byte it reads
while the state is DATA (``states.INPUT``); the reader turns them into ``MessageData`` /
``MessageAbort`` events and tells the connection when the message ended or the session must
close. It never changes the session's state itself (``states`` Rule 1).

Framing (SMTP smuggling, CVE-2023-51764/5/6): the only end of DATA is the byte sequence
``<CR><LF>.<CR><LF>`` (the CRLF that ends the DATA command counts as the first). The first
occurrence of that sequence in the raw stream is the end, whatever came before. A CR not
followed by LF, anywhere in the message, is refused (``550 5.5.2 ... bare <CR>``, then close).
A LF not preceded by CR is refused the same way unless ``Policy.bare_lf`` (Postfix 3.9
``smtpd_forbid_bare_newline = normalize``): then it is stored as CRLF, but it never counts
towards the end marker. Like Postfix 3.9 in reject mode the core answers at once and closes
instead of reading to the end: a client that sends bare LF most likely ends its data with
``LF . LF`` too and would otherwise hang until the idle timeout, and nothing after the
offending byte is ever interpreted as a command.

Content refused after reading to the end (the client hears why; nothing is queued): more than
``Policy.databytes`` (``552 5.3.4``), a NUL byte (``554 5.6.0``), more than ``Policy.maxhops``
Received/Delivered-To header lines (``554 5.4.6``, counted as the data streams in by
``pyqmail.headers.HopCounter``, in constant memory). Lines of any length are accepted
(databytes bounds the message); pyqmail-send breaks them at 998 octets on the way out.

Memory: the reader holds at most 4 bytes of a possible end marker and the first
``MAX_HEADER_SCAN`` bytes of the header (for the Message-ID); everything else is passed on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyqmail.headers import HopCounter
from pyqmail.protocol.events import Event, MessageAbort, MessageData, MessageEnd, Policy

#: Bytes of message header scanned for Message-ID (endless folding cannot cost more).
MAX_HEADER_SCAN = 64 * 1024
MAX_MESSAGE_ID = 998
REPLY_TOO_BIG = "552 5.3.4 Error: message exceeds fixed size limit"
REPLY_NUL = "554 5.6.0 Error: message contains a NUL character"
REPLY_HOPS = "554 5.4.6 Error: too many hops, this message is looping"
_END = b"\r\n.\r\n"
# Longest suffix of a chunk that may be the start of _END: held back until more arrives.
_END_PREFIXES = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclass(frozen=True, slots=True)
class Ended:
    """The end marker was read; ``rest`` is the input after it (pipelined commands)."""

    rest: bytes


@dataclass(frozen=True, slots=True)
class Broken:
    """A bare CR or LF: answer ``reply`` and close (the message was aborted)."""

    reply: str


class DataReader:
    """Reads one message: framing, dot-unstuffing, limits, header accounting.

    ``after_crlf`` is whether the DATA command line itself ended with CRLF (so the end marker
    may start at once); ``size`` counts what the connection already sent as the first
    ``MessageData`` (the Received header), so ``MessageEnd.size`` is the whole stored message.
    """

    def __init__(self, policy: Policy, *, after_crlf: bool, size: int) -> None:
        self._policy = policy
        self._pending = b""  # raw bytes that may start the end marker
        self._after_crlf = after_crlf  # raw stream position follows a CRLF
        self._line_start = True  # for dot-unstuffing
        self._size = size
        self._client_size = 0
        self._hops = HopCounter()
        self._headers = bytearray()
        self._headers_done = False
        #: The reply at the end of DATA for a message already aborted (too big, NUL, hops).
        self.refused: str | None = None

    def feed(self, chunk: bytes, out: list[Event]) -> Ended | Broken | None:
        """Consume message bytes; None until the end marker (or a bare CR/LF) is read."""
        buf = self._pending + chunk if self._pending else chunk
        end = -1
        if self._after_crlf and buf.startswith(b".\r\n"):
            end = 0
        else:
            idx = buf.find(_END)
            if idx >= 0:
                end = idx + 2
        if end >= 0:
            self._pending = b""
            broken = self._transform(buf[:end], out) if end else None
            return Ended(buf[end + 3 :]) if broken is None else broken
        hold = 0
        if self._after_crlf and len(buf) < 3 and b".\r\n".startswith(buf):
            hold = len(buf)
        else:
            for prefix in _END_PREFIXES:
                if buf.endswith(prefix):
                    hold = len(prefix)
                    break
        part = buf[: len(buf) - hold]
        self._pending = buf[len(buf) - hold :]
        if part:
            broken = self._transform(part, out)
            if broken is not None:
                return broken
            self._after_crlf = part.endswith(b"\r\n")
        return None

    def end(self) -> MessageEnd:
        """The event for a message read to its end and not refused."""
        return MessageEnd(self._size, _message_id(self._headers), self._client_size)

    def _transform(self, raw: bytes, out: list[Event]) -> Broken | None:
        """Check and unstuff one complete stretch of content; Broken if the session ends."""
        crlf = raw.count(b"\r\n")
        bare = None
        if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:  # C-speed pre-check
            bare = _BARE.search(raw)
        if bare is not None:
            if self._policy.bare_lf and bare.group() == b"\n":
                bare = _BARE_CR.search(raw, bare.end()) or bare
            if bare.group() == b"\r" or not self._policy.bare_lf:
                what = "CR" if bare.group() == b"\r" else "LF"
                if self.refused is None:
                    out.append(MessageAbort(f"bare {what} in message"))
                return Broken(f"550 5.5.2 {self._policy.hostname} Error: bare <{what}> received")
            raw = _BARE_LF.sub(b"\r\n", raw)
        line_start = self._line_start
        self._line_start = raw.endswith(b"\n")
        if line_start and raw.startswith(b"."):
            raw = raw[1:]
        if b"\n." in raw:
            raw = raw.replace(b"\n.", b"\n")
        if raw:
            self._accept(raw, out)
        return None

    def _accept(self, raw: bytes, out: list[Event]) -> None:
        """Pass on unstuffed content, or drop it once the message is refused."""
        self._client_size += len(raw)
        if not self._headers_done:
            self._collect_headers(raw)
        if self.refused is not None:
            return
        refusal = self._content_refusal(raw)
        if refusal is not None:
            self.refused = refusal[1]
            out.append(MessageAbort(refusal[0]))
            return
        self._size += len(raw)
        out.append(MessageData(raw))

    def _content_refusal(self, raw: bytes) -> tuple[str, str] | None:
        """(abort reason, reply at end of DATA) once the message cannot be accepted; the
        rest of it is read and dropped, so the client hears the reason (RFC 5321 §4.1.1.4)."""
        policy = self._policy
        if policy.databytes and self._client_size > policy.databytes:
            return "message exceeds databytes", REPLY_TOO_BIG
        if b"\0" in raw:  # RFC 5322 §2.2/3.5 and RFC 5321 §4.5.2: no NUL in a message
            return "NUL character in message", REPLY_NUL
        hops = self._hops
        if not hops.done:
            hops.feed(raw)
            if hops.hops > policy.maxhops:
                return f"more than {policy.maxhops} hops", REPLY_HOPS
        return None

    def _collect_headers(self, raw: bytes) -> None:
        """Keep the header block (bounded) for the Message-ID; stop at the empty line."""
        headers = self._headers
        old = len(headers)
        headers += raw[: MAX_HEADER_SCAN - old]
        end = -2 if headers.startswith(b"\r\n") else headers.find(b"\r\n\r\n", max(0, old - 3))
        if end != -1:
            del headers[end + 2 :]
            self._headers_done = True
        elif len(headers) >= MAX_HEADER_SCAN:
            self._headers_done = True


def _message_id(block: bytes | bytearray) -> str | None:
    """The Message-ID field of a header block (CRLF lines, no empty line), bounded."""
    low = bytes(block).lower()
    pos = 0
    while (pos := low.find(b"message-id", pos)) >= 0:
        colon = pos + len(b"message-id")
        while low[colon : colon + 1] in (b" ", b"\t"):
            colon += 1
        if (pos == 0 or low[pos - 1] == 0x0A) and low[colon : colon + 1] == b":":
            end = low.find(b"\r\n", colon)
            while end >= 0 and low[end + 2 : end + 3] in (b" ", b"\t"):  # folded
                end = low.find(b"\r\n", end + 2)
            value = bytes(block[colon + 1 : len(low) if end < 0 else end])
            value = value.replace(b"\r\n", b"").strip(b" \t")[:MAX_MESSAGE_ID]
            return "".join(chr(b) if 0x20 < b < 0x7F else "?" for b in value) or None
        pos += 1
    return None
