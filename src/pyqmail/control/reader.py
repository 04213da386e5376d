"""The one control-file reader: qmail's ``control_readline``/``control_readfile``, stricter.

Every daemon reads ``<root>/control/<name>`` through these two functions, so a file means
the same thing to pyqmail-smtpd and pyqmail-send (``pyqmail.control.table`` says which
parser turns the text into a value and which daemons read it).

qmail's rules (``control.c``), kept:

- a missing file is "not set": the caller's default applies (``None`` here), unless the
  file is required (``me``), which the parser decides;
- trailing blanks and tabs are stripped from every line;
- multi-line files (``control_readfile``): blank lines and lines starting with ``#`` are
  skipped;
- single-value files (``control_readline``): one value, the first line.

pyqmail's additions, each refusing a file qmail would silently misread:

- a single-value file skips leading blank and ``#`` lines too (qmail would take a comment
  as the value), and a second value line is an error (qmail ignores it: two values in a
  file are a mistake, and using the first hides it). A file with no value line holds the
  empty value (``doublebounceto``: drop double bounces; a number: an error);
- a carriage return anywhere is an error: qmail strips only blanks, tabs and the newline,
  so a DOS line end would become part of the value (a host name ending in CR in the
  greeting and in every Received line);
- a NUL byte, and bytes that are not UTF-8, are errors;
- a file that exists but cannot be read (permissions) is an error, as in qmail (-1).

One error type, ``ControlError``; its message starts with the file (and line, when one
is at fault) and says what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ControlError(Exception):
    """A control file is missing, unreadable or malformed; the message names file and line."""


@dataclass(frozen=True)
class Line:
    """One meaningful line of a control file; ``lineno`` 0 means "the file as a whole"."""

    path: Path
    lineno: int
    text: str

    @property
    def where(self) -> str:
        """``path:line`` for messages (just ``path`` when no line is at fault)."""
        return f"{self.path}:{self.lineno}" if self.lineno else str(self.path)


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        raise ControlError(f"{path}:{lineno}: not valid UTF-8") from exc


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist (qmail's "not set")."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ControlError(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise ControlError(f"{path}: cannot read: {exc.strerror}") from exc
    return _decode(path, raw)


def read_lines(path: Path) -> list[Line] | None:
    """qmail's ``control_readfile``: the meaningful lines, or None if the file is absent."""
    text = _read_text(path)
    if text is None:
        return None
    lines = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if "\r" in line:
            raise ControlError(f"{path}:{lineno}: carriage return in line (DOS line ends?)")
        if "\x00" in line:
            raise ControlError(f"{path}:{lineno}: NUL byte in line")
        stripped = line.rstrip(" \t")
        if stripped and not stripped.startswith("#"):
            lines.append(Line(path, lineno, stripped))
    return lines


def read_line(path: Path) -> Line | None:
    """qmail's ``control_readline``: the one value line, or None if the file is absent.

    A file without a value line gives ``Line(path, 0, "")`` (the empty value)."""
    lines = read_lines(path)
    if lines is None:
        return None
    if not lines:
        return Line(path, 0, "")
    if len(lines) > 1:
        raise ControlError(f"{path}:{lines[1].lineno}: only one line expected")
    return lines[0]


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file the daemon re-reads while running is replaced or edited
    (inode, size, mtime), or None when it cannot be looked at: the users files compare it
    on every use and read the file again only when it moved."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
