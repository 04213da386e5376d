# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the module ``pyqmail_control_files`` accepts as a file name and as a one-value file.

Shared by the module (``library/pyqmail_control_files.py``, on the host) and the preflight's
row of ``pyqmail_control__extra`` (``check_extra`` in ``pyqmail_control``, on the controller),
which the role passes to the module as ``values``: the preflight refuses what the module
would refuse later, by the same rule. Nothing here imports anything of the collection.

Why these rules: a one-value file holds its value as text. A string or an integer has one
obvious text; anything else had Python's: a list became ``['a.example', 'b.example']`` (one
bogus line in control/rcpthosts), a boolean ``True`` - neither what qmail reads. A file name
is one directory entry: a NUL in it crashed the module (``embedded null byte``), a trailing
newline made a file named ``me\\n`` beside ``me``.
"""

from __future__ import annotations

import re
from typing import Any

# C0 and C1 control characters (NUL and line breaks included), any whitespace, and '/'.
_BAD_NAME_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\s/]")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be the name of a file directly inside the module's directory."""
    if not name or name in (".", ".."):
        return "a file name inside path, not empty, not . or .."
    if _BAD_NAME_RE.search(name):
        return "a file name inside path holds no '/', whitespace or control character (NUL too)"
    return None


def value_problem(value: Any) -> str | None:
    """Why ``value`` cannot be the content of a one-value file; None (removal) is fine.

    A bool is refused though Python counts it an int: ``True`` would be written as the word.
    """
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return None
    hint = ""
    if isinstance(value, bool):
        hint = "; quote the text the file needs, such as '1' or '0'"
    elif isinstance(value, (list, tuple)):
        hint = "; write its lines as one string, such as {{ list | join('\\n') }}"
    return (
        f"is a {type(value).__name__}: a one-value file takes a string or an integer (null "
        f"removes the file){hint}"
    )
