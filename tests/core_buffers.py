"""How many bytes the sans-I/O SMTP core holds, for the tests' memory bounds.

Found by walking the connection's objects (the connection, its readers, anything else of
``pyqmail.protocol``) and adding up every ``bytes``/``bytearray`` they hold, so a buffer
added to the core later is counted without anyone remembering to count it. Not entered:
objects of other packages (``pyqmail.headers.HopCounter``, constant memory by its own
tests), enum members, and the server's settings (``Policy``, ``TLSInfo``: frozen, given).
"""

from __future__ import annotations

import enum

from pyqmail.protocol import Policy, TLSInfo

_PACKAGE = "pyqmail.protocol"
_NOT_ENTERED = (enum.Enum, Policy, TLSInfo)


def held_bytes(root: object) -> int:
    """Bytes in every buffer reachable from ``root`` through pyqmail.protocol objects."""
    total = 0
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for value in _attributes(obj):
            if isinstance(value, bytes | bytearray | memoryview):
                total += len(value)
            elif type(value).__module__.startswith(_PACKAGE) and not isinstance(
                value, _NOT_ENTERED
            ):
                stack.append(value)
    return total


def _attributes(obj: object) -> list[object]:
    """The instance attributes of ``obj``, from ``__dict__`` and ``__slots__``."""
    values = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                values.append(getattr(obj, name))
    return values
