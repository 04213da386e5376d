"""What the rows of the preflight's table are made of (``CHECKS`` in ``pyqmail_inventory``).

Why its own module: the rows' functions live in one file per concept (``pyqmail_control``,
``pyqmail_clientrules``, ``pyqmail_mailboxes``, ``pyqmail_signing``, ``pyqmail_pki``,
``pyqmail_listeners``, beside ``pyqmail_scanners`` and ``pyqmail_dovecot``), and several of
them need the same few pieces: the type of a check, how a message shows a value, the
combinators ``in_range`` and ``each``, the domain-name rule, and the patterns more than one
concept checks against. They are here, imported by those files and by ``pyqmail_inventory``
(which imports all of them); this file imports none of them, so there is no import cycle.

A check is ``check(name, value, values)``: the variable's name (or the element's, as
``name[index].key``), its value after the spec's conversion, and every variable and context
value the preflight knows; it yields one line per problem, each starting with the name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Problems = Iterator[str]
Check = Callable[[str, Any, Mapping[str, Any]], Problems]

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"({_LABEL}\.)*{_LABEL}\Z")
ADDRESS_RE = re.compile(r"[^@\s:|&#/]+@[A-Za-z0-9.-]+\Z")
PEM_CERT = "-----BEGIN CERTIFICATE-----"
SAFE_PATH_CHARS = "letters, digits and '._/+@-'"
SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9._/+@-]*\Z")


def shown(value: Any) -> str:
    """A value as the messages print it: strings quoted, ``null`` for None."""
    return "null" if value is None else repr(value)


def in_range(low: int, high: int | None = None, note: str = "") -> Check:
    """An integer from ``low`` to ``high`` (no upper bound when None)."""

    def check(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
        del values
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"{low} or more"
            yield f"{name}: {value} is out of range: must be {bound}{note}"

    return check


def each(check: Check) -> Check:
    """Apply ``check`` to every element of a list, naming it ``name[index]``."""

    def run(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
        for index, item in enumerate(value):
            yield from check(f"{name}[{index}]", item, values)

    return run


def domain(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """A domain name (lower-cased as the control files store it), ``.`` prefix allowed."""
    del values
    if not DOMAIN_RE.match(str(value).lower().removeprefix(".")):
        yield f"{name}: {shown(value)} is not a domain name"


def one_line(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """Text written as one line of a control file: a line break would add another entry."""
    del values
    if re.search(r"[\r\n\0]", str(value)):
        yield f"{name}: {shown(value)} must be one line"


def safe_path(name: str, value: Any, values: Mapping[str, Any]) -> Problems:
    """An absolute path of letters, digits and ``._/+@-`` only. Why: the paths the run scripts
    name (root's shell scripts, started by supervise) are quoted there, and this keeps each one
    plain word wherever else it is written: a blank or a shell metacharacter in a directory
    name is far more likely a mistake or an attack than a need."""
    del values
    if not SAFE_PATH_RE.match(str(value)):
        yield (
            f"{name}: {shown(value)} is not an absolute path of {SAFE_PATH_CHARS} only "
            "(no blanks, no shell metacharacters)"
        )
