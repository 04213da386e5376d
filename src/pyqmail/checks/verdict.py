"""The one answer every inbound check gives: accept, defer (4xx) or refuse (5xx).

Why a type of its own: the session turns any check's answer into a reply and a log line
the same way, whichever check (blocklists, greylisting, ...) gave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Verdict:
    """accept, defer (4xx) or refuse (5xx), with the reply and what the log line gets."""

    action: Literal["accept", "defer", "refuse"]
    code: int = 250
    text: str = ""
    log: str = ""  # key=value pairs for the message's or refusal's log line
