"""The daemons' one key=value logger: ``pid=<pid> <event> key=value ...`` on stdout.

Why one module: every line a daemon logs goes to multilog through one pipe that several
pre-forked workers share, so each line must reach it whole (at most PIPE_BUF bytes, in one
write), and a value an attacker chose (a HELO name, an AUTH user) must not be able to forge
a field or a line. ``log`` does both; ``clean`` escapes blanks and control characters as
``\\xNN`` (``\\uNNNN`` past Latin-1), so ``key=value`` splits on blanks and lines on
newlines, whatever the client sent.

Lines logged in an event loop's thread are written together at the end of the loop's pass
(``loop_thread``): one write per pass under load instead of one per line.

This module imports no event loop, and only modules that a bare interpreter has already
loaded or that cost it nothing (``_thread``, not ``threading``; no ``contextlib``):
pyqmail-smtpd's supervisor logs through it and must stay small (``pyqmail.smtpd.prefork``);
the loop's thread hands in its ``get_running_loop``.
"""

from __future__ import annotations

import _thread
import os
import select

TYPE_CHECKING = False  # typing costs pyqmail-smtpd's supervisor 1.6 MiB (prefork)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class _Loop(Protocol):
        def call_soon(self, callback: Callable[[], object]) -> object: ...


MAX_LINE = 4000  # longer lines are cut (a whole line must fit one atomic pipe write)


def clean(value: object) -> str:
    """One field value: printable, without blanks (``\\x20``), never empty (``""``)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and " " not in text and text:
        return text
    out = []
    for c in text:
        if c == " ":
            out.append("\\x20")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
    return "".join(out) or '""'


_PID = f"pid={os.getpid()}"


def _after_fork() -> None:
    global _PID  # noqa: PLW0603 - the log prefix of a forked worker
    _PID = f"pid={os.getpid()}"


os.register_at_fork(after_in_child=_after_fork)


class _LogBuffer:
    """Lines logged in the event loop's thread during one pass over its ready sockets go
    out together at the end of the pass (``call_soon``), in writes of whole lines of at
    most PIPE_BUF bytes each: atomic on the pipe that multilog reads, whatever the other
    workers write to it. Under load that is one write per pass instead of one per line;
    a line logged from any other thread, or with no loop running, is written at once.
    The price: a SIGKILL in the middle of a pass loses that pass's lines (never mail: a
    message is in the queue before its line is logged)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.thread = 0  # the thread whose running loop flushes ``lines``
        self.running_loop: Callable[[], _Loop] | None = None  # that thread's get_running_loop

    def hold(self, running_loop: Callable[[], _Loop] | None) -> None:
        """The calling thread's lines wait for the end of its loop's pass (None: no more)."""
        self.thread = _thread.get_ident() if running_loop is not None else 0
        self.running_loop = running_loop

    def add(self, line: bytes) -> None:
        if _thread.get_ident() == self.thread and self.running_loop is not None:
            if self.lines:
                self.lines.append(line)
                return
            try:
                self.running_loop().call_soon(self.flush)
            except RuntimeError:  # the loop has stopped: write it now
                pass
            else:
                self.lines.append(line)
                return
        _write_log(line)

    def forget(self) -> None:
        """In a forked child: the parent's lines are the parent's to write."""
        self.lines = []

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > select.PIPE_BUF:
                _write_log(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            _write_log(b"".join(chunk))


def _write_log(data: bytes) -> None:
    """Whole lines to fd 1; a reader that went away must not take the daemon with it."""
    try:
        os.write(1, data)
    except (BrokenPipeError, BlockingIOError):
        pass


_log_buffer = _LogBuffer()
os.register_at_fork(after_in_child=_log_buffer.forget)


def log(event: str, **fields: object) -> None:
    """One line to stdout, atomic on a pipe (at most PIPE_BUF bytes, written whole).
    Fields whose value is None are left out, so callers can pass optional ones as they are."""
    parts = [_PID, event]
    parts.extend(f"{key}={clean(value)}" for key, value in fields.items() if value is not None)
    emit(" ".join(parts))


def emit(line: str) -> None:
    """A line already formatted (and cleaned by its caller), written like ``log``'s:
    whole, at most MAX_LINE characters, from any thread. For a daemon whose lines keep
    another format (pyqmail-send's qmail-send wording) but share the pipe's rules."""
    if len(line) > MAX_LINE:
        line = line[: MAX_LINE - 10] + "...(cut)"
    _log_buffer.add(line.encode("utf-8", "backslashreplace") + b"\n")


class _LoopThread:
    """``loop_thread``'s context (a class: ``contextlib`` would cost the supervisor)."""

    def __init__(self, running_loop: Callable[[], _Loop]) -> None:
        self.running_loop = running_loop

    def __enter__(self) -> None:
        _log_buffer.hold(self.running_loop)

    def __exit__(self, *exc_info: object) -> None:
        _log_buffer.hold(None)
        _log_buffer.flush()


def loop_thread(running_loop: Callable[[], _Loop]) -> _LoopThread:
    """While the calling thread runs its event loop (``running_loop``: its
    ``asyncio.get_running_loop``), in a ``with``: hold its lines until the end of each pass
    (see ``_LogBuffer``); on the way out, write whatever is still held."""
    return _LoopThread(running_loop)
