"""The answer every inbound check gives, one shape for all of them."""

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
