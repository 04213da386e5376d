"""The client's input not yet consumed, and the command-line framing read from it.

After h11's ``ReceiveBuffer``: one bounded buffer per connection. In the command states the
connection takes lines from it (``next_line``); in DATA it hands everything to the DATA
reader (``take``); while the core waits for the server it only holds input, up to
``Policy.max_pending`` (the connection checks that bound, it knows the state).

A command line ends with CRLF. A line longer than ``Policy.max_line`` is dropped up to its
LF and reported once (``TOO_LONG``): the part after the limit must never be read as a
command. A LF without CR is refused (``BARE_LF``; the connection closes) unless the policy
normalizes bare LF, like Postfix 3.9's ``smtpd_forbid_bare_newline``.

Pipelining (RFC 2920, Postfix 3.9 ``smtpd_forbid_unauth_pipelining``): input that arrives
before the greeting (the server delays ``start`` by its greeting pause, control/greetdelay),
or more input already buffered behind HELO, EHLO, DATA, NOOP, VRFY,
EXPN or HELP, or behind any command before EHLO advertised PIPELINING, is a protocol
synchronization error: ``554 5.5.0`` and close. STARTTLS is the exception: what follows it
in the same read is discarded (RFC 3207, CVE-2011-0411), and the client gets its 220.
Because this check looks at what one ``receive`` call delivered together, replies depend on
how input is split only when ``Policy.reject_unauth_pipelining`` is on.
"""

from __future__ import annotations

import enum

#: RFC 2920 section 3.1 (+ HELO, HELP): must be the last command of a pipelined group.
_LAST_IN_GROUP = frozenset({"HELO", "EHLO", "DATA", "NOOP", "VRFY", "EXPN", "HELP", "TURN"})


def out_of_sync(verb: str, *, esmtp: bool) -> bool:
    """Whether input already buffered behind ``verb`` is a pipelining violation: ``verb``
    must end its group, or the client pipelines before EHLO advertised PIPELINING. Never for
    QUIT (the session ends anyway) or STARTTLS (its tail is discarded, never executed)."""
    if verb in ("QUIT", "STARTTLS"):
        return False
    return verb in _LAST_IN_GROUP or not esmtp


class LineError(enum.Enum):
    """Why ``next_line`` returned no line although one ended."""

    TOO_LONG = "too-long"  # over max_line, dropped
    BARE_LF = "bare-lf"  # ended with LF alone and the policy refuses that


class InputBuffer(bytearray):
    """Bytes the client sent that the core has not consumed yet.

    A ``bytearray`` itself, so appending, measuring and clearing it (several times per
    command) stay C calls; only the framing is Python.
    """

    def __init__(self, max_line: int) -> None:
        super().__init__()
        self._max_line = max_line
        self.discarding = False  # inside an over-long line, until its LF
        self.last_crlf = True  # the last line ended with CRLF, not a bare LF

    def take(self) -> bytes:
        """Everything buffered, removed from the buffer."""
        data = bytes(self)
        self.clear()
        return data

    def next_line(self, *, bare_lf: bool) -> bytes | LineError | None:
        """The next line without its line end, a ``LineError``, or None until a LF."""
        end = self.find(b"\n")
        if end < 0:
            if len(self) > self._max_line:
                self.clear()
                self.discarding = True
            return None
        line = bytes(self[: end + 1])
        del self[: end + 1]
        if self.discarding or len(line) > self._max_line:
            self.discarding = False
            return LineError.TOO_LONG
        if line.endswith(b"\r\n"):
            self.last_crlf = True
            return line[:-2]
        if bare_lf:
            self.last_crlf = False
            return line[:-1]
        return LineError.BARE_LF
